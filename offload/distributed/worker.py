"""The torchrun entry point: one process per GPU, holding a shard of a model's DiTs, serving the pack's requests.

Generic: the model family is named in the spec (its module and spec name); the worker imports it, builds the DiTs
its spec names, applies the family's ``parallelize`` and serves the family's worker methods through one request
primitive (``call``: a method name and a plain-data payload, answered by one reply).

Run by the launcher as ``python -m torch.distributed.run ... <this file>``. Every rank:

1. makes itself die with torchrun (``PR_SET_PDEATHSIG``), and - on the parent's machine - connects to the
   parent's link (the per-launch secret arrives in the environment), says hello and starts a heartbeat thread that
   also exits the process as soon as the parent is gone;
2. joins the process group (NCCL on GPUs, gloo on CPU) plus a gloo "control" group for small CPU messages;
3. builds each DiT on meta, applies the family's parallel plan (FSDP2, CFG/Ulysses), then reads only its own rows
   from the files;
4. serves requests. Rank 0 receives them from the parent and broadcasts them on the control group, so ranks on
   other machines (which have no link) follow too. Between steps rank 0 waits for the parent's continue/cancel and
   broadcasts a one-integer flag, so all ranks stop at the same step boundary and none is left in a collective.

Any exception is reported with its traceback over the link and the process exits non-zero; torchrun then stops
the others and the parent turns it into a ``WorkerError``. While idle, rank 0 broadcasts a no-op every
``KEEPALIVE_S`` seconds so the other ranks' waits never reach the control group's timeout.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # torchrun runs this file by path: ComfyUI loads the pack from a folder whose name need not be importable
    # (custom_nodes/video-offload), and the pack need not be pip-installed. So register the pack's folder as the
    # package ``video_offload`` and run this module from inside it, where relative imports work - and where a model
    # family defined outside the pack (imported by file) finds the pack under the name it uses in a plain install.
    import importlib
    import sys
    import types
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == _here:
        sys.path.pop(0)  # the script's folder would shadow top-level modules with protocol.py, fsdp.py, ...
    # Synthetic packages, so neither the pack's __init__ (ComfyUI nodes) nor the engine's (the whole single-process
    # engine) runs here: the worker imports only the modules it uses.
    for _name, _path in (("video_offload", _here.parents[1]), ("video_offload.offload", _here.parent)):
        _package = types.ModuleType(_name)
        _package.__path__ = [str(_path)]
        sys.modules[_name] = _package
    sys.exit(importlib.import_module("video_offload.offload.distributed.worker").main())

import ctypes  # noqa: E402 - after the bootstrap above, which must run before any relative import
import datetime  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .plain_collectives import all_gather_plain, broadcast_plain, control_key  # noqa: E402
from .protocol import ENV_ADDRESS, ENV_AUTHKEY, ENV_PARENT_PID, ENV_SPEC, ENV_STORE, Link, WorkerSpec, connect  # noqa: E402

logger = logging.getLogger("video_offload.worker")

KEEPALIVE_S = 60.0
CONTROL_TIMEOUT = datetime.timedelta(minutes=30)
"""Gloo timeout of the control group: covers loading a large model; idle waits are kept short by the keepalive."""


def dist_world_size() -> int:
    return int(os.environ["WORLD_SIZE"])


class StepCancelled(Exception):
    """All ranks agreed to stop before this step."""


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(levelname)s %(name)s: %(message)s")
    _die_with_torchrun()
    spec = WorkerSpec.from_json(os.environ[ENV_SPEC])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    link, secret = _connect_to_parent(rank, local_rank)
    if link is None and rank == 0:
        logger.error("rank 0 has no link to the pack's process (%s unset); nothing to serve", ENV_ADDRESS)
        return 2
    heartbeat = Heartbeat(link, spec.heartbeat_interval_s, os.environ.pop(ENV_PARENT_PID, None))
    heartbeat.start()
    try:
        Worker(spec, rank, local_rank, link, secret).serve()
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the process exits non-zero
        _report(link, rank, e)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: other ranks may be stuck in collectives with this one
    heartbeat.stop()
    if link is not None:
        link.close()
    return 0


def _die_with_torchrun() -> None:
    """Ask Linux to SIGKILL this process when its parent (the torchrun agent) dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(1)


def _connect_to_parent(rank: int, local_rank: int) -> tuple[Link | None, bytes | None]:
    """The link to the parent and the launch's secret (None, None on another machine)."""
    address = os.environ.pop(ENV_ADDRESS, None)
    key = os.environ.pop(ENV_AUTHKEY, None)  # out of os.environ: nothing this process starts inherits it
    if not address or not key:
        return None, None  # a rank on another machine (multi-node): it follows rank 0 through collectives only
    secret = bytes.fromhex(key)
    link = connect(address, secret)
    link.send({"op": "hello", "rank": rank, "local_rank": local_rank, "pid": os.getpid()})
    return link, secret


class Heartbeat(threading.Thread):
    """Tells the parent this process is alive, and ends the process when the parent is gone.

    The second job is why it exists on every rank: a rank blocked in a collective (its peer died, or the parent
    was SIGKILLed mid-step) cannot notice anything itself; this thread can, and ``os._exit`` works from any thread.
    """

    def __init__(self, link: Link | None, interval: float, parent_pid: str | None):
        super().__init__(name="video-offload-heartbeat", daemon=True)
        self.link = link
        self.interval = interval
        self.parent_pid = int(parent_pid) if parent_pid else None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            if self.parent_pid is not None and not _pid_alive(self.parent_pid):
                os._exit(3)
            if self.link is not None:
                try:
                    self.link.send({"op": "heartbeat"})
                except (OSError, EOFError, ValueError):
                    os._exit(3)

    def stop(self) -> None:
        self._stop_event.set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _report(link: Link | None, rank: int, error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    print(f"[rank {rank}] failed:\n{text}", file=sys.stderr, flush=True)
    if link is None:
        return
    message: dict[str, Any] = {"op": "error", "rank": rank, "kind": _kind(error), "traceback": text,
                               "message": f"{type(error).__name__}: {error}"}
    if message["kind"] == "oom" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        message.update(free=int(free), total=int(total))
    try:
        link.send(message)
    except (OSError, ValueError):
        pass


def _kind(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "oom"
    text = str(error)
    # A collective failing because a peer died is a consequence, not the cause: the parent prefers other reports.
    if isinstance(error, getattr(dist, "DistError", ())) or any(
        marker in text for marker in ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "NCCL")
    ):
        return "comm"
    return "error"


def load_family_spec(spec: WorkerSpec) -> Any:
    """The ``ModelSpec`` named in ``spec``: imported from this pack, or from the file of a family defined outside."""
    import importlib
    import importlib.util

    from ..core.spec import ModelSpec

    if spec.family_file:
        if spec.family_module in sys.modules:
            module = sys.modules[spec.family_module]
        else:
            module_spec = importlib.util.spec_from_file_location(spec.family_module, spec.family_file)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[spec.family_module] = module
            module_spec.loader.exec_module(module)
    else:
        root = __name__.rsplit(".offload.distributed.worker", 1)[0]
        module = importlib.import_module(f"{root}.{spec.family_module}")
    candidates = list(vars(module).values()) + list(getattr(module, "SPECS", ()))
    for value in candidates:
        if isinstance(value, ModelSpec) and value.name == spec.spec_name:
            return value
    raise LookupError(f"{spec.family_module} defines no model spec named {spec.spec_name!r}")


class Worker:
    """One rank's models and request loop. Family methods get this object: ``models`` (name -> sharded DiT),
    ``parallelism`` (name -> ``Parallelism``), ``model_spec``, ``source``, ``device``, ``rank``, ``dtype``."""

    def __init__(self, spec: WorkerSpec, rank: int, local_rank: int, link: Link | None, secret: bytes | None = None):
        self.spec = spec
        self.rank = rank
        self.local_rank = local_rank
        self.link = link
        self.device = torch.device("cpu")
        self.dtype = spec.torch_dtype
        self.control = None
        self.model_spec: Any = None
        self.source: Any = None
        self.models: dict[str, Any] = {}
        self.parallelism: dict[str, Any] = {}
        # On one machine every rank holds the launch's secret, so control messages between ranks are signed and
        # checked; across machines the others do not (they trust their network, see the README).
        self.control_key = control_key(secret) if spec.nnodes == 1 else None
        self.shutdown_requested = False
        """Rank 0 read a shutdown where it expected a step reply; the loop ends after the step is cancelled."""

    # ------------------------------------------------------------------ setup

    def _init_process_group(self) -> None:
        # On one machine the process group meets through a file in a folder only this user can open, not through
        # torchrun's TCP store (which every local process, and the network, can read and write): the collectives'
        # addresses and NCCL's bootstrap secret never appear there.
        store_file = os.environ.pop(ENV_STORE, None)
        rendezvous: dict[str, Any] = {}
        if store_file:
            rendezvous = dict(store=dist.FileStore(store_file, dist_world_size()), rank=self.rank,
                              world_size=dist_world_size())
        if self.spec.device == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device, **rendezvous)
        else:
            dist.init_process_group("gloo", **rendezvous)
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    def _load(self) -> dict[str, Any]:
        import json

        from ..weights.diffusers_folder import open_source
        from .fsdp import ParallelPlan, shard_placement
        from .shard_loading import local_weight_bytes, materialize_shards, unsharded_bytes

        spec = self.spec
        started = time.perf_counter()
        self.model_spec = load_family_spec(spec)
        self.source = open_source(json.loads(spec.source), self.model_spec)
        plan = ParallelPlan.choose(dist.get_world_size(), spec.parallel)
        pin = spec.pin_cpu_memory and self.device.type == "cuda"  # pinning needs a CUDA driver
        placement, weight_bytes, block_bytes, total_bytes = {}, 0, 0, 0
        for name in spec.components:
            component = self.model_spec.component(name)
            with self.source.weights(component, self.dtype) as weights:
                model = self.source.empty_model(component, self.dtype)
                weights.apply_dtypes(model)  # also refuses missing or mis-shaped tensors, naming them
                model.requires_grad_(False)
                parallelism = self.model_spec.parallelize(
                    model, plan, self.device, cpu_offload=spec.dit_cpu_offload, pin_memory=pin
                )
                mesh = parallelism.fsdp_mesh
                materialize_shards(model, weights, self.device, mesh.get_local_rank(), mesh.size(),
                                   params_on_cpu=spec.dit_cpu_offload)
            self.models[name] = model.eval()
            self.parallelism[name] = parallelism
            placement[name] = shard_placement(model)
            weight_bytes += local_weight_bytes(model)
            from ..core.spec import find_block_list

            _, blocks = find_block_list(model)
            block_bytes = max(block_bytes, max(unsharded_bytes(block) for block in blocks))
            total_bytes += unsharded_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers())
        mine = {"weight_bytes": weight_bytes, "seconds": time.perf_counter() - started, "placement": placement,
                "device_bytes": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0}
        everyone = all_gather_plain(mine, group=self.control, key=self.control_key)
        if self.rank == 0:
            logger.info("DiT loaded in %.1f s: %s", mine["seconds"], plan.describe())
        return {
            "plan": plan.describe(),
            "weight_bytes": [e["weight_bytes"] for e in everyone],
            "device_bytes": [e["device_bytes"] for e in everyone],
            "placement": [e["placement"] for e in everyone],
            "load_seconds": max(e["seconds"] for e in everyone),
            "block_bytes": block_bytes,
            "total_bytes": total_bytes,
        }

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        self._init_process_group()
        ready = self._load()
        if self.rank == 0:
            self.link.send({"op": "ready", **ready})
        while True:
            request = self._next_request()
            op = request["op"]
            if op == "noop":
                continue
            if op == "shutdown":
                break
            if op == "call":
                self._call(request["method"], request["payload"])
            else:
                raise ValueError(f"unknown request {op!r}")
        dist.destroy_process_group()

    def _next_request(self) -> dict[str, Any]:
        request: dict[str, Any] | None = None
        if self.rank == 0:
            request = {"op": "noop"}
            if self.shutdown_requested:
                request = {"op": "shutdown"}
            elif self.link.poll(KEEPALIVE_S):
                try:
                    request = self.link.recv()
                except EOFError:
                    request = {"op": "shutdown"}  # the parent is gone: take everyone down cleanly
            if request["op"] in ("continue", "cancel"):
                request = {"op": "noop"}  # a reply to a step that no longer runs
        # Plain data, signed: never a pickle, never a request that did not come from rank 0 of this launch.
        request = broadcast_plain(request, src=0, group=self.control, key=self.control_key)
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise ValueError("malformed request on the control group")
        return request

    def _call(self, method_name: str, payload: dict[str, Any]) -> None:
        method = self.model_spec.worker_methods.get(method_name)
        if method is None:
            raise ValueError(f"{self.model_spec.name} serves no method {method_name!r}")
        steps = Lockstep(self)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            reply = method(self, payload, steps)
        except StepCancelled as stop:
            if self.rank == 0:
                self.link.send({"op": "cancelled", "step": stop.args[0]})
            return
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        peaks = all_gather_plain(int(peak), group=self.control, key=self.control_key)
        if self.rank == 0:
            stats = {"step_seconds": steps.seconds, "peak_bytes": peaks}
            self.link.send({"op": "result", "reply": reply, "stats": stats})


class Lockstep:
    """The denoising loop's observer inside the group: progress out, continue/cancel in, same decision everywhere."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.seconds: list[float] = []
        self._started = time.perf_counter()

    def before_step(self, index: int, total: int) -> None:
        worker = self.worker
        if index > 0:
            go = 1
            if worker.rank == 0:
                reply = worker.link.recv()  # the parent's answer to the last progress message
                go = 1 if reply["op"] == "continue" else 0
                worker.shutdown_requested = reply["op"] == "shutdown"
            flag = torch.tensor([go], dtype=torch.int32)
            dist.broadcast(flag, src=0, group=worker.control)
            if not int(flag.item()):
                raise StepCancelled(index)
        self._started = time.perf_counter()

    def after_step(self, index: int, total: int) -> None:
        worker = self.worker
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)  # progress means the step's kernels are done, not just queued
        self.seconds.append(time.perf_counter() - self._started)
        if worker.rank == 0:
            worker.link.send({"op": "progress", "step": index, "total": total, "seconds": self.seconds[-1]})
