"""Start, watch and stop the torchrun worker group that holds the sharded DiT.

Shaped like vllm's multiproc executor: one request/response primitive to the workers (``call``: a method the model
family serves, a plain-data payload, one reply, with progress in between), a READY handshake after the model is
loaded and sharded, a monitor thread that notices a dead or silent worker and fails
the caller fast, and an idempotent ``shutdown``.

Process tree and how each part ends (no orphans, ever):

    pack process ──Popen(start_new_session)── torchrun agent ──── worker rank 0 .. N-1 (own sessions)

- ``shutdown()`` (also run by a ``weakref.finalize`` at garbage collection and at interpreter exit): asks rank 0 to
  stop the group, waits a few seconds, then SIGTERM and SIGKILL to torchrun's process group, then SIGKILL to any
  worker pid still alive (checked against its start time, so a recycled pid is never hit).
- The pack process dies without cleanup (SIGKILL, segfault): every local worker's heartbeat thread notices within
  a second (its send fails, or the parent pid is gone) and exits the worker; torchrun, its workers gone, exits too.
- torchrun dies: the workers get SIGKILL from the kernel (``PR_SET_PDEATHSIG``, set by each worker).
- A worker dies: its link closes at once; torchrun stops the others. The monitor raises ``WorkerError`` naming the
  rank, with its traceback when it could send one, and the group is stopped; the manager starts a fresh one for
  the next run. A worker that stops responding is caught by the heartbeat timeout.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from ..dtypes import dtype_name
from ..errors import ConfigError, OffloadOutOfMemoryError, WorkerError
from .protocol import (
    ENV_ADDRESS,
    ENV_AUTHKEY,
    ENV_PARENT_PID,
    ENV_SPEC,
    ENV_STORE,
    Link,
    LinkServer,
    WorkerSpec,
)

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).resolve().with_name("worker.py")
STARTUP_TIMEOUT_S = 300.0
"""From starting torchrun to every local rank connected (imports of torch and diffusers on every rank)."""
FAILURE_GRACE_S = 0.5
"""After the first sign of failure, how long to collect further reports before naming the root cause."""
STOP_GRACE_S = 5.0

WORKER_ENV = {
    # Workplace rule for the GPU machines: no NVLink SHARP / multicast anywhere in the stack.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "PYTHONUNBUFFERED": "1",
}
LOOPBACK_ENV = {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}
"""On one machine the collectives' bootstrap sockets stay on the loopback interface (unless the user says else)."""


def _family_reference(module_name: str) -> tuple[str, str]:
    """(module, file) for a worker to import the family: a name relative to this pack when the module is part of it
    (the pack's own import name differs between ComfyUI and a plain install), else the module's name and file."""
    root = __name__.rsplit(".offload.distributed.launcher", 1)[0]
    if module_name.startswith(root + "."):
        return module_name[len(root) + 1:], ""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        raise ConfigError("family", module_name, "cannot be found by the worker processes", "define the model spec in a module file")
    return module_name, str(Path(file).resolve())


def spec_for(model: Any, config: Any, parallel: str = "auto") -> WorkerSpec:
    """The worker spec for a manager's ``LoadedModel`` and an ``OffloadConfig``. Refuses more GPUs than visible."""
    device = "cpu"
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if config.num_gpus > visible:
            raise ConfigError(
                "num_gpus", config.num_gpus, f"but only {visible} GPU(s) are visible to this process",
                f"set num_gpus to at most {visible} (or check CUDA_VISIBLE_DEVICES)",
            )
        device = "cuda"
    family_module, family_file = _family_reference(model.spec.module)
    return WorkerSpec(
        family_module=family_module,
        family_file=family_file,
        spec_name=model.spec.name,
        source=json.dumps(model.source.describe(), sort_keys=True),
        components=model.dit_names,
        dtype=dtype_name(model.dit_dtype),
        num_gpus=config.num_gpus,
        dit_cpu_offload=config.dit_cpu_offload,
        pin_cpu_memory=config.pin_cpu_memory and config.dit_cpu_offload,  # pins nothing otherwise: no restart
        parallel=parallel,
        device=device,
    )


def torchrun_command(spec: WorkerSpec) -> list[str]:
    """The torchrun invocation for this machine (node 0). The secret is not in it: argv is world-readable."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}",
               "--max-restarts=0", "--monitor-interval=0.1"]
    if spec.nnodes == 1:
        # Rendezvous through a store on a free loopback port; MASTER_ADDR is 127.0.0.1, not this host's name.
        command += ["--standalone", "--local-addr=127.0.0.1"]
    else:
        host, _, port = spec.rdzv_endpoint.rpartition(":")
        command += [f"--nnodes={spec.nnodes}", "--node-rank=0", f"--master-addr={host}", f"--master-port={port}"]
    return command + [str(WORKER_SCRIPT)]


class WorkerGroup:
    """A running torchrun group serving one model's DiTs. Use ``start``/``launch``; call ``shutdown`` when done."""

    def __init__(self, spec: WorkerSpec, oom_advice: str | None = None, heads: int | None = None):
        from .fsdp import ParallelPlan

        self.spec = spec
        self.plan = ParallelPlan.choose(spec.num_gpus, spec.parallel)
        if heads is not None:
            self.plan.check_model(heads)  # before any process starts
        self.info: dict[str, Any] = {}
        """What the READY message reported: plan, weight bytes and shard placement per rank, block bytes, load time."""
        self.last_stats: dict[str, Any] = {}
        """Of the last finished request: seconds per step (rank 0) and peak device bytes per rank."""
        self._runtime = _Runtime(spec, oom_advice)
        self._request_lock = threading.Lock()
        # Runs on shutdown(), on garbage collection and at interpreter exit; holds no reference to this object.
        self._finalizer = weakref.finalize(self, self._runtime.stop, True)

    # ------------------------------------------------------------ construction

    @staticmethod
    def key_for(model: Any, config: Any) -> WorkerSpec:
        """Equal keys mean the running group can serve this model and config as is."""
        return spec_for(model, config)

    @classmethod
    def start(cls, model: Any, config: Any) -> WorkerGroup:
        """A group for a manager's ``LoadedModel`` and ``OffloadConfig`` (keeps plain data only, never the model)."""
        from ..core.memory_guard import oom_advice

        heads = model.spec.stages.sequence_parallel_heads(model.source.config(model.dit_names[0]))
        return cls.launch(cls.key_for(model, config), oom_advice(config), heads)

    @classmethod
    def launch(cls, spec: WorkerSpec, oom_advice: str | None = None, heads: int | None = None) -> WorkerGroup:
        """Start torchrun, wait until every rank has loaded its shards; raise ``WorkerError`` if that fails."""
        group = cls(spec, oom_advice, heads)
        try:
            group.info = group._runtime.launch()
        except BaseException:
            group.shutdown()
            raise
        return group

    # --------------------------------------------------------------- state

    @property
    def alive(self) -> bool:
        return self._runtime.usable()

    @property
    def sharded(self) -> tuple[str, ...]:
        """The components the workers hold."""
        return self.spec.components

    @property
    def pids(self) -> dict[int, int]:
        """Local rank -> worker pid (tests use it to kill or stop a rank)."""
        return {rank: pid for rank, (pid, _) in self._runtime.pids.items()}

    @property
    def torchrun_pid(self) -> int | None:
        return self._runtime.proc.pid if self._runtime.proc is not None else None

    def shutdown(self) -> None:
        """Stop the group and free its GPUs. Idempotent; safe from any thread."""
        self._finalizer()

    # ------------------------------------------------------------ requests

    def call(self, method: str, payload: dict[str, Any], observer: Any = None, total_steps: int = 0) -> Any:
        """Run the family's worker ``method`` on ``payload`` (plain data: numbers, strings, tensors) in every rank;
        return rank 0's reply. A method that reports steps (``total_steps`` of them) gets the same contract as
        ``denoise``: ``observer.before_step``/``after_step`` run here, between the workers' steps; an exception from
        ``before_step`` (ComfyUI's interrupt) stops the workers before that step and is re-raised, and the group
        stays usable."""
        with self._request_lock:
            runtime = self._runtime
            runtime.raise_if_unusable()
            if observer is not None and total_steps:
                observer.before_step(0, total_steps)
            finished = False
            try:
                runtime.activity = f"step 1 of {total_steps}" if total_steps else f"{method}"
                runtime.send({"op": "call", "method": method, "payload": payload})
                reply = self._steps(observer, total_steps)
                finished = True
                return reply
            except (WorkerError, OffloadOutOfMemoryError):
                finished = True  # the runtime has already stopped the group
                raise
            except _Interrupted as interrupted:
                finished = True
                raise interrupted.error from None
            finally:
                runtime.activity = "idle"
                if not finished:
                    # Left mid-protocol (e.g. KeyboardInterrupt while waiting): the group's state is unknown.
                    self.shutdown()

    def _steps(self, observer: Any, total: int) -> Any:
        runtime = self._runtime
        while True:
            message = runtime.next_message()
            op = message["op"]
            if op == "result":
                self.last_stats = message["stats"]
                return message["reply"]
            if op != "progress":
                self.shutdown()
                raise WorkerError(f"worker group sent {op!r} where a step's progress was expected", rank=0)
            index = message["step"]
            last = index + 1 >= total
            try:
                if observer is not None:
                    observer.after_step(index, total)
                    if not last:
                        observer.before_step(index + 1, total)
            except BaseException as error:  # noqa: BLE001 - the host's interrupt, whatever its type
                self._stop_request(last)
                raise _Interrupted(error) from error
            if not last:
                runtime.activity = f"step {index + 2} of {total}"
                runtime.send({"op": "continue"})

    def _stop_request(self, last: bool) -> None:
        """Bring the group back to idle after the host stopped the run: every rank leaves at the same boundary."""
        runtime = self._runtime
        if last:
            expected = "result"  # the workers do not wait after the last step; drain its result
        else:
            runtime.send({"op": "cancel"})
            expected = "cancelled"
        while runtime.next_message()["op"] != expected:
            pass
        logger.info("worker group: run stopped by the host between steps; the group stays ready")


class _Interrupted(Exception):
    def __init__(self, error: BaseException):
        super().__init__(repr(error))
        self.error = error


_FAILED = object()


class _Runtime:
    """The processes, links and monitor of one group. Owned by ``WorkerGroup``, referenced by its finalizer."""

    def __init__(self, spec: WorkerSpec, oom_advice: str | None):
        self.spec = spec
        self.oom_advice = oom_advice
        self.proc: subprocess.Popen | None = None
        self.server: LinkServer | None = None
        self.links: dict[int, Link] = {}
        self.pids: dict[int, tuple[int, str | None]] = {}
        self.inbox: queue.Queue = queue.Queue()
        self.log_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.activity = "starting"
        self._lock = threading.Lock()
        self._stopped = False
        self._stopping = threading.Event()
        self._failure: tuple[str, int | None, str | None, dict] | None = None
        self._events: list[tuple[float, int | None, str, dict]] = []
        self._reported: set[int] = set()
        self._last_seen: dict[int, float] = {}
        self._monitor: threading.Thread | None = None
        self.store_dir: str | None = None
        """The private folder (mode 0700) of the process group's rendezvous file, on one machine."""

    # ------------------------------------------------------------------ launch

    def launch(self) -> dict[str, Any]:
        spec = self.spec
        self.server = LinkServer()
        env = {**os.environ, **WORKER_ENV}
        if spec.nnodes == 1:
            for name, value in LOOPBACK_ENV.items():
                env.setdefault(name, value)
        if spec.nnodes == 1:
            self.store_dir = tempfile.mkdtemp(prefix="video-offload-group-")  # 0700: this user only
            env[ENV_STORE] = os.path.join(self.store_dir, "rendezvous")
        env.update({
            ENV_ADDRESS: self.server.address,
            ENV_AUTHKEY: self.server.authkey.hex(),
            ENV_PARENT_PID: str(os.getpid()),
            ENV_SPEC: spec.to_json(),
        })
        command = torchrun_command(spec)
        if spec.dit_cpu_offload and spec.pin_cpu_memory and spec.device == "cpu":
            logger.info("pin_cpu_memory has no effect without CUDA: the CPU workers' host shards stay pageable")
        if spec.device == "cpu":
            # Allowed (it is how the tests run groups, and a CPU-only machine may want it), never silent.
            logger.warning(
                "no CUDA device: num_gpus=%d starts %d CPU worker processes (gloo) that share this machine's cores "
                "and memory, not GPUs", spec.num_gpus, spec.nproc_per_node,
            )
        logger.info("starting %d DiT workers (%s, %s): %s", spec.num_gpus, spec.device, spec.parallel, " ".join(command))
        if spec.nnodes > 1:
            logger.info(
                "start the other machines with node ranks 1..%d: %s=%r %s",
                spec.nnodes - 1, ENV_SPEC, spec.to_json(),
                " ".join(torchrun_command(spec)).replace("--node-rank=0", "--node-rank=<i>"),
            )
        self.proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killable as a whole, and terminal ^C reaches only us
        )
        threading.Thread(target=self._pump_log, name="video-offload-worker-log", daemon=True).start()
        self._await_connections()
        self._monitor = threading.Thread(target=self._watch, name="video-offload-worker-monitor", daemon=True)
        self._monitor.start()
        self.activity = "loading the model"
        ready = self.next_message()
        if ready["op"] != "ready":
            raise WorkerError(f"worker group sent {ready['op']!r} before it was ready", rank=0)
        self.activity = "idle"
        logger.info(
            "worker group ready in %.1f s: %s; %.2f GiB of DiT weights per rank",
            ready["load_seconds"], ready["plan"], max(ready["weight_bytes"]) / 2**30,
        )
        return {k: v for k, v in ready.items() if k != "op"}

    def _await_connections(self) -> None:
        expected = set(range(self.spec.nproc_per_node))  # node 0 holds global ranks 0 .. nproc_per_node-1
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while expected - set(self.links):
            code = self.proc.poll()
            if code is not None:
                raise WorkerError(self._with_log(f"torchrun exited with code {code} before every rank connected"))
            if self.server.failure is not None:
                # The ranks could not connect however long we wait: fail now, not at the startup timeout.
                raise WorkerError(self._with_log(
                    f"the pack's link server cannot accept the workers ({self.server.failure}); ranks "
                    f"{sorted(self.links)} of {sorted(expected)} had connected"
                ))
            if time.monotonic() > deadline:
                raise WorkerError(self._with_log(
                    f"only ranks {sorted(self.links)} of {sorted(expected)} connected within {STARTUP_TIMEOUT_S:.0f} s"
                ))
            taken = self.server.take(0.2)
            if taken is None:
                continue
            hello, link = taken
            rank = hello["rank"]
            if rank not in expected or rank in self.links:
                link.close()
                raise WorkerError(f"unexpected hello from rank {rank}; expected ranks {sorted(expected)}")
            self.links[rank] = link
            self.pids[rank] = (int(hello["pid"]), _start_time(int(hello["pid"])))
        self.server.close()  # every rank is in: nothing else may connect
        now = time.monotonic()
        self._last_seen = {rank: now for rank in self.links}

    def _pump_log(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log_tail.append(line)
            logger.debug("workers: %s", line)

    # ----------------------------------------------------------------- monitor

    def _watch(self) -> None:
        import multiprocessing.connection as mpc

        by_connection = {link.connection: rank for rank, link in self.links.items()}
        open_connections = set(by_connection)
        first_event = None
        while not self._stopping.is_set():
            if open_connections:
                ready = mpc.wait(list(open_connections), timeout=0.1)
            else:
                ready = []
                time.sleep(0.1)
            now = time.monotonic()
            for connection in ready:
                rank = by_connection[connection]
                try:
                    message = self.links[rank].recv()
                except (EOFError, OSError, ValueError, RuntimeError):
                    open_connections.discard(connection)
                    self._last_seen.pop(rank, None)
                    if rank not in self._reported:
                        self._events.append((now, rank, "died", {}))
                    continue
                self._last_seen[rank] = now
                op = message["op"]
                if op == "heartbeat":
                    continue
                if op == "error":
                    self._reported.add(rank)
                    self._events.append((now, rank, message.get("kind", "error"), message))
                    continue
                self.inbox.put(message)
            code = self.proc.poll()
            if code is not None:
                self._events.append((now, None, "exited", {"code": code}))
            for rank, seen in list(self._last_seen.items()):
                if now - seen > self.spec.heartbeat_timeout_s and rank not in self._reported:
                    self._reported.add(rank)
                    self._events.append((now, rank, "silent", {"seconds": now - seen}))
            if self._events and first_event is None:
                first_event = now
            if first_event is not None and (now - first_event >= FAILURE_GRACE_S or code is not None):
                self._fail()
                return

    def _fail(self) -> None:
        """Name the root cause among the collected events, wake the caller, stop every process."""
        if self._stopping.is_set():
            return
        primary = [e for e in self._events if e[2] in ("error", "oom", "died", "silent")]
        secondary = [e for e in self._events if e[2] == "comm"]
        _, rank, kind, detail = min(primary or secondary or self._events, key=lambda e: e[0])
        during = f"while {self.activity}" if self.activity in ("loading the model", "idle") else f"during {self.activity}"
        pid = self.pids.get(rank, (None, None))[0] if rank is not None else None
        who = f"worker rank {rank}" + (f" (pid {pid})" if pid else "")
        traceback_text, log = None, ""
        if kind in ("error", "oom", "comm"):
            message = f"{who} failed {during}: {detail.get('message', 'see its traceback')}"
            traceback_text = detail.get("traceback")
        elif kind == "died":
            message = f"{who} died {during} (its link closed without an error report: killed, or crashed)"
            log = self._log_excerpt()
        elif kind == "silent":
            message = (f"{who} sent nothing for {detail['seconds']:.0f} s {during} (heartbeat timeout "
                       f"{self.spec.heartbeat_timeout_s:.0f} s): it is hung or stopped")
        else:
            message = f"torchrun exited with code {detail['code']} {during}"
            log = self._log_excerpt()
        message += ". The worker group was stopped; the next run starts a fresh one." + log
        self._failure = (message, rank, traceback_text, detail if kind == "oom" else {})
        logger.error("%s", message)
        self.stop(graceful=False)

    def error(self) -> BaseException:
        message, rank, traceback_text, oom = self._failure
        error = WorkerError(message, rank=rank, remote_traceback=traceback_text)
        if not oom:
            return error
        # An OOM in a worker becomes the pack's OOM error, so auto_offload can step to the next option.
        advice = self.oom_advice or "Fix: enable dit_cpu_offload, or lower num_frames or the resolution."
        oom_error = OffloadOutOfMemoryError(f"DiT sampling on worker rank {rank}", oom.get("free"), oom.get("total"), advice)
        oom_error.__cause__ = error
        return oom_error

    # --------------------------------------------------------------- requests

    def usable(self) -> bool:
        return not self._stopped and self._failure is None and self.proc is not None and self.proc.poll() is None

    def raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise self.error()
        if not self.usable():
            raise WorkerError("the worker group has been shut down. Fix: start a new one (the manager does so).")

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.links[0].send(message)
        except (OSError, ValueError) as e:
            self._wait_for_failure()
            raise WorkerError(f"could not reach worker rank 0 ({e})", rank=0) from e

    def next_message(self) -> dict[str, Any]:
        """The next message from rank 0; raises the group's failure as soon as the monitor has named it."""
        while True:
            try:
                message = self.inbox.get(timeout=0.5)
            except queue.Empty:
                if self._stopped and self._failure is None:
                    raise WorkerError("the worker group was shut down while a request was running") from None
                continue
            if message is _FAILED:
                self.inbox.put(_FAILED)  # for any later waiter
                if self._failure is not None:
                    raise self.error()
                raise WorkerError("the worker group was shut down while a request was running")
            return message

    def _wait_for_failure(self, timeout: float = 2 * FAILURE_GRACE_S + 1.0) -> None:
        deadline = time.monotonic() + timeout
        while self._failure is None and not self._stopped and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._failure is not None:
            raise self.error()

    # ------------------------------------------------------------------- stop

    def stop(self, graceful: bool) -> None:
        """Idempotent. Graceful: ask rank 0 to stop everyone and wait; then escalate signals; then close links."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if graceful and 0 in self.links and self._failure is None:
                try:
                    self.links[0].send({"op": "shutdown"})
                    proc.wait(STOP_GRACE_S)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    pass
            # After a failure there is nothing to save: SIGKILL at once, so the caller hears of it in seconds and a
            # new group does not race the old one for GPU memory. Otherwise give torchrun a chance to stop its
            # workers itself first.
            escalation = ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)) if graceful else ((signal.SIGKILL, 5.0),)
            for sig, wait in escalation:
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)  # torchrun's own process group (start_new_session)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        for pid, started in self.pids.values():  # workers live in sessions of their own
            if started is not None and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for link in self.links.values():
            link.close()
        if self.server is not None:
            self.server.close()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
        self.inbox.put(_FAILED)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=2.0)
        if proc is not None:
            logger.info("worker group stopped (torchrun exit code %s)", proc.poll())

    def _with_log(self, message: str) -> str:
        return message + self._log_excerpt()

    def _log_excerpt(self) -> str:
        tail = [line for line in list(self.log_tail)[-15:] if line.strip()]
        return "\n--- last worker log lines ---\n" + "\n".join(tail) if tail else ""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to recognise a process and never signal a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # field 22 of stat(5); fields[0] here is field 3
    except (OSError, IndexError):
        return None
