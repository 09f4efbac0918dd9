"""Issue 12: the worker link's accept loop survives transient errors and junk connections, a launch whose ranks
cannot connect fails in seconds, and ranks exchange plain, authenticated tensors - never pickles."""

from __future__ import annotations

import ast
import errno
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from comfy_executor import REPO_ROOT
from video_offload.offload.distributed.protocol import LinkServer, connect


def hello(link, rank=0):
    link.send({"op": "hello", "rank": rank, "pid": 1})


class FlakyListener(socket.socket):
    """A listening socket whose accept fails with ``errors`` (errno values) before it works again."""

    def __init__(self, errors):
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.bind(("127.0.0.1", 0))
        self.listen(16)
        self.errors = list(errors)

    def accept(self):
        if self.errors:
            code = self.errors.pop(0)
            time.sleep(0.01)
            raise OSError(code, "injected")
        return super().accept()


def test_transient_accept_errors_do_not_end_the_accept_loop():
    server = LinkServer(FlakyListener([errno.EMFILE] * 5 + [errno.ECONNABORTED, errno.ENFILE]))
    try:
        link = connect(server.address, server.authkey)
        hello(link)
        taken = server.take(timeout=10.0)
        assert taken is not None and taken[0]["rank"] == 0, "a worker could not join after transient accept errors"
        assert server.failure is None
        link.close()
        taken[1].close()
    finally:
        server.close()


def test_running_out_of_file_descriptors_then_recovering(tmp_path):
    """The real thing, in a child with a low RLIMIT_NOFILE: junk connections exhaust the descriptors (EMFILE in
    accept), go away, and a real worker can still join."""
    script = textwrap.dedent("""
        import os, resource, socket, time
        from video_offload.offload.distributed.protocol import LinkServer, connect
        server = LinkServer()
        host, port = server.address.rsplit(":", 1)
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 24, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        junk = []
        for _ in range(200):
            try:
                junk.append(socket.create_connection((host, int(port)), timeout=1))
            except OSError:
                break
        time.sleep(1.0)  # the accept loop meets EMFILE now
        for s in junk:
            s.close()
        time.sleep(1.0)
        link = connect(server.address, server.authkey)
        link.send({"op": "hello", "rank": 0, "pid": os.getpid()})
        taken = server.take(timeout=10.0)
        print("JOINED" if taken else "NOT JOINED", len(junk), flush=True)
        server.close()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "JOINED" in result.stdout and "NOT JOINED" not in result.stdout, result.stdout + result.stderr[-3000:]


def test_silent_connections_are_bounded_and_expire():
    server = LinkServer(max_pending=8, handshake_timeout=1.0)
    host, port = server.address.rsplit(":", 1)
    junk = [socket.create_connection((host, int(port))) for _ in range(40)]  # connect, then say nothing
    try:
        time.sleep(0.5)
        assert server.pending <= 8, server.pending
        link = connect(server.address, server.authkey)  # a real worker still gets in
        hello(link)
        taken = server.take(timeout=10.0)
        assert taken is not None
        deadline = time.monotonic() + 5.0
        while server.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.pending == 0, "silent connections were not dropped after the handshake timeout"
        assert server.refused >= 40
        taken[1].close()
        link.close()
    finally:
        for s in junk:
            s.close()
        server.close()


def test_a_launch_fails_in_seconds_when_the_link_cannot_accept(monkeypatch):
    """Before: the accept thread died on EMFILE and the launch waited for the 300 s startup timeout."""
    from video_offload.offload.distributed import launcher, protocol
    from video_offload.offload.distributed.protocol import WorkerSpec
    from video_offload.offload.errors import WorkerError

    monkeypatch.setattr(protocol, "ACCEPT_FAILURE_S", 1.0)
    spec = WorkerSpec(family_module="offload.families.wan", spec_name="wan2.1-t2v", source="{}",
                      components=("transformer",), dtype="float32", num_gpus=2, device="cpu")
    runtime = launcher._Runtime(spec, None)
    runtime.server = LinkServer(FlakyListener([errno.EMFILE] * 10_000))
    runtime.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    outcome = {}

    def wait():
        started = time.monotonic()
        try:
            runtime._await_connections()
        except WorkerError as e:
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(20.0)
    try:
        assert not thread.is_alive(), "the launch waited for the startup timeout"
        assert outcome["seconds"] < 10.0
        assert "cannot accept the workers (accepting connections has failed" in str(outcome["error"])
        assert "EMFILE" in str(outcome["error"]) and "ulimit -n" in str(outcome["error"])
    finally:
        runtime.proc.kill()
        runtime.proc.wait()
        runtime.server.close()


# --------------------------------------------------------------------------------- 6. the control plane


OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list", "broadcast_object"}


def test_no_rank_exchanges_pickled_objects():
    offenders = []
    for path in (REPO_ROOT / "offload").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in OBJECT_COLLECTIVES:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.attr}")
    assert offenders == []


RANKS_SCRIPT = """
import os, pickle, sys
import torch, torch.distributed as dist
from video_offload.offload.distributed import plain_collectives as pc

rank, store_file, case = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", store=dist.FileStore(store_file, 2), rank=rank, world_size=2)
key = pc.control_key(b"launch secret")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo PWNED",))


try:
    if case == "plain":
        request = {"op": "call", "method": "sample", "payload": {"noise": torch.arange(6.0), "steps": 3}}
        got = pc.broadcast_plain(request if rank == 0 else None, src=0, key=key)
        gathered = pc.all_gather_plain({"rank": rank, "peak": 10 * rank}, key=key)
        print("GOT", rank, got["method"], got["payload"]["noise"].tolist(), [g["peak"] for g in gathered], flush=True)
    elif case == "forged":  # rank 0 does not hold this launch's secret
        pc.broadcast_plain({"op": "call", "method": "sample"}, src=0, key=pc.control_key(b"guess") if rank == 0 else key)
        print("ACCEPTED", rank, flush=True)
    elif case == "pickle":  # the bytes of a pickle that runs a command when loaded
        data = pickle.dumps(Payload())
        pc._sign = lambda key, _: pc.hmac.new(key, data, pc.hashlib.sha256).digest() + data if rank == 0 else None
        pc.broadcast_plain("ignored", src=0, key=key)
        print("ACCEPTED", rank, flush=True)
except pc.ControlPlaneError as e:
    print("REFUSED", rank, e, flush=True)
"""


@pytest.mark.parametrize("case", ["plain", "forged", "pickle"])
def test_control_messages_are_plain_and_authenticated(tmp_path, case):
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", RANKS_SCRIPT, str(rank), str(store), case],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    rank1 = outs[1][0]
    everything = "\n".join(o + e[-1500:] for o, e in outs)
    if case == "plain":
        assert "GOT 1 sample [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] [0, 10]" in rank1, everything
    elif case == "forged":
        assert "REFUSED 1 a control message from rank 0 failed authentication" in rank1, everything
    else:
        assert "REFUSED 1 a control message from rank 0 is not plain data" in rank1, everything
        assert "PWNED" not in everything
