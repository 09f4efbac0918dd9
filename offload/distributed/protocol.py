"""The link between the pack's process and its workers: loopback TCP, HMAC-authenticated, plain data only.

Security model, in one place:

- The parent listens on ``127.0.0.1`` only, on a port the OS picks, and stops listening as soon as every local rank
  has connected - the port is open for seconds, once per launch.
- Each launch makes a fresh 32-byte secret (``secrets.token_bytes``). Both ends prove they hold it with
  ``multiprocessing.connection``'s HMAC challenge-response before anything else is read. The secret reaches the
  workers in an environment variable of the torchrun subprocess (``/proc/<pid>/environ`` is readable only by the
  same user), never on a command line, which every user can read with ``ps``.
- Messages are encoded with ``torch.save`` and decoded with ``torch.load(weights_only=True)``: dicts, lists,
  strings, numbers and tensors, nothing that could name code to run. The link never unpickles objects (the
  stdlib ``Connection.send`` would, and with torch imported it would also try to pass tensors as shared-memory
  file descriptors, which fails between unrelated processes).
- Between ranks, requests travel the same way (``plain_collectives``): plain data in a tensor, signed with a key
  derived from the secret and checked by every rank before it is decoded. On one machine the process group meets
  through a file in a folder only this user can open (``ENV_STORE``), not through torchrun's TCP store.

So another local user can neither drive the workers (every request comes over the authenticated link and is
signed between ranks) nor impersonate one (a worker proves the secret to the pack). What such a user can reach is
listed in docs/reliability.md ("The worker group"): torchrun's own rendezvous store, which PyTorch does not
authenticate, and the collectives' loopback sockets - enough to make a run fail, not to control it.

The accept loop survives transient errors and bounds the connections still authenticating (``LinkServer``).

Message vocabulary (``op`` field): worker -> parent ``hello``, ``heartbeat``, ``ready``, ``progress``, ``result``,
``cancelled``, ``error``; parent -> rank 0 ``call`` (a method name and a plain-data payload: the one request
primitive), ``continue``, ``cancel``, ``shutdown``.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import multiprocessing.connection as mpc
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import COMPUTE_DTYPES, compute_dtype
from ..errors import ConfigError

logger = logging.getLogger(__name__)

ENV_ADDRESS = "VIDEO_OFFLOAD_LINK_ADDRESS"
"""``host:port`` of the parent's link server (set for the ranks on the parent's machine only)."""
ENV_AUTHKEY = "VIDEO_OFFLOAD_LINK_KEY"
"""The per-launch secret, hex. Removed from the worker's ``os.environ`` as soon as it is read."""
ENV_PARENT_PID = "VIDEO_OFFLOAD_PARENT_PID"
"""The pack's process; a worker exits when it is gone."""
ENV_SPEC = "VIDEO_OFFLOAD_WORKER_SPEC"
"""The ``WorkerSpec`` as JSON (not secret: a model path and options)."""
ENV_STORE = "VIDEO_OFFLOAD_STORE_FILE"
"""The process group's rendezvous file, in a folder only this user can open (one machine only)."""

