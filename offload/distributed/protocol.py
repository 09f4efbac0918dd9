"""The link between the pack's process and its workers: loopback TCP, HMAC-authenticated, plain data only.

Security model, in one place:

- The parent listens on ``127.0.0.1`` only, on a port the OS picks, and stops listening as soon as every local rank
  has connected - the port is open for seconds, once per launch.
- Each launch makes a fresh 32-byte secret (``secrets.token_bytes``). Both ends prove they hold it with
  ``multiprocessing.connection``'s HMAC challenge-response before anything else is read, so another user on the
  machine can neither drive the workers nor impersonate one. The secret reaches the workers in an environment
  variable of the torchrun subprocess (``/proc/<pid>/environ`` is readable only by the same user), never on a
  command line, which every user can read with ``ps``.
- Messages are encoded with ``torch.save`` and decoded with ``torch.load(weights_only=True)``: dicts, lists,
  strings, numbers and tensors, nothing that could name code to run. The link never unpickles objects (the
  stdlib ``Connection.send`` would, and with torch imported it would also try to pass tensors as shared-memory
  file descriptors, which fails between unrelated processes).

Message vocabulary (``op`` field): worker -> parent ``hello``, ``heartbeat``, ``ready``, ``progress``, ``result``,
``cancelled``, ``error``; parent -> rank 0 ``call`` (a method name and a plain-data payload: the one request
primitive), ``continue``, ``cancel``, ``shutdown``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import multiprocessing.connection as mpc
import os
import secrets
import socket
import threading
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

LOOPBACK = "127.0.0.1"
HANDSHAKE_TIMEOUT_S = 10.0
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


def encode(message: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(message, buffer)
    return buffer.getvalue()


def decode(data: bytes) -> dict[str, Any]:
    message = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
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
    holds up only itself; ``close()`` ends those threads too. Connections that fail the challenge are dropped and
    logged; they never reach the caller.
    """

    def __init__(self) -> None:
        self.authkey = secrets.token_bytes(32)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((LOOPBACK, 0))
        self._socket.listen(16)
        self.address = f"{LOOPBACK}:{self._socket.getsockname()[1]}"
        self._accepted: list[tuple[dict[str, Any], Link]] = []
        self._cond = threading.Condition()
        self._pending: set[socket.socket] = set()
        self._closed = False
        self.refused = 0
        """Connections that failed authentication (tests and logs read it)."""
        self._thread = threading.Thread(target=self._accept_loop, name="video-offload-link-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._socket.accept()
            except OSError:
                return  # closed
            sock.setblocking(True)
            with self._cond:
                if self._closed:
                    sock.close()
                    return
                self._pending.add(sock)
            threading.Thread(target=self._handshake, args=(sock,), name="video-offload-link-auth", daemon=True).start()

    def _handshake(self, sock: socket.socket) -> None:
        # The Connection gets its own descriptor of the socket: ``close()`` can then shut the socket down under a
        # handshake blocked in recv (the recv returns EOF) while each object closes only the descriptor it owns.
        try:
            connection = mpc.Connection(os.dup(sock.fileno()))
        except OSError:  # closed by close() before this thread ran
            return
        try:
            # The same two steps as multiprocessing's Listener.accept: challenge the client, then answer its
            # challenge (mutual authentication). A wrong key raises AuthenticationError here.
            mpc.deliver_challenge(connection, self.authkey)
            mpc.answer_challenge(connection, self.authkey)
            link = Link(connection)
            if not connection.poll(HANDSHAKE_TIMEOUT_S):
                raise TimeoutError("no hello after authentication")
            hello = link.recv()
            if hello.get("op") != "hello" or not isinstance(hello.get("rank"), int):
                raise ValueError(f"expected a hello, got {hello.get('op')!r}")
        except (mpc.AuthenticationError, EOFError, OSError, ValueError, TimeoutError, RuntimeError) as e:
            with self._cond:
                self._pending.discard(sock)
                if not self._closed:
                    self.refused += 1
                    logger.warning("worker link: refused a connection (%s: %s)", type(e).__name__, e)
            connection.close()
            sock.close()
            return
        with self._cond:
            self._pending.discard(sock)
            sock.close()
            if self._closed:
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


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass

