"""Multi-GPU inference through the real torchrun launcher, on the CPU with gloo.

Most tests here start real ``torchrun`` worker groups (two CPU processes each), so they are marked slow; groups are
reused across tests the way ComfyUI reuses them (its output cache keeps the model, the model keeps its group).
The workflow tests load the pack from a copy in a folder named like a ComfyUI install (``video-offload``, not an
importable name), so the workers' bootstrap path is the one ComfyUI users get.
"""

from __future__ import annotations

import json
import multiprocessing.connection as mpc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
import torch

from comfy_executor import REPO_ROOT, execute, load_pack, make_folder_paths
from test_workflows import FakeComfy

pytestmark = pytest.mark.slow

WORKFLOW = REPO_ROOT / "workflows" / "api" / "wan2.1_t2v_diffusers_folder.json"
SIZES = {"width": 96, "height": 64, "num_frames": 9, "steps": 3}


def _process_gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts: it runs nothing and holds no memory)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if not _process_gone(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if not _process_gone(pid)]


@pytest.fixture(scope="module")
def comfy(tiny_t2v, tmp_path_factory):
    """The pack as ComfyUI loads it, from ``custom_nodes/video-offload``, with the tiny model under the workflow's
    model name. ``env.keep`` holds the last run's outputs, as ComfyUI's output cache does."""
    root = tmp_path_factory.mktemp("comfyui-multi-gpu")
    pack_dir = root / "custom_nodes" / "video-offload"
    shutil.copytree(
        REPO_ROOT, pack_dir,
        ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "tests", "bench", "docs", ".ci"),
    )
    models, output = root / "models" / "diffusers", root / "output"
    prompt = json.loads(WORKFLOW.read_text())
    model_name = next(n for n in prompt.values() if n["class_type"] == "VideoOffloadLoadModel")["inputs"]["model_name"]
    shutil.copytree(tiny_t2v, models / model_name)
    fake = FakeComfy()
    pack = load_pack(pack_dir, make_folder_paths(models, output), fake.modules())
    env = types.SimpleNamespace(pack=pack, fake=fake, keep=None)
    yield env
    env.keep = None
    pack.nodes._host.shared_manager().release_all()


def workflow(num_gpus: int, dit_cpu_offload: bool = False) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "VideoOffloadSample":
            inputs.update(SIZES)
        elif node["class_type"] == "VideoOffloadLoadModel":
            inputs["precision"] = "float32"
        elif node["class_type"] == "VideoOffloadSettings":
            inputs.update(
                auto_offload=False, num_gpus=num_gpus, use_fsdp_inference=num_gpus > 1, dit_layerwise_offload=False,
                dit_cpu_offload=dit_cpu_offload,
            )
    return prompt


def run(env, prompt: dict) -> torch.Tensor:
    with torch.inference_mode():  # as ComfyUI runs every node
        results = execute(prompt, env.pack.NODE_CLASS_MAPPINGS)
    env.keep = results  # ComfyUI's cache: keeps the model, hence its worker group, alive between runs
    decode_id = next(k for k, v in prompt.items() if v["class_type"] == "VideoOffloadDecodeVAE")
    return results[decode_id][0]


def worker_group(env):
    groups = [m.resources.worker_group for m in env.pack.nodes._host.shared_manager().models()]
    groups = [g for g in groups if g is not None]
    assert len(groups) == 1
    return groups[0]


@pytest.fixture(scope="module")
def single_process_frames(comfy):
    return run(comfy, workflow(num_gpus=1)).numpy()


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("dit_cpu_offload", [False, True], ids=["fsdp", "fsdp+cpu_offload"])
def test_two_rank_workflow_matches_single_process(comfy, single_process_frames, dit_cpu_offload):
    comfy.fake.progress.clear()
    frames = run(comfy, workflow(num_gpus=2, dit_cpu_offload=dit_cpu_offload)).numpy()
    assert frames.shape == single_process_frames.shape
    assert np.abs(frames - single_process_frames).max() <= 1e-5
    steps = SIZES["steps"]
    assert comfy.fake.progress == [(i, steps) for i in range(1, steps + 1)]  # the bar advanced once per step
    group = worker_group(comfy)
    assert group.spec.dit_cpu_offload is dit_cpu_offload  # the option change restarted the group
    assert group.info["plan"] == "FSDP over 2 ranks; CFG split in 2"
    weight_bytes, total = group.info["weight_bytes"], group.info["total_bytes"]
    assert max(weight_bytes) <= total / 2 + group.info["block_bytes"]  # each rank holds about half of the DiT
    # Where each rank's shards live, as FSDP holds them: host memory under FSDP's CPU offload policy exactly when
    # dit_cpu_offload is on (on this CPU-only machine the compute device is the CPU too, so the policy tells).
    policy = "CPUOffloadPolicy" if dit_cpu_offload else "OffloadPolicy"
    assert group.info["placement"] == [{"transformer": {"shard_devices": ["cpu"], "offload_policy": policy,
                                                        "pinned": False}}] * 2


def test_group_is_reused_while_options_are_unchanged(comfy, single_process_frames):
    run(comfy, workflow(num_gpus=2, dit_cpu_offload=True))
    first = worker_group(comfy).torchrun_pid
    frames = run(comfy, workflow(num_gpus=2, dit_cpu_offload=True)).numpy()
    assert worker_group(comfy).torchrun_pid == first
    assert np.abs(frames - single_process_frames).max() <= 1e-5


def test_interrupt_stops_the_workers_between_steps_and_the_group_stays(comfy, single_process_frames):
    prompt = workflow(num_gpus=2, dit_cpu_offload=True)
    run(comfy, prompt)
    group = worker_group(comfy)
    comfy.fake.calls = 0
    comfy.fake.interrupt_at_call = 2  # ComfyUI's Cancel, noticed before the second denoising step
    comfy.fake.progress.clear()
    with pytest.raises(comfy.fake.Interrupt):
        execute(prompt, comfy.pack.NODE_CLASS_MAPPINGS)
    assert comfy.fake.progress == [(1, SIZES["steps"])]  # the workers ran exactly one step
    assert group.alive and worker_group(comfy) is group
    frames = run(comfy, prompt).numpy()
    assert worker_group(comfy).torchrun_pid == group.torchrun_pid
    assert np.abs(frames - single_process_frames).max() <= 1e-5


# ---------------------------------------------------------------- failures


def test_a_rank_killed_mid_run_is_a_clear_error_and_the_next_run_starts_fresh(comfy, single_process_frames):
    prompt = workflow(num_gpus=2, dit_cpu_offload=True)
    run(comfy, prompt)
    group = worker_group(comfy)
    victim = group.pids[1]
    killed_at = []

    class KillRankOneAfterFirstStep:
        def __init__(self, total, node_id=None):
            pass

        def update_absolute(self, value, total=None, preview=None):
            if value == 1:
                os.kill(victim, signal.SIGKILL)
                killed_at.append(time.monotonic())

    progress_bar = comfy.fake.utils.ProgressBar
    comfy.fake.utils.ProgressBar = KillRankOneAfterFirstStep
    try:
        with pytest.raises(comfy.pack.offload.WorkerError, match=r"rank 1 \(pid \d+\) died during step 2 of 3") as error:
            execute(prompt, comfy.pack.NODE_CLASS_MAPPINGS)
    finally:
        comfy.fake.utils.ProgressBar = progress_bar
    assert time.monotonic() - killed_at[0] < 5.0
    assert error.value.rank == 1
    assert "next run starts a fresh one" in str(error.value)
    assert not group.alive
    assert _wait_gone([group.torchrun_pid, *group.pids.values()], 5.0) == []

    frames = run(comfy, prompt).numpy()
    fresh = worker_group(comfy)
    assert fresh is not group and fresh.alive and fresh.torchrun_pid != group.torchrun_pid
    assert np.abs(frames - single_process_frames).max() <= 1e-5


def test_a_worker_exception_arrives_with_the_workers_traceback(comfy):
    run(comfy, workflow(num_gpus=2, dit_cpu_offload=True))
    group = worker_group(comfy)
    import importlib

    offload = comfy.pack.offload
    denoise = importlib.import_module(f"{offload.__name__}.core.denoise")
    sampling = importlib.import_module(f"{offload.__name__}.distributed.sampling")
    bad = denoise.Conditioning(torch.zeros(1, 512, 7), torch.zeros(1, 512, 7))  # text_dim is 32
    params = offload.SamplingParams(height=64, width=96, num_frames=9, num_inference_steps=2)
    noise = torch.randn(1, 16, 3, 8, 12)
    payload = sampling.sample_payload(bad, params, ("UniPCMultistepScheduler", {}), noise)
    with pytest.raises(offload.WorkerError, match="failed during step 1 of 2: RuntimeError: mat1 and mat2") as error:
        group.call("sample", payload, total_steps=2)
    assert error.value.remote_traceback and "transformer_wan.py" in error.value.remote_traceback
    assert not group.alive


def test_image_to_video_through_the_group_matches_single_process(tiny_i2v, start_image):
    """I2V adds the image embedding (its own cross-attention keys) and the first-frame latents to every pass."""
    from video_offload import VideoGenerator

    sizes = dict(height=64, width=96, num_frames=9, num_inference_steps=2)
    single = VideoGenerator.from_pretrained(tiny_i2v, precision="float32", dit_layerwise_offload=False)
    expected = single.generate_video("a cat", negative_prompt="blurry", image=start_image, seed=4, save_video=False, **sizes)
    multi = VideoGenerator.from_pretrained(
        tiny_i2v, num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=False,
        precision="float32",
    )
    try:
        frames = multi.generate_video("a cat", negative_prompt="blurry", image=start_image, seed=4, save_video=False, **sizes)
        placements = {r.component: (r.placement.name, r.device) for r in multi.report()}
    finally:
        multi.shutdown()
    assert np.abs(frames - expected).max() <= 1e-5
    assert placements["transformer"] == ("FSDP", "workers")
    assert "transformer" not in {r.component for r in multi.report()}  # stopped with the group


# ---------------------------------------------------------- launcher direct


@pytest.fixture(scope="module")
def tiny_parts(tiny_t2v):
    """What a run needs besides the group: the model, conditioning, params, noise and the single-process latents."""
    from video_offload.offload.config import OffloadConfig, Precision, SamplingParams
    from video_offload.offload.core.denoise import denoise, guided_prediction, initial_noise, make_scheduler
    from video_offload.offload.core.manager import OffloadManager
    from video_offload.offload.pipeline.stages import encode_prompts, latent_space, load_model

    manager = OffloadManager("cpu")
    model = load_model(manager, tiny_t2v, Precision(dit="float32"))
    config = OffloadConfig(dit_layerwise_offload=False)
    conditioning = encode_prompts(manager, model, config, "a raccoon in sunflowers", "blurry")
    params = SamplingParams(height=64, width=96, num_frames=9, num_inference_steps=3, seed=7)
    scheduler = manager.component(model, "scheduler")
    noise = initial_noise(params, latent_space(model))
    # The bfloat16 reference: diffusers' from_pretrained(dtype=bfloat16) keeps _keep_in_fp32_modules in float32,
    # so each sharded block mixes bf16 and fp32 parameters, as the real 14B does on GPUs.
    bf16_model = load_model(manager, tiny_t2v, Precision(dit="bfloat16"))
    transformer = manager.component(bf16_model, "transformer")
    predictor = model.spec.stages.noise_predictor(transformer, conditioning, torch.device("cpu"), torch.bfloat16)

    def predict(index, latents, t):
        return guided_prediction(predictor, latents, t, params.guidance_scale)

    resolve = model.spec.component("scheduler").resolve
    reference_bf16 = denoise(predict, make_scheduler(resolve, *scheduler, params.flow_shift), params, noise,
                             torch.device("cpu"))
    return types.SimpleNamespace(
        model=bf16_model, conditioning=conditioning, params=params, noise=noise, reference_bf16=reference_bf16,
        scheduler=scheduler, predictor_for=model.spec.stages.noise_predictor, resolve=resolve,
    )


def group_spec(parts, num_gpus, **options):
    """The worker spec for the tiny bfloat16 model (``spec_for``, as the manager builds it), with ``options``."""
    import dataclasses

    from video_offload.offload.config import OffloadConfig
    from video_offload.offload.distributed.launcher import spec_for

    config = OffloadConfig(num_gpus=num_gpus, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=False)
    spec = spec_for(parts.model, config)
    return dataclasses.replace(spec, **{"device": "cpu", **options})


def sample(group, parts, params=None, noise=None, observer=None):
    from video_offload.offload.distributed.sampling import sample_payload

    params = params or parts.params
    payload = sample_payload(parts.conditioning, params, parts.scheduler, parts.noise if noise is None else noise)
    return group.call("sample", payload, observer, total_steps=params.num_inference_steps)["latents"]


def test_ulysses_in_bfloat16_matches_and_a_hung_rank_is_caught(tiny_parts):
    from video_offload.offload.distributed.launcher import WorkerGroup
    from video_offload.offload.errors import WorkerError

    spec = group_spec(tiny_parts, 2, parallel="ulysses", dit_cpu_offload=True, heartbeat_interval_s=0.5,
                      heartbeat_timeout_s=3.0)
    group = WorkerGroup.launch(spec)
    try:
        assert group.info["plan"] == "FSDP over 2 ranks; Ulysses sequence parallel over 2"
        latents = sample(group, tiny_parts)
        reference = tiny_parts.reference_bf16
        assert (latents - reference).abs().max() <= 1e-3 * reference.abs().max()  # bf16; equal on CPU in practice
        assert group.alive

        class StopRankOne:
            def before_step(self, index, total):
                if index == 1:
                    os.kill(group.pids[1], signal.SIGSTOP)  # alive but frozen: only the heartbeat can tell

            def after_step(self, index, total):
                pass

        started = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) sent nothing for \d+ s during step 2 of 3"):
            sample(group, tiny_parts, observer=StopRankOne())
        assert time.monotonic() - started < 3.0 + 4.0
    finally:
        group.shutdown()
    assert _wait_gone([group.torchrun_pid, *group.pids.values()], 5.0) == []


def test_a_video_whose_tokens_do_not_split_over_the_sequence_ranks_is_refused_before_sending():
    from video_offload.offload.core.spec import LatentSpace
    from video_offload.offload.distributed.fsdp import ParallelPlan
    from video_offload.offload.errors import ConfigError
    from video_offload.offload.pipeline.stages import check_sequence_split

    space = LatentSpace(channels=16, temporal_factor=4, spatial_factor=8, patch=(1, 2, 2))
    plan = ParallelPlan.choose(2, "ulysses")
    with pytest.raises(ConfigError, match=r"45 video tokens, which do not split evenly over 2 .*Fix: pick height and "
                                          r"width such that \(height/16\) x \(width/16\)"):
        check_sequence_split(plan, space, (1, 16, 3, 6, 10))  # 48x80, 9 frames: 3x3x5 tokens
    check_sequence_split(plan, space, (1, 16, 21, 60, 104))  # 480x832x81


def test_sequence_split_must_divide_the_heads_before_anything_starts(tiny_parts):
    from video_offload.offload.distributed.launcher import WorkerGroup
    from video_offload.offload.errors import ConfigError

    with pytest.raises(ConfigError, match="does not divide the model's 2 heads"):
        WorkerGroup.launch(group_spec(tiny_parts, 4, parallel="ulysses"), heads=2)


def test_orderly_shutdown_and_a_killed_parent_leave_no_processes(tiny_parts, tmp_path):
    spec = group_spec(tiny_parts, 2)
    parent = textwrap.dedent(f"""
        import json, time
        from video_offload.offload.distributed.launcher import WorkerGroup
        from video_offload.offload.distributed.protocol import WorkerSpec
        group = WorkerGroup.launch(WorkerSpec.from_json({spec.to_json()!r}))
        print(json.dumps([group.torchrun_pid, *group.pids.values()]), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 3 and not any(_process_gone(pid) for pid in pids)
    finally:
        proc.kill()  # SIGKILL: no atexit, no finalizer - the workers must notice on their own
        proc.wait()
    assert _wait_gone(pids, 8.0) == []


# -------------------------------------------------------------------- link


def test_the_link_is_loopback_only_and_refuses_a_wrong_key():
    from video_offload.offload.distributed.protocol import LinkServer, connect

    server = LinkServer()
    try:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        with pytest.raises(mpc.AuthenticationError):
            mpc.Client((host, int(port)), authkey=b"not the per-launch secret")
        good = connect(server.address, server.authkey)
        good.send({"op": "hello", "rank": 0, "pid": os.getpid(), "tensor": torch.arange(3)})
        hello, link = server.take(timeout=5.0)
        assert hello["rank"] == 0 and hello["tensor"].tolist() == [0, 1, 2]
        assert server.take(timeout=0.2) is None  # the refused client never became a link
        assert server.refused == 1
        link.close()
        good.close()
    finally:
        server.close()


def test_the_process_group_meets_in_a_private_file_and_the_tcp_store_holds_none_of_it(tiny_parts, caplog):
    """torchrun's store listens on every interface and PyTorch does not authenticate it: before, it held every
    rank's collective address (``default_pg/...``), readable and writable by any process. Now the group meets
    through a file in a 0700 folder, and CPU workers are announced as such."""
    import datetime
    import stat

    import torch.distributed as dist

    from video_offload.offload.distributed.launcher import WorkerGroup

    caplog.set_level("WARNING")
    group = WorkerGroup.launch(group_spec(tiny_parts, 2))
    try:
        assert "no CUDA device: num_gpus=2 starts 2 CPU worker processes (gloo)" in caplog.text
        folder = group._runtime.store_dir
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        environ = open(f"/proc/{group.pids[0]}/environ").read().split("\0")
        port = int(next(e for e in environ if e.startswith("MASTER_PORT=")).split("=", 1)[1])
        outsider = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
        assert [key for key in outsider.list_keys() if "pg" in key] == []
        latents = sample(group, tiny_parts)  # and the group works
        assert torch.isfinite(latents).all()
    finally:
        group.shutdown()
    assert not os.path.exists(folder)


def test_the_secret_is_not_on_the_command_line(tiny_parts):
    from video_offload.offload.distributed.launcher import torchrun_command

    command = " ".join(torchrun_command(group_spec(tiny_parts, 2)))
    assert "--standalone" in command and "--local-addr=127.0.0.1" in command
    assert "KEY" not in command and "authkey" not in command.lower()


# --------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "gpus, parallel, dit_cpu_offload",
    [(2, "auto", False), (2, "ulysses", False), (2, "auto", True), (2, "none", False), (4, "auto", False)],
)
def test_nccl_group_matches_one_gpu(tiny_parts, gpus, parallel, dit_cpu_offload):
    """The same paths on GPUs with NCCL, in bfloat16 (pinned host shards with CPU offload)."""
    from diffusers import WanTransformer3DModel

    from video_offload.offload.core.denoise import denoise, guided_prediction, make_scheduler
    from video_offload.offload.distributed.launcher import WorkerGroup

    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    device = torch.device("cuda", 0)
    folder = tiny_parts.model.source.component_path("transformer")
    model = WanTransformer3DModel.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    predictor = tiny_parts.predictor_for(model, tiny_parts.conditioning, device, torch.bfloat16)
    scheduler = make_scheduler(tiny_parts.resolve, *tiny_parts.scheduler, tiny_parts.params.flow_shift)
    scale = tiny_parts.params.guidance_scale
    def predict(index, latents, t):
        return guided_prediction(predictor, latents, t, scale)

    reference = denoise(predict, scheduler, tiny_parts.params, tiny_parts.noise, device)
    predictor = model = None  # free the single-GPU copy before the group takes the GPUs
    spec = group_spec(tiny_parts, gpus, parallel=parallel, dit_cpu_offload=dit_cpu_offload, device="cuda",
                      pin_cpu_memory=dit_cpu_offload)
    group = WorkerGroup.launch(spec)
    try:
        latents = sample(group, tiny_parts)
        assert all(b > 0 for b in group.last_stats["peak_bytes"])
        policy = "CPUOffloadPolicy" if dit_cpu_offload else "OffloadPolicy"
        devices = ["cpu"] if dit_cpu_offload else ["cuda"]
        for rank in group.info["placement"]:
            assert rank["transformer"]["offload_policy"] == policy and rank["transformer"]["shard_devices"] == devices
            assert rank["transformer"]["pinned"] is dit_cpu_offload
    finally:
        group.shutdown()
    assert (latents - reference).abs().max() <= 2e-2 * reference.abs().max()
    assert _wait_gone([group.torchrun_pid, *group.pids.values()], 10.0) == []
