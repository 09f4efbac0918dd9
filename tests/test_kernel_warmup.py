"""The DiT's GPU kernels compiled ahead, in the background (``core/background.py``, ``lean_block.lean_kernel_compile``).

What a user gets: the first denoising step on a machine that never ran the pack does not wait for Triton. That holds
only if the compile ahead asks for *every* kernel variant the real forward launches. Triton compiles one variant per
specialisation: the dtypes of the pointer arguments, their 16-byte alignment, and for each integer argument whether
it is 1 or a multiple of 16 (unless the kernel opts out, as ours do for the token count). On a CPU the kernels
cannot compile, so the tests record those specialisations: the compile ahead's (from meta tensors) and a real lean
forward's (the launches it asks for), and the second must be within the first. On a GPU the test counts Triton's
compiled kernels instead (``test_gpu_...``)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import pytest
import torch
from diffusers import WanTransformer3DModel

from video_offload.offload.core.background import BackgroundWork
from video_offload.offload.families.wan import pointwise
from video_offload.offload.families.wan.lean_block import apply_lean_blocks, lean_kernel_compile

pointwise_kernels = pytest.importorskip("video_offload.offload.families.wan.pointwise_kernels")


def tiny_dit(image_to_video: bool) -> WanTransformer3DModel:
    torch.manual_seed(0)
    extra = dict(image_dim=24, added_kv_proj_dim=64) if image_to_video else {}
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=36 if image_to_video else 16,
        out_channels=16, text_dim=24, freq_dim=32, ffn_dim=96, num_layers=2, rope_max_seq_len=32, **extra,
    )
    model = model.to(torch.bfloat16).eval()
    model.rope.float()  # as diffusers loads it (`_keep_in_fp32_modules`)
    return model


def _specialisation(kernel, args, meta) -> tuple:
    """What Triton compiles a variant for: per argument, a tensor's dtype and alignment, an integer's 1 / multiple
    of 16 / other - or nothing for an argument the kernel does not specialise on - and the compile-time constants."""
    skip = set(kernel.do_not_specialize)
    parts = []
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.dtype):  # the compile ahead passes dtypes (Triton's MockTensor: aligned)
            parts.append((str(value), True))
        elif isinstance(value, torch.Tensor):
            parts.append((str(value.dtype), value.data_ptr() % 16 == 0))
        elif name in skip:
            parts.append("any")
        else:
            parts.append("1" if value == 1 else "D" if value % 16 == 0 else "N")
    return (kernel.fn.__name__, tuple(parts), tuple(sorted(meta.items())))


class RecordingKernel:
    """Stands for a ``triton.jit`` kernel: records what a launch or a compile ahead would specialise on, and never
    runs (a launch leaves its output unwritten: the forward's numbers are not what these tests look at)."""

    def __init__(self, real, seen: dict):
        self.real, self.seen = real, seen

    def warmup(self, *args, grid, **meta):
        self.seen["compiled"].add(_specialisation(self.real, args, meta))

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.seen["launched"].add(_specialisation(self.real, args, meta))

        return launch


@pytest.fixture
def recorded(monkeypatch):
    seen = {"compiled": set(), "launched": set()}
    kernels = pointwise._Kernels(RecordingKernel(pointwise_kernels.rows, seen),
                                 RecordingKernel(pointwise_kernels.rotate, seen), lambda a, b: -(-a // b))
    monkeypatch.setattr(pointwise, "_kernels", lambda: kernels)
    return seen, kernels


@pytest.mark.parametrize("image_to_video, per_token", [(False, False), (True, False), (False, True)])
def test_the_compile_ahead_asks_for_every_kernel_variant_a_lean_forward_launches(recorded, monkeypatch, image_to_video,
                                                                                per_token):
    seen, kernels = recorded
    model = tiny_dit(image_to_video)
    lean_kernel_compile(dict(model.config), torch.bfloat16, torch.device("cpu"))()  # from the config alone
    assert {name for name, _, _ in seen["compiled"]} == {"rows", "rotate"}
    assert kernels.failed is None

    # A real forward, sliced unevenly (105 tokens in 48, 48 and 9: counts that are and are not multiples of 16),
    # with the kernels "launched" on CPU tensors as under Triton's interpreter (each launch recorded, not run).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from tests.test_lean_block import inputs

    kwargs = inputs(model, torch.bfloat16, per_token)
    apply_lean_blocks(list(model.blocks), 48)
    with torch.no_grad():
        model(**kwargs)
    assert kernels.failed is None
    assert seen["launched"], "the forward launched no kernel: nothing was checked"
    assert seen["launched"] <= seen["compiled"], seen["launched"] - seen["compiled"]


def test_the_token_count_is_not_a_specialisation():
    """Without this, a count that is a multiple of 16 and one that is not (the slices of one sequence) would be two
    compiles each, and no compile ahead could know which counts a run meets."""
    assert "tokens" in pointwise_kernels.rows.do_not_specialize
    assert "tokens" in pointwise_kernels.rotate.do_not_specialize


def test_compile_only_mode_is_scoped_to_its_thread(recorded):
    """A background compile must never turn the main thread's launches into compiles (they would leave outputs
    unwritten)."""
    seen, _ = recorded
    inside = threading.Event()
    release = threading.Event()

    def background():
        with pointwise.compiling_only():
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=background)
    thread.start()
    inside.wait(5)
    try:
        assert not pointwise._COMPILE_ONLY.get()
    finally:
        release.set()
        thread.join()


def test_a_warmup_runs_once_per_key_and_a_forward_waits_for_it():
    warmup = BackgroundWork()
    runs, prepared = [], []
    gate = threading.Event()

    def slow():
        gate.wait(5)
        runs.append(threading.current_thread().name)

    def prepare():
        prepared.append(threading.current_thread().name)  # in the caller's thread
        return slow

    assert warmup.start("dit", prepare, "GPU kernels")
    assert not warmup.start("dit", prepare, "GPU kernels")  # already running: not started twice
    threading.Timer(0.2, gate.set).start()
    waited = warmup.wait("dit")
    assert waited > 0.1 and len(runs) == 1 and runs[0].startswith("video-offload GPU kernels")
    assert prepared == [threading.current_thread().name]
    assert not warmup.start("dit", prepare, "GPU kernels")  # already ran
    assert warmup.wait("dit") == 0.0 and warmup.wait("never started") == 0.0
    assert "dit" in warmup.seconds


def test_a_failed_compile_is_logged_and_a_forward_does_not_wait_for_it(caplog):
    warmup = BackgroundWork()

    def broken():
        raise RuntimeError("no compiler here")

    warmup.start("dit", lambda: broken, "GPU kernels")
    deadline = time.time() + 5
    while warmup._threads["dit"].is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert warmup.wait("dit") == 0.0
    assert "no compiler here" in caplog.text and "they are done when needed" in caplog.text


def test_a_failed_preparation_is_logged_once_and_nothing_waits(caplog):
    warmup = BackgroundWork()
    calls = []

    def prepare():
        calls.append(1)
        raise ValueError("bad config")

    assert not warmup.start("dit", prepare, "GPU kernels")
    assert not warmup.start("dit", prepare, "GPU kernels")
    assert calls == [1] and warmup.wait("dit") == 0.0
    assert "bad config" in caplog.text


def test_a_compile_that_hangs_does_not_hang_the_run():
    warmup = BackgroundWork()
    release = threading.Event()
    warmup.start("dit", lambda: lambda: release.wait(10), "GPU kernels")
    started = time.perf_counter()
    warmup.wait("dit", timeout=0.2)
    assert time.perf_counter() - started < 2
    release.set()


GPU_CHILD = r"""
import torch
from video_offload.offload.families.wan import pointwise_kernels as pk
from video_offload.offload.families.wan.lean_block import apply_lean_blocks, lean_kernel_compile
from tests.test_kernel_warmup import tiny_dit
from tests.test_lean_block import inputs

def compiled():
    return sum(len(cache[0]) for k in (pk.rows, pk.rotate) for cache in k.device_caches.values())

for image_to_video, per_token in ((False, False), (True, False), (False, True)):
    model = tiny_dit(image_to_video)
    lean_kernel_compile(dict(model.config), torch.bfloat16, torch.device("cuda"))()  # from the config: nothing runs
    ahead = compiled()
    model = model.to("cuda")
    kwargs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs(model, torch.bfloat16, per_token).items()}
    with torch.no_grad():
        expected = model(**kwargs)[0]
        apply_lean_blocks(list(model.blocks), 40)
        lean = model(**kwargs)[0]
    assert torch.equal(lean, expected)
    print(image_to_video, per_token, ahead, compiled())
    assert ahead > 0 and compiled() == ahead, (ahead, compiled())
print("ok")
"""


@pytest.mark.gpu
def test_gpu_the_compile_ahead_leaves_nothing_for_the_first_forward_to_compile(tmp_path):
    """In a fresh process with an empty Triton cache: after ``lean_kernel_compile``, a lean forward of the tiny
    T2V, I2V and per-token-modulation models compiles no kernel of its own, and still equals diffusers' forward."""
    env = dict(__import__("os").environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    result = subprocess.run([sys.executable, "-c", GPU_CHILD], capture_output=True, text=True, env=env, timeout=600)
    print(result.stdout, result.stderr[-3000:])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok")


GPU_PIPELINE_CHILD = r"""
import logging, sys, threading
import triton
from video_offload import VideoGenerator
from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan

compiled_by = []

def record(*args, **kwargs):
    if "rows" in kwargs.get("repr", "") or "rotate" in kwargs.get("repr", ""):
        compiled_by.append(threading.current_thread().name)

class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

messages = Messages()
logging.getLogger("video_offload").addHandler(messages)
logging.getLogger("video_offload").setLevel(logging.INFO)
triton.knobs.runtime.jit_post_compile_hook = record
# 9,360 tokens (480x832x21) of a block whose feed-forward is wide enough that "on" slices it: the sliced forward,
# which launches the one-pass kernels, must run for the check below to mean anything
folder = build_tiny_wan(sys.argv[1], spec=TinyWanSpec(num_layers=2, num_attention_heads=8, attention_head_dim=64, ffn_dim=8192, rope_max_seq_len=64))
generator = VideoGenerator.from_pretrained(folder, precision="bfloat16", dit_activation_chunking="on")
generator.generate_video("a cat", height=480, width=832, num_frames=21, num_inference_steps=1, save_video=False)
assert any("token-wise steps run in chunks" in line for line in messages.lines), messages.lines
print(compiled_by)
assert compiled_by and all(name.startswith("video-offload GPU kernels") for name in compiled_by), compiled_by
running = [t.name for t in threading.enumerate() if t.name.startswith("video-offload")]
assert not running, running  # nothing of the run is left working once it has returned
print("ok")
"""


@pytest.mark.gpu
def test_gpu_a_run_finds_its_kernels_compiled_in_the_background(tmp_path):
    """The manager's part: through ``VideoGenerator`` with sliced blocks, on a fresh process and Triton cache, every
    one-pass kernel the run uses was compiled by the background warm-up, none by the sampling thread."""
    env = dict(__import__("os").environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    result = subprocess.run([sys.executable, "-c", GPU_PIPELINE_CHILD, str(tmp_path / "wan")], capture_output=True,
                            text=True, env=env, timeout=600)
    print(result.stdout, result.stderr[-3000:])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("chunking, started", [("auto", True), ("on", True), ("off", False)])
def test_placing_a_dit_starts_its_compile_from_the_model_files_config(tiny_t2v, recorded, monkeypatch, chunking,
                                                                       started):
    """The manager's wiring: on a CUDA device, placing the DiT starts one background compile keyed by the model,
    the DiT and its dtype, prepared from the config the model's files give (here a Diffusers folder); none when the
    blocks never run sliced (``dit_activation_chunking="off"``). The compile it prepares asks for the kernels."""
    from video_offload.offload import OffloadConfig, OffloadManager
    from video_offload.offload.config import Precision
    from video_offload.offload.pipeline.stages import load_model

    seen, _ = recorded
    manager = OffloadManager("cpu")
    model = load_model(manager, tiny_t2v, Precision(dit="bfloat16"))
    manager.device = torch.device("cuda")  # only to pass the manager's CUDA check: the compile is run below, here
    asked = []
    monkeypatch.setattr(manager.background, "start", lambda key, prepare, what: asked.append((key, prepare)))
    manager._warm_up_kernels(model, "transformer", OffloadConfig(dit_activation_chunking=chunking))
    assert bool(asked) == started
    if started:
        (key, prepare), = asked
        assert key == (model.source.identity, "transformer", torch.bfloat16, "cuda")
        compile_kernels = prepare()
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
            compile_kernels()
        assert {name for name, _, _ in seen["compiled"]} == {"rows", "rotate"}


def test_work_that_may_differ_per_run_starts_again_once_the_last_has_ended():
    """``once=False`` (a decode planned ahead for each run's budget): never two at a time for a key, but again
    after the last one ended."""
    work = BackgroundWork()
    gate, runs = threading.Event(), []
    assert work.start("plan", lambda: lambda: (gate.wait(5), runs.append(1)), "VAE decode tiles", once=False)
    assert not work.start("plan", lambda: lambda: runs.append(2), "VAE decode tiles", once=False)  # still running
    gate.set()
    work.wait("plan")
    assert work.start("plan", lambda: lambda: runs.append(3), "VAE decode tiles", once=False)
    work.wait("plan")
    assert runs == [1, 3]
    assert not work.start("plan", lambda: lambda: runs.append(4), "VAE decode tiles")  # once: it ran already


EXIT_CHILD = r"""
import threading
from video_offload.offload.core.background import BackgroundWork
import torch

work = BackgroundWork()
ran = []

def busy():
    x = torch.zeros(64)
    for _ in range(2000):
        x.add_(1)
    ran.append(threading.current_thread().name)
    print("done", flush=True)

work.start("busy", lambda: busy, "VAE decode tiles")
"""


def test_a_process_that_exits_while_work_runs_lets_it_end_first():
    """Background threads are daemons (work that hangs cannot keep a process alive), but a daemon still in PyTorch
    code when the interpreter exits can abort the process: an exiting process lets running work end, boundedly."""
    result = subprocess.run([sys.executable, "-c", EXIT_CHILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("done")