LOOPBACK = "127.0.0.1"
HANDSHAKE_TIMEOUT_S = 10.0
"""A connection must authenticate and say hello within this; a real worker does in milliseconds."""
BACKLOG = 64
MAX_PENDING_HANDSHAKES = 128
"""Connections authenticating at once (every local rank of a launch, 64 at most, fits twice); beyond it the oldest
is dropped."""
ACCEPT_TICK_S = 0.5
ACCEPT_RETRY_S = 0.1
ACCEPT_FAILURE_S = 5.0
"""Accepting may fail transiently this long (e.g. descriptors exhausted by junk connections that are being
dropped) before the server reports itself unhealthy and a launch fails."""
TRANSIENT_ACCEPT_ERRORS = frozenset(
    code for code in (getattr(errno, name, None) for name in (
        "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "ECONNABORTED", "EPROTO", "EPERM", "EINTR", "EAGAIN", "ENETDOWN",
        "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ECONNRESET",
    )) if code is not None
)
"""accept(2) errors after which accepting again can succeed (the Linux man page's list, plus resource limits)."""
PARALLEL_MODES = ("auto", "ulysses", "none")
"""How ranks share a step's compute: auto (CFG split, then Ulysses), ulysses (sequence only), none (memory only)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker group is launched with. Two equal specs are interchangeable groups (the manager's reuse key).

    Plain data only (it travels as JSON in the workers' environment): which family module defines the model, how
    to reopen the model's source, which DiTs to shard, and the options.
    """

    family_module: str
    """The module defining the model spec: a name inside this pack (``offload.families.wan``), or an absolute
    module name whose file is ``family_file``."""
    spec_name: str
    """The ``ModelSpec.name`` within that module's registrations."""
    source: str
    """The model source's ``describe()`` as JSON (``weights.open_source`` reopens it)."""
    components: tuple[str, ...]
    """The DiTs to shard."""
    dtype: str
    """bfloat16, float16 or float32: as ``from_pretrained(dtype=...)``, ``_keep_in_fp32_modules`` stay float32."""
    num_gpus: int
    """Ranks in the group, over all machines."""
    family_file: str = ""
    """Path of the family module when it is not part of this pack (a family registered from outside it)."""
    dit_cpu_offload: bool = False
    """FSDP2 CPU offload: shards live in host memory and are copied in per block."""
    pin_cpu_memory: bool = True
    """With ``dit_cpu_offload``: page-lock the host shards (ignored without CUDA, where nothing can be pinned)."""
    parallel: str = "auto"
    """auto (CFG split, then Ulysses), ulysses (sequence only), none (memory only; every rank computes everything)."""
    device: str = "cuda"
    """cuda (NCCL, one GPU per rank) or cpu (gloo; for tests and CPU-only machines)."""
    heartbeat_interval_s: float = 1.0
    """How often every local rank tells the parent it is alive."""
    heartbeat_timeout_s: float = 10.0
    """Silence after which the parent declares a rank hung and stops the group."""
    nnodes: int = 1
    """Machines. Above 1 the launcher starts node 0 and logs the command for the others (see the README)."""
    rdzv_endpoint: str = ""
    """``host:port`` of the rendezvous when ``nnodes > 1`` (an address the other machines can reach)."""

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError("dtype", self.dtype, "is not a DiT dtype", f"use one of {', '.join(COMPUTE_DTYPES)}")
        if isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, int) or self.num_gpus < 1:
            raise ConfigError("num_gpus", self.num_gpus, "must be a positive whole number", "use 2 or more")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError("device", self.device, "must be cuda or cpu", "use cuda (NCCL) or cpu (gloo)")
        if self.nnodes < 1 or self.num_gpus % self.nnodes:
            raise ConfigError(
                "nnodes", self.nnodes, f"must divide num_gpus={self.num_gpus}", "use the same GPU count on every machine"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(
                "rdzv_endpoint", self.rdzv_endpoint, "is needed with several machines", "pass host:port of machine 0"
            )
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ConfigError(
                "heartbeat_timeout_s", self.heartbeat_timeout_s, "must exceed heartbeat_interval_s",
                "use e.g. interval 1 s and timeout 10 s",
            )
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError("parallel", self.parallel, "is not a parallel mode", f"use one of {', '.join(PARALLEL_MODES)}")
        if not self.components:
            raise ConfigError("components", self.components, "names no DiT to shard", "name the model's DiTs")

    @property
    def nproc_per_node(self) -> int:
        return self.num_gpus // self.nnodes

    @property
    def torch_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        fields = json.loads(text)
        fields["components"] = tuple(fields["components"])
        return cls(**fields)


def encode_plain(value: Any) -> bytes:
    """Plain data (dicts, lists, strings, numbers, tensors) as bytes: ``torch.save``'s format."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def decode_plain(data: bytes) -> Any:
    """The inverse of :func:`encode_plain` with ``weights_only=True``: anything that names code to run (a pickled
    object, a ``__reduce__``) is refused with an error instead of being executed."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError... for bad bytes
        raise ValueError(f"not plain data ({type(e).__name__}: {str(e)[:200]})") from e


def encode(message: dict[str, Any]) -> bytes:
    return encode_plain(message)


def decode(data: bytes) -> dict[str, Any]:
    message = decode_plain(data)
    if not isinstance(message, dict) or "op" not in message:
        raise ValueError("malformed message on the worker link")
    return message


class Link:
    """One authenticated connection. ``send`` is thread-safe (a heartbeat thread shares it); ``recv`` is not."""

    def __init__(self, connection: mpc.Connection):
        self.connection = connection
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self._send_lock:
            self.connection.send_bytes(data)

    def recv(self) -> dict[str, Any]:
        """Block for the next message; ``EOFError`` when the other side has gone."""
        return decode(self.connection.recv_bytes())

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.connection.poll(timeout)

    def fileno(self) -> int:
        return self.connection.fileno()

    def close(self) -> None:
        try:
            self.connection.close()
        except OSError:
            pass


def connect(address: str, authkey: bytes) -> Link:
    """The worker side: connect to the parent and prove the shared secret (raises ``AuthenticationError``)."""
    host, _, port = address.rpartition(":")
    return Link(mpc.Client((host, int(port)), family="AF_INET", authkey=authkey))


class LinkServer:
    """The parent side: listens on 127.0.0.1, authenticates each connection, hands out ``(hello, Link)`` pairs.

    Each connection is authenticated in its own thread, so a local process that connects and then says nothing
    holds up only itself - and only for ``handshake_timeout`` seconds, and never more than ``max_pending``
    connections at once: beyond that the oldest unauthenticated one is dropped, so junk connections cannot starve a
    real worker. Connections that fail the challenge are dropped and logged; they never reach the caller.

    The accept loop survives transient errors (``EMFILE`` when the process is out of file descriptors,
    ``ECONNABORTED``...): it logs, waits a moment and accepts again. When accepting has failed for
    ``ACCEPT_FAILURE_S`` seconds without a single success, or fails with an error that is not transient,
    :attr:`failure` says why, so a launch fails in seconds instead of waiting for its startup timeout.

    ``listener``: an already bound and listening socket (tests pass one that injects faults); by default a fresh
    one on a free loopback port.
    """

    def __init__(self, listener: socket.socket | None = None, *, max_pending: int = MAX_PENDING_HANDSHAKES,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S):
        self.authkey = secrets.token_bytes(32)
        if listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((LOOPBACK, 0))
            listener.listen(BACKLOG)
        self._socket = listener
        self._socket.settimeout(ACCEPT_TICK_S)  # wake up regularly to expire stale handshakes
        self.address = f"{LOOPBACK}:{self._socket.getsockname()[1]}"
        self.max_pending = max_pending
        self.handshake_timeout = handshake_timeout
        self._accepted: list[tuple[dict[str, Any], Link]] = []
        self._cond = threading.Condition()
        self._pending: dict[socket.socket, float] = {}
        """Sockets still authenticating, with the time they were accepted (insertion order: oldest first)."""
        self._closed = False
        self.refused = 0
        """Connections that failed authentication, timed out or were dropped (tests and logs read it)."""
        self.failure: str | None = None
        """Why the accept loop cannot accept (set when it has failed for ``ACCEPT_FAILURE_S`` s, or for good)."""
        self._thread = threading.Thread(target=self._accept_loop, name="video-offload-link-accept", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _accept_loop(self) -> None:
        failing_since: float | None = None
        last_logged = 0.0
        while True:
            self._expire_handshakes()
            try:
                sock, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError as e:
                with self._cond:
                    if self._closed:
                        return
                now = time.monotonic()
                if e.errno not in TRANSIENT_ACCEPT_ERRORS:
                    self._fail(f"accepting connections failed: {_describe(e)}")
                    return
                failing_since = failing_since or now
                if now - last_logged > 5.0:
                    last_logged = now
                    logger.warning("worker link: accepting a connection failed (%s); retrying", _describe(e))
                if now - failing_since > ACCEPT_FAILURE_S and self.failure is None:
                    self._fail(f"accepting connections has failed for {now - failing_since:.0f} s: {_describe(e)}"
                               + (". Fix: raise the open-file limit (ulimit -n)" if e.errno in (errno.EMFILE, errno.ENFILE)
                                  else ""))
                time.sleep(ACCEPT_RETRY_S)  # let descriptors be freed (EMFILE) before trying again
                continue
            failing_since = None
            with self._cond:
                self.failure = None  # healthy again
            sock.setblocking(True)
            with self._cond:
                if self._closed:
                    sock.close()
                    return
                self._pending[sock] = time.monotonic()
                excess = len(self._pending) - self.max_pending
                oldest = list(self._pending)[:max(excess, 0)]
            for stale in oldest:
                self._drop(stale, f"more than {self.max_pending} connections were authenticating at once")
            threading.Thread(target=self._handshake, args=(sock,), name="video-offload-link-auth", daemon=True).start()

    def _fail(self, why: str) -> None:
        with self._cond:
            self.failure = why
            self._cond.notify_all()
        logger.error("worker link: %s", why)

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        with self._cond:
            stale = [sock for sock, started in self._pending.items() if now - started > self.handshake_timeout]
        for sock in stale:
            self._drop(sock, f"no authentication within {self.handshake_timeout:g} s")

    def _drop(self, sock: socket.socket, why: str) -> None:
        """End a handshake that is still pending: its thread sees EOF and counts it as refused."""
        with self._cond:
            if self._pending.pop(sock, None) is None:
                return
        logger.warning("worker link: dropped a connection (%s)", why)
        _shutdown_socket(sock)

    def _handshake(self, sock: socket.socket) -> None:
        # The Connection gets its own descriptor of the socket: ``close()`` can then shut the socket down under a
        # handshake blocked in recv (the recv returns EOF) while each object closes only the descriptor it owns.
        try:
            connection = mpc.Connection(os.dup(sock.fileno()))
        except OSError:  # closed by close() or dropped before this thread ran (or no descriptor left)
            with self._cond:
                self._pending.pop(sock, None)
                self.refused += 1
            _shutdown_socket(sock)
            return
        try:
            # The same two steps as multiprocessing's Listener.accept: challenge the client, then answer its
            # challenge (mutual authentication). A wrong key raises AuthenticationError here.
            mpc.deliver_challenge(connection, self.authkey)
            mpc.answer_challenge(connection, self.authkey)
            link = Link(connection)
            if not connection.poll(self.handshake_timeout):
                raise TimeoutError("no hello after authentication")
            hello = link.recv()
            if hello.get("op") != "hello" or not isinstance(hello.get("rank"), int):
                raise ValueError(f"expected a hello, got {str(hello.get('op'))[:40]!r}")
        except (mpc.AuthenticationError, EOFError, OSError, ValueError, TimeoutError, RuntimeError) as e:
            with self._cond:
                self._pending.pop(sock, None)
                if not self._closed:
                    self.refused += 1
                    logger.warning("worker link: refused a connection (%s: %s)", type(e).__name__, str(e)[:200])
            connection.close()
            sock.close()
            return
        with self._cond:
            still_pending = self._pending.pop(sock, None) is not None
            sock.close()
            if self._closed or not still_pending:  # closed, or dropped as stale while it answered
                connection.close()
                return
            self._accepted.append((hello, link))
            self._cond.notify_all()

    def take(self, timeout: float) -> tuple[dict[str, Any], Link] | None:
        """The next authenticated connection and its hello, or None after ``timeout`` seconds."""
        with self._cond:
            if not self._accepted:
                self._cond.wait(timeout)
            return self._accepted.pop(0) if self._accepted else None

    def close(self) -> None:
        """Stop listening and drop connections still authenticating. Idempotent; taken links stay open."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            accepted = list(self._accepted)
            self._accepted.clear()
            self._cond.notify_all()
        _shutdown_socket(self._socket)
        for sock in pending:
            _shutdown_socket(sock)
        for _, link in accepted:
            link.close()


def _describe(error: OSError) -> str:
    return f"{errno.errorcode.get(error.errno, error.errno)}: {os.strerror(error.errno)}" if error.errno else str(error)


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass

