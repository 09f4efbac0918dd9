"""Benchmark multi-GPU inference: the 1-GPU resident DiT against FSDP worker groups, with and without parallel compute.

One process. The 1-GPU row runs here (``from_pretrained`` straight onto GPU 0); every other row starts a worker
group through the pack's own launcher (torchrun, NCCL), exactly as ComfyUI and the CLI do. Rows, per GPU count N:

    resident          1 GPU, the whole DiT on the device (the reference for speed and for the output)
    fsdp              N GPUs, weights sharded by FSDP2, every rank computes the whole step (memory only)
    fsdp+parallel     N GPUs, FSDP2 + CFG split (+ Ulysses over the rest when N > 2)   <- what the pack uses
    fsdp+ulysses      N GPUs, FSDP2 + Ulysses sequence parallel over all N (optional row, --modes)
    fsdp+cpu_offload  fsdp+parallel with dit_cpu_offload=True (shards in pinned host memory)

Wan2.1 14B's shapes with random bf16 weights, written once to a Diffusers-format safetensors folder (shared with
bench/layerwise.py), so every rank's own-rows loading is exercised; 480x832x81 = 21x30x52 = 32,760 video tokens,
512 text tokens, guidance 5.0. What is timed: one denoising step = the conditional and the unconditional DiT
forward at batch 1 plus the scheduler step, ended by a device synchronisation; step 1 warms up (FSDP's lazy init,
kernel selection) and the median of the others is reported. Prints one JSON object per row; with $OUT (or --out)
also writes them as JSON lines.

    python bench/multi_gpu.py                    # every visible GPU (2 or 4), ~6-8 minutes on H100s
    python bench/multi_gpu.py --gpus 2,4         # both counts on a 4-GPU machine
    python bench/multi_gpu.py --tiny             # seconds, on CPU with gloo: smoke test of every code path
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# The package must be importable: `pip install -e .` here, `bench/on_device.sh` on the device machine.

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layerwise import CONFIGS, write_random_weights  # noqa: E402  (the same weights folder as the layerwise bench)

from video_offload.offload.config import OffloadConfig, Precision, SamplingParams  # noqa: E402
from video_offload.offload.core.denoise import Conditioning, denoise, guided_prediction, initial_noise, make_scheduler  # noqa: E402
from video_offload.offload.core.manager import OffloadManager  # noqa: E402
from video_offload.offload.core.spec import LatentSpace  # noqa: E402
from video_offload.offload.distributed.launcher import WorkerGroup, spec_for  # noqa: E402
from video_offload.offload.distributed.sampling import sample_payload  # noqa: E402
from video_offload.offload.families.wan.spec import WAN21_T2V  # noqa: E402
from video_offload.offload.weights.diffusers_folder import DiffusersFolder  # noqa: E402

GiB = 2**30
MODES = ("resident", "fsdp", "fsdp+parallel", "fsdp+cpu_offload")
EXTRA_MODES = ("fsdp+ulysses",)
GROUP_MODES = {  # mode -> (parallel, dit_cpu_offload)
    "fsdp": ("none", False),
    "fsdp+parallel": ("auto", False),
    "fsdp+ulysses": ("ulysses", False),
    "fsdp+cpu_offload": ("auto", True),
}
SCHEDULER = ("UniPCMultistepScheduler", {
    "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
})
TIMED = ("one denoising step: conditional + unconditional DiT forward (batch 1, guidance 5.0) + scheduler step, "
         "synchronised; median over steps 2..N (step 1 warms up)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default=None, help="comma list of GPU counts (default: all visible GPUs)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES + EXTRA_MODES))
    p.add_argument("--steps", type=int, default=4, help="denoising steps per row (the first warms up)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--workdir", default="/tmp/video-offload-bench", help="where the random-weight folder is written")
    p.add_argument("--out", default=None, help="also write rows here as JSON lines (default: $OUT/multi_gpu.jsonl)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU with gloo, 2 ranks: a smoke test")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in MODES + EXTRA_MODES:
            p.error(f"unknown mode {mode!r}; choose from {', '.join(MODES + EXTRA_MODES)}")
    if "resident" not in args.modes:
        p.error("the resident row is the reference for speed and output; keep it in --modes")
    args.modes = ["resident"] + [m for m in args.modes if m != "resident"]
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step warms up)")
    if args.tiny:
        args.config, args.device, args.dtype = "tiny", "cpu", torch.float32
        args.height, args.width, args.frames = 64, 96, 9
        args.gpus = args.gpus or "2"
    else:
        if not torch.cuda.is_available():
            p.error("needs CUDA GPUs (use --tiny for the CPU smoke test)")
        args.config, args.device, args.dtype = "14B", "cuda", torch.bfloat16
        args.gpus = args.gpus or str(torch.cuda.device_count())
    args.gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    if any(g < 2 for g in args.gpus):
        p.error("--gpus: each count must be 2 or more (the 1-GPU row is always run)")
    if args.device == "cuda" and max(args.gpus) > torch.cuda.device_count():
        p.error(f"--gpus {max(args.gpus)}: only {torch.cuda.device_count()} GPUs are visible")
    return args


class StepTimer:
    """The same step boundaries as the workers' lockstep observer: start after the previous step, stop synced."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: list[float] = []
        self._started = 0.0

    def before_step(self, index: int, total: int) -> None:
        self._started = time.perf_counter()

    def after_step(self, index: int, total: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._started)


def make_inputs(config: dict, args) -> tuple[Conditioning, SamplingParams, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = [torch.randn(1, 512, config["text_dim"], generator=generator).to(args.dtype) for _ in range(2)]
    params = SamplingParams(height=args.height, width=args.width, num_frames=args.frames,
                            num_inference_steps=args.steps, guidance_scale=5.0, flow_shift=3.0, seed=0)
    space = LatentSpace(channels=config["in_channels"], temporal_factor=4, spatial_factor=8, patch=config["patch_size"])
    return Conditioning(text[0], text[1]), params, initial_noise(params, space)


def model_root(folder: Path) -> DiffusersFolder:
    """A model folder around the DiT's weights folder (index, scheduler, the DiT linked in): what workers reopen."""
    root = folder.parent / f"{folder.name}-model"
    root.mkdir(parents=True, exist_ok=True)
    link = root / "transformer"
    if not link.exists():
        link.symlink_to(folder.resolve(), target_is_directory=True)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": SCHEDULER[0], **SCHEDULER[1]}))
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "scheduler": ["diffusers", SCHEDULER[0]]}
    (root / "model_index.json").write_text(json.dumps(index))
    return DiffusersFolder(root, index)


def run_resident(folder: Path, conditioning, params, noise, args) -> tuple[dict, torch.Tensor]:
    """The 1-GPU reference: diffusers' from_pretrained onto one device, the pack's own denoising loop."""
    from diffusers import WanTransformer3DModel

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    started = time.perf_counter()
    model = WanTransformer3DModel.from_pretrained(str(folder), dtype=args.dtype, device_map={"": str(device)})
    model = model.eval().requires_grad_(False)
    load_s = time.perf_counter() - started
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    predictor = WAN21_T2V.stages.noise_predictor(model, conditioning, device, args.dtype)
    scheduler = make_scheduler(WAN21_T2V.component("scheduler").resolve, *SCHEDULER, None)

    def predict(index, latents, t):
        return guided_prediction(predictor, latents, t, params.guidance_scale)

    latents = denoise(predict, scheduler, params, noise, device, timer)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    predictor = model = None  # free the device before the groups start
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row = {"mode": "resident", "gpus": 1, "plan": "one GPU, whole DiT resident", "load_s": round(load_s, 1),
           "step_seconds": timer.seconds, "peak_vram_gib": [peak / GiB], "weight_gib_per_gpu": [weight_bytes / GiB]}
    return row, latents


def run_group(mode: str, gpus: int, folder: Path, conditioning, params, noise, args) -> tuple[dict, torch.Tensor]:
    import dataclasses

    parallel, cpu_offload = GROUP_MODES[mode]
    model = OffloadManager(args.device).register(model_root(folder), WAN21_T2V, Precision(dit=str(args.dtype)[6:]))
    config = OffloadConfig(num_gpus=gpus, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=cpu_offload)
    spec = dataclasses.replace(spec_for(model, config, parallel), pin_cpu_memory=True, device=args.device)
    started = time.perf_counter()
    group = WorkerGroup.launch(spec)
    try:
        start_s = time.perf_counter() - started
        payload = sample_payload(conditioning, params, SCHEDULER, noise)
        latents = group.call("sample", payload, total_steps=params.num_inference_steps)["latents"]
        info, stats = group.info, group.last_stats
    finally:
        group.shutdown()
    total, block = info["total_bytes"], info["block_bytes"]
    device_weights = info["device_bytes"] if args.device == "cuda" else info["weight_bytes"]
    row = {
        "mode": mode, "gpus": gpus, "plan": info["plan"], "load_s": round(start_s, 1),
        "step_seconds": stats["step_seconds"],
        "peak_vram_gib": [b / GiB for b in stats["peak_bytes"]],
        "weight_gib_per_gpu": [b / GiB for b in device_weights],
        "host_shard_gib_per_rank": [b / GiB for b in info["weight_bytes"]] if cpu_offload else None,
        "dit_gib": total / GiB,
        "block_gib": block / GiB,
        # Target: the weights a GPU keeps between blocks are at most its 1/N share plus one block.
        "weights_within_share_plus_block": max(device_weights) <= total / gpus + block,
    }
    return row, latents


def finish(row: dict, latents: torch.Tensor, reference: torch.Tensor | None, resident_s: float | None) -> dict:
    timed = row["step_seconds"][1:]
    row["s_per_step"] = statistics.median(timed)
    row["speedup_vs_resident"] = None if resident_s is None else resident_s / row["s_per_step"]
    row["finite"] = bool(torch.isfinite(latents).all())
    if reference is not None:
        diff = (latents.float() - reference.float()).abs()
        scale = reference.float().abs().max().clamp_min(1e-12)
        row["max_abs_diff_vs_resident"] = float(diff.max())
        row["rel_max_diff_vs_resident"] = float(diff.max() / scale)
        row["rel_l2_diff_vs_resident"] = float((latents.float() - reference.float()).norm() / reference.float().norm())
    row["step_seconds"] = [round(s, 4) for s in row["step_seconds"]]
    for key in ("peak_vram_gib", "weight_gib_per_gpu", "host_shard_gib_per_rank"):
        if row.get(key) is not None:
            row[key] = [round(v, 3) for v in row[key]]
    return row


def emit(row: dict, out_file) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out_file is not None:
        out_file.write(line + "\n")
        out_file.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # one thread per process, as torchrun gives each CPU worker: comparable rows
    logging.basicConfig(level=logging.INFO, format="# %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    out_path = args.out or (str(Path(os.environ["OUT"]) / "multi_gpu.jsonl") if os.environ.get("OUT") else None)
    out_file = open(out_path, "w") if out_path else None  # noqa: SIM115 - closed below
    config = CONFIGS[args.config]
    folder = Path(args.workdir) / f"wan-{args.config}"
    dtype_for_files = torch.bfloat16 if args.dtype == torch.bfloat16 else torch.float32
    write_s = write_random_weights(args.config, config, folder, dtype_for_files)
    conditioning, params, noise = make_inputs(config, args)
    tokens = noise.shape[2] * (args.height // 16) * (args.width // 16)
    emit({"bench": "multi_gpu", "config": args.config, "video": f"{args.height}x{args.width}x{args.frames}",
          "tokens": tokens, "timed": TIMED, "torch": torch.__version__, "python": platform.python_version(),
          "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (gloo)",
          "gpus_visible": torch.cuda.device_count() if args.device == "cuda" else 0,
          "weights_written_s": round(write_s, 1)}, out_file)
    failures = 0
    row, reference = run_resident(folder, conditioning, params, noise, args)
    row = finish(row, reference, None, None)
    resident_s = row["s_per_step"]
    emit(row, out_file)
    for gpus in args.gpus:
        for mode in args.modes[1:]:
            try:
                row, latents = run_group(mode, gpus, folder, conditioning, params, noise, args)
            except Exception as e:  # noqa: BLE001 - one failed row must not hide the others
                failures += 1
                emit({"mode": mode, "gpus": gpus, "error": f"{type(e).__name__}: {e}"[:4000]}, out_file)
                continue
            emit(finish(row, latents, reference, resident_s), out_file)
    if out_file is not None:
        out_file.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
