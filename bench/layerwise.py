"""Benchmark layerwise DiT offload against the resident DiT and diffusers' group offloading.

One process; prints one JSON object per row and, with --out or $OUT, writes them as JSON lines. Per config (Wan2.1
1.3B and 14B shapes, random bf16 weights written once to a Diffusers-format safetensors folder) and per mode
(resident, ours with every block streamed, ours with resident_blocks="auto", diffusers group offloading at block
level with use_stream=True), each frame count is timed as warm-up forwards then timed forwards. One "step" is one
DiT forward at batch 1: classifier-free guidance would run two per denoising step.

Every row of ours is checked bit for bit against the resident output; the script exits 1 if any differs (after
writing every row), 2 if a mode failed for another reason.

Single files and the host-RAM budget (issue 11), extra modes:

- ``ours_stream_budget``: ours_stream with only ``--pin-fraction`` of the blocks page-locked (``max_pinned_bytes``),
  the rest streaming from pageable memory: what a smaller ``max_pinned_memory_gb`` costs. Bit-exact vs resident.
- ``resident_fp8_widened``, ``ours_fp8_stream``, ``ours_fp8_auto``: the same random weights written once as a
  Comfy-Org-style scaled-fp8 DiT file (``comfy_export``); resident widened (every fp8 weight times its scale, in
  bf16, the whole model on the GPU) is the bit-exactness reference of the fp8 rows, whose time is compared with the
  bf16 ``resident`` row (targets: <=1.02x at 17 frames, <=1.01x at 81; host arena <=0.55x the bf16 bytes).

LoRAs (issue 13), selected by ``--lora-rank R``: a random rank-R LoRA on every Linear layer, applied as the pack
applies LoRAs (``core.weight_patches``): ``ours_stream_lora`` merges it into each block's slot after the copy (and
``ours_fp8_stream_lora`` after the fp8 widening), ``resident_lora`` into the resident weights (the bit-exactness
reference of ``ours_stream_lora``); the Linear layers outside the blocks run it as a side path in both. Target: a
LoRA row's step at most 1.02x that of the same mode without the LoRA.

    python bench/layerwise.py                  # the full H100 run (1.3B and 14B, 81 and 17 frames)
    python bench/layerwise.py --configs 14B --frames 81 --lora-rank 64 --modes resident,ours_stream
    python bench/layerwise.py --tiny --lora-rank 4 --modes resident,ours_stream   # the LoRA path on the CPU
    python bench/layerwise.py --tiny           # seconds, on CPU or GPU: smoke test of every code path
    python bench/layerwise.py --configs 14B --frames 17,81 \
        --modes resident,resident_fp8_widened,ours_fp8_stream,ours_fp8_auto,ours_stream,ours_stream_budget

Wan2.2 A14B, two experts (issue 13): ``--configs a14b`` (``a14b-tiny`` on a CPU) runs a denoising-like sequence of
steps (two forwards each, CFG) that switches from the high-noise to the low-noise expert half way, resident (both
experts on the GPU) and streamed through one shared set of slots, with and without the prefetch of the next
expert's first blocks: ``bench/layerwise_a14b.py``.

    python bench/layerwise.py --configs a14b --frames 81,17
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# The package must be importable: `pip install -e .` here, `bench/on_device.sh` on the device machine.

from video_offload.offload.core import widen_kernel  # noqa: E402
from video_offload.offload.core.weight_patches import (  # noqa: E402
    LowRank,
    PatchFile,
    PatchSet,
    merge_into_resident,
)
from video_offload.offload.families.wan.comfy_export import export_transformer_folder  # noqa: E402
from video_offload.offload.families.wan.files import WanDitFormat  # noqa: E402
from video_offload.offload.families.wan.shapes import WAN_DIT, WAN_DIT_COMMON  # noqa: E402
from video_offload.offload.families.wan.ti2v import TI2V_5B_DIT, TI2V_CHANNELS  # noqa: E402
from video_offload.offload.weights.safetensors_file import read_header  # noqa: E402
from video_offload.offload.weights.streaming import layerwise_from_file, layerwise_from_pretrained  # noqa: E402
from video_offload.offload.weights.tensor_source import WEIGHTS_INDEX_NAME, folder_weight_files, load_whole  # noqa: E402

DEFAULT_WIDEN = (widen_kernel.WIDEN_PROGRAMS, widen_kernel.BLOCK, widen_kernel.WIDEN_WARPS)
"""The pack's widening (programs, elements per program, warps), before a mode's ``@P:B:W`` changes it."""

GiB = 2**30

CONFIGS = {
    **WAN_DIT,
    "ti2v-5B": TI2V_5B_DIT,
    # Heads of 128, as every Wan DiT: a single file says its width, not its head count (ComfyUI reads width / 128).
    "tiny": dict(WAN_DIT_COMMON, num_attention_heads=2, attention_head_dim=128, text_dim=32, ffn_dim=64, num_layers=6),
}
A14B_CONFIGS = {"a14b": "14B", "a14b-tiny": "tiny"}
"""Two experts of the named shape (random weights, the low-noise expert from another seed): bench/layerwise_a14b.py."""
CONFIGS["tiny-ti2v"] = dict(CONFIGS["tiny"], in_channels=TI2V_CHANNELS, out_channels=TI2V_CHANNELS)
MODES = ("resident", "ours_stream", "ours_auto", "diffusers_group")
FP8_MODES = ("resident_fp8_widened", "ours_fp8_stream", "ours_fp8_auto")
LORA_MODES = ("resident_lora", "ours_stream_lora", "ours_fp8_stream_lora")
"""Each is the mode without ``_lora`` plus a random LoRA (``--lora-rank``); timed against that mode's row."""
EXTRA_MODES = ("ours_stream_pageable", "ours_stream_budget") + FP8_MODES + LORA_MODES
REFERENCE_MODES = ("resident", "resident_fp8_widened", "resident_lora")
TIMED = (
    "one DiT forward at batch 1 (classifier-free guidance runs two per denoising step); forwards back to back, "
    "s_per_step from CUDA events on the compute stream (median), s_per_step_wall = host time / forwards"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default="1.3B,14B", help="comma list of: " + ", ".join((*CONFIGS, *A14B_CONFIGS)))
    p.add_argument("--a14b-steps", type=int, default=6, help="a14b: denoising steps (the switch is half way)")
    p.add_argument("--a14b-one-folder", action="store_true",
                   help="a14b: both experts read the same random weights (half the disk: 28.6 GB instead of 57 GB); "
                        "they still have separate host copies and offloaders")
    p.add_argument("--frames", default="81,17", help="comma list of video frame counts (4k+1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES + EXTRA_MODES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per row (the median is reported)")
    p.add_argument("--prefetch-depth", type=int, default=1)
    p.add_argument("--pin-fraction", type=float, default=0.5,
                   help="ours_stream_budget: the share of the blocks' host bytes that may be page-locked")
    p.add_argument("--workdir", default="/tmp/video-offload-bench", help="where the random-weight folders are written")
    p.add_argument("--out", default=None, help="also write the rows here as JSON lines (default: $OUT/layerwise.jsonl)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model, 64x64, 5 and 9 frames: a CPU smoke test")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="add rows with a random LoRA of this rank on every Linear (resident_lora and ours_stream_lora "
                        "next to the resident and ours_stream modes asked for; ours_fp8_stream_lora with "
                        "ours_fp8_stream)")
    args = p.parse_args(argv)
    if args.tiny:
        tiny = "a14b-tiny" if "a14b" in args.configs else "tiny"  # --configs a14b --tiny: the two-expert rows
        args.configs, args.frames, args.height, args.width, args.text_tokens = tiny, "9,5", 64, 64, 16
        args.warmup, args.repeats = 1, 3
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.frames = [int(f) for f in args.frames.split(",") if f.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for c in args.configs:
        if c not in CONFIGS and c not in A14B_CONFIGS:
            p.error(f"unknown config {c!r}; choose from {', '.join((*CONFIGS, *A14B_CONFIGS))}")
    if any(c in A14B_CONFIGS for c in args.configs) and args.a14b_steps < 4:
        p.error("--a14b-steps: at least 4 (a switch with a step on each side of it)")
    for m in args.modes:
        if m.partition("@")[0] not in MODES + EXTRA_MODES or (m.partition("@")[2] and not m.startswith("ours_fp8")):
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES + EXTRA_MODES)}")
    for f in args.frames:
        if f % 4 != 1:
            p.error(f"--frames {f}: must be of the form 4k+1")
    if args.lora_rank < 0:
        p.error("--lora-rank must be at least 1 (0: no LoRA rows)")
    if args.lora_rank:
        args.modes += [m + "_lora" for m in list(args.modes) if m + "_lora" in LORA_MODES and m + "_lora" not in args.modes]
    elif any(m in LORA_MODES for m in args.modes):
        p.error("the *_lora modes need --lora-rank")
    # Each LoRA row after the row of its mode without the LoRA, which it is timed against.
    args.modes = [m for m in args.modes if m not in LORA_MODES] + [m for m in args.modes if m in LORA_MODES]
    # The references first (bf16 resident, then the fp8 file widened), so every other row can be compared with them.
    args.modes = [m for m in REFERENCE_MODES if m in args.modes] + [m for m in args.modes if m not in REFERENCE_MODES]
    return args


# ------------------------------------------------------------------------------------------------ measurement


def host_memory() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmLck", "VmPin"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_h2d(device: torch.device, nbytes: int = GiB, repeats: int = 5) -> dict[str, float | None]:
    """Host-to-device copy bandwidth in GB/s (1e9 bytes/s), pinned and pageable, median of ``repeats``."""
    if device.type != "cuda":
        return {"h2d_pinned_gbps": None, "h2d_pageable_gbps": None}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    result = {}
    for name, pin in (("h2d_pinned_gbps", True), ("h2d_pageable_gbps", False)):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        src.fill_(1)
        times = []
        for _ in range(repeats + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=pin)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        result[name] = round(nbytes / statistics.median(times[1:]) / 1e9, 2)
        del src
    del dst
    torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ weights


def write_random_weights(
    name: str, config: dict, folder: Path, dtype: torch.dtype, shard_bytes: int = 2 * GiB, seed: int = 0
) -> float:
    """Write a Diffusers-format folder with random weights, shard by shard (host memory: one shard + a pool).

    Values are N(0, 0.02) tiled from a seeded pool (fast: a memcpy per tensor, no per-element RNG); dtypes follow
    from_pretrained(dtype=...)'s rule (``_keep_in_fp32_modules`` in float32). Returns seconds; 0 when reused.
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    marker = folder / "complete.json"
    stamp = {"config": config, "dtype": str(dtype), **({"seed": seed} if seed else {})}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(stamp)):
        return 0.0
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    model.save_config(str(folder))
    keep = WanTransformer3DModel._keep_in_fp32_modules or []
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2**24 + 4099, generator=gen) * 0.02).to(dtype)
    pool32 = pool.float()
    weight_map, shard, shard_size, index = {}, {}, 0, 0
    total = 0
    names = list(model.state_dict().items())

    def flush():
        nonlocal shard, shard_size, index
        if shard:
            file_name = f"diffusion_pytorch_model-{index:05d}.safetensors"
            save_file(shard, str(folder / file_name))
            for key in shard:
                weight_map[key] = file_name
            index += 1
            shard, shard_size = {}, 0

    for i, (key, meta) in enumerate(names):
        t_dtype = torch.float32 if any(k in key.split(".") for k in keep) else dtype
        source = pool32 if t_dtype == torch.float32 else pool
        t = torch.empty(meta.shape, dtype=t_dtype)
        flat = t.view(-1)
        offset = (i * 7919) % 4099
        pos = 0
        while pos < flat.numel():
            n = min(flat.numel() - pos, source.numel() - offset)
            flat[pos : pos + n].copy_(source[offset : offset + n])
            pos += n
            offset = 0
        nbytes = t.numel() * t.element_size()
        if shard and shard_size + nbytes > shard_bytes:
            flush()
        shard[key] = t
        shard_size += nbytes
        total += nbytes
    flush()
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    marker.write_text(json.dumps(stamp))
    seconds = time.perf_counter() - start
    print(f"# {name}: wrote {total / GiB:.2f} GiB of random weights to {folder} in {seconds:.1f} s", file=sys.stderr)
    return seconds


# ------------------------------------------------------------------------------------------------ modes


class Setup:
    """A model ready to run in one mode, and how to tear it down."""

    def __init__(self, model, offloader=None, pinned_bytes=0, info=None):
        self.model = model
        self.offloader = offloader
        self.pinned_bytes = pinned_bytes
        self.info = info or {}

    def close(self):
        side = self.info.pop("side_paths", None)
        if side is not None:
            side.remove()
        if self.offloader is not None:
            self.offloader.close()
        self.model = self.offloader = None


def fp8_file_for(name: str, folder: Path) -> tuple[Path, float]:
    """The same random weights as one Comfy-Org-style scaled-fp8 DiT file (written once; seconds, 0 when reused)."""
    path = folder.parent / f"wan-{name}_fp8_scaled.safetensors"
    stamp = folder / "complete.json"
    if path.is_file() and path.stat().st_mtime >= stamp.stat().st_mtime:
        return path, 0.0
    start = time.perf_counter()
    export_transformer_folder(folder, path, "fp8_scaled")
    seconds = time.perf_counter() - start
    print(f"# {name}: wrote {path.stat().st_size / GiB:.2f} GiB scaled-fp8 file {path} in {seconds:.1f} s", file=sys.stderr)
    return path, seconds


def block_host_bytes(folder: Path) -> int:
    return sum(e.nbytes for f in folder_weight_files(folder) for k, e in read_header(f)[0].items() if k.startswith("blocks."))


def setup_mode(mode: str, folder: Path, device: torch.device, dtype: torch.dtype, prefetch_depth: int,
               fp8_file: Path | None = None, pin_fraction: float = 0.5) -> Setup:
    from diffusers import WanTransformer3DModel

    if mode == "resident":
        model = WanTransformer3DModel.from_pretrained(str(folder), dtype=dtype).to(device)
        return Setup(model)
    if mode == "resident_fp8_widened":
        from video_offload.offload.weights.single_files import FilePart

        part = FilePart.open(fp8_file, WanDitFormat(image_to_video=False), "dit")
        with part.weights(WanTransformer3DModel, dtype) as weights:
            model = part.empty_model(WanTransformer3DModel, dtype)
            weights.apply_dtypes(model)
            model = load_whole(model, weights).to(device)
        return Setup(model)
    if mode in ("ours_fp8_stream", "ours_fp8_auto"):
        off = layerwise_from_file(
            fp8_file, WanDitFormat(image_to_video=False), device, model_cls=WanTransformer3DModel, dtype=dtype,
            pin_cpu_memory=True, prefetch_depth=prefetch_depth, resident_blocks="auto" if mode == "ours_fp8_auto" else 0,
        )
        return Setup(off.model, off, off.stats().pinned_bytes)
    if mode == "ours_stream_budget":
        off = layerwise_from_pretrained(
            folder, device, model_cls=WanTransformer3DModel, dtype=dtype, pin_cpu_memory=True,
            prefetch_depth=prefetch_depth, max_pinned_bytes=int(pin_fraction * block_host_bytes(folder)),
        )
        return Setup(off.model, off, off.stats().pinned_bytes)
    if mode in ("ours_stream", "ours_auto", "ours_stream_pageable"):
        off = layerwise_from_pretrained(
            folder,
            device,
            model_cls=WanTransformer3DModel,
            dtype=dtype,
            pin_cpu_memory=mode != "ours_stream_pageable",
            prefetch_depth=prefetch_depth,
            resident_blocks="auto" if mode == "ours_auto" else 0,
        )
        return Setup(off.model, off, off.stats().pinned_bytes)
    if mode == "diffusers_group":
        from diffusers.hooks import apply_group_offloading

        if device.type != "cuda":
            raise SkipMode("use_stream=True needs a CUDA device")
        model = WanTransformer3DModel.from_pretrained(str(folder), dtype=dtype)
        apply_group_offloading(
            model,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
        # It pins one copy of every block tensor (pin_memory() rounds each up to a power of two).
        pinned = sum(
            t.untyped_storage().nbytes() for t in list(model.parameters()) + list(model.buffers()) if t.is_pinned()
        )
        return Setup(model, pinned_bytes=pinned)
    raise ValueError(mode)


class SkipMode(Exception):
    pass


def random_lora(model, rank: int, dtype: torch.dtype) -> PatchSet:
    """A rank-``rank`` LoRA on every Linear of ``model`` (factors N(0, 0.01), alpha = rank), seeded."""
    gen = torch.Generator().manual_seed(7)
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            up = (torch.randn(module.out_features, rank, generator=gen) * 0.01).to(dtype)
            down = (torch.randn(rank, module.in_features, generator=gen) * 0.01).to(dtype)
            targets[name + ".weight"] = (LowRank(up, down, 1.0),)
    return PatchSet(((PatchFile(f"random rank-{rank}", targets), 1.0),))


def add_lora(setup: Setup, rank: int, dtype: torch.dtype) -> Setup:
    """The pack's LoRA application on a set-up mode: the offloader's (merged in the slot), or for a resident model
    the same arithmetic merged once into its weights plus the same side paths outside the blocks."""
    patches = random_lora(setup.model, rank, dtype)
    if setup.offloader is not None:
        setup.offloader.set_weight_patches(patches)
    else:
        setup.info["side_paths"] = merge_into_resident(setup.model, patches)
    setup.info["lora_params"] = sum(
        t.up.numel() + t.down.numel() for terms in patches.entries[0][0].targets.values() for t in terms)
    return setup


def make_inputs(config: dict, frames: int, height: int, width: int, text_tokens: int, device, dtype):
    gen = torch.Generator().manual_seed(1234)
    latent_frames = (frames - 1) // 4 + 1
    ti2v = config["in_channels"] == TI2V_CHANNELS  # Wan2.2 VAE latents (16x spatial), one timestep per token
    s = 16 if ti2v else 8
    x = torch.randn(1, config["in_channels"], latent_frames, height // s, width // s, generator=gen).to(device, dtype)
    text = torch.randn(1, text_tokens, config["text_dim"], generator=gen).to(device, dtype)
    p_t, p_h, p_w = config["patch_size"]
    tokens = (latent_frames // p_t) * (height // s // p_h) * (width // s // p_w)
    timestep = torch.full((1, tokens), 999.0, device=device) if ti2v else torch.tensor([999.0], device=device)
    return (x, timestep, text), latent_frames, tokens


def run_row(model, inputs, device, warmup: int, repeats: int):
    """Warm up, then run ``repeats`` forwards back to back, as a denoising loop does (no host sync in between).

    Per-step time is measured on the GPU with events on the compute stream, so it includes any wait for a weight
    copy but not the prefetch of the next step's first blocks, which overlaps the next step (a device-wide sync
    after every forward would charge it to this one). ``wall`` is the host time of all of them, one device-wide
    sync at the end included, divided by ``repeats``.
    """
    x, timestep, text = inputs
    with torch.inference_mode():
        for _ in range(warmup):
            out = model(x, timestep, text, return_dict=False)[0]
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        events = []
        start = time.perf_counter()
        host_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            out = model(x, timestep, text, return_dict=False)[0]
            if device.type == "cuda":
                end.record()
                events.append((begin, end))
            host_times.append(time.perf_counter() - t0)
        sync(device)
        wall = (time.perf_counter() - start) / repeats
    times = [b.elapsed_time(e) / 1e3 for b, e in events] if events else host_times
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    peak_reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    return out.detach().to("cpu"), times, wall, peak, peak_reserved


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads included, unlike torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


# ------------------------------------------------------------------------------------------------ main


def emit(row: dict, out_file) -> None:
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if out_file is not None:
        out_file.write(line + "\n")
        out_file.flush()


def targets(row: dict, resident: dict | None) -> dict:
    """The issue's targets for this row, where they apply; None where they cannot be judged."""
    t = {}
    if resident is None or row.get("s_per_step") is None:
        return t
    res_s = resident["s_per_step"]
    if row["mode"] == "ours_fp8_stream":
        bound = 1.02 if row["frames"] < 81 else 1.01
        t[f"ratio_le_{bound}"] = row["s_per_step"] <= bound * res_s
        t["host_le_0.55x_bf16"] = row["host_arena_bytes"] <= 0.55 * row["weight_bytes"]
    if row["mode"] == "ours_fp8_auto":
        t["ratio_le_1.01"] = row["s_per_step"] <= 1.01 * res_s
    if row["mode"] == "ours_stream":
        if row["frames"] >= 81:
            t["ratio_le_1.02"] = row["s_per_step"] <= 1.02 * res_s
        else:
            bound = (
                max(res_s, row["streamed_bytes_per_step"] / (row["h2d_pinned_gbps"] * 1e9))
                if row["h2d_pinned_gbps"]
                else res_s
            )
            t["le_1.05x_max_resident_transfer"] = row["s_per_step"] <= 1.05 * bound
        if row.get("peak_vram_bytes") is not None and resident.get("peak_vram_bytes") is not None:
            limit = resident["peak_vram_bytes"] - row["weight_bytes"] + 2 * row["block_bytes"] + row["non_block_bytes"]
            t["peak_vram_limit_bytes"] = limit
            t["peak_vram_le_limit"] = row["peak_vram_bytes"] <= limit
    if row["mode"] == "ours_auto":
        t["ratio_le_1.01"] = row["s_per_step"] <= 1.01 * res_s
    if row["mode"].startswith("ours") and row.get("host_rss_delta_bytes") is not None:
        t["host_ram_le_1.1x_weights"] = row["host_rss_delta_bytes"] <= 1.1 * row["weight_bytes"]
    return t


def summary(rows: list[dict], failures: list[str], errors: list[str]) -> dict:
    """Every target of every row in one place, plus 'faster than diffusers group offloading' per config/frames."""
    checks = {}
    by_key = {(r["config"], r["frames"], r["mode"]): r for r in rows}
    for (config, frames, mode), row in by_key.items():
        for target, ok in row.get("targets", {}).items():
            if isinstance(ok, bool):
                checks[f"{config}/{frames}f/{mode}/{target}"] = ok
        group = by_key.get((config, frames, "diffusers_group"))
        if mode.startswith("ours") and group is not None:
            checks[f"{config}/{frames}f/{mode}/faster_than_diffusers_group"] = row["s_per_step"] < group["s_per_step"]
    return {
        "row": "summary",
        "all_targets_met": all(checks.values()) if checks else None,
        "missed": sorted(k for k, ok in checks.items() if not ok),
        "checks": checks,
        "bit_exactness_failures": failures,
        "errors": errors,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    out_path = args.out or (str(Path(os.environ["OUT"]) / "layerwise.jsonl") if os.environ.get("OUT") else None)
    out_file = open(out_path, "w") if out_path else None
    env = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timed": TIMED,
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    bandwidth = measure_h2d(device)
    emit({"row": "environment", **env, **bandwidth, "host_memory": host_memory()}, out_file)
    failures, errors, rows = [], [], []

    for name in args.configs:
        if name in A14B_CONFIGS:
            from layerwise_a14b import run_a14b  # bench/ is the script's folder, on sys.path

            a14b_rows, a14b_failures, a14b_errors = run_a14b(name, args, device, dtype, lambda row: emit(row, out_file),
                                                             bandwidth)
            rows += a14b_rows
            failures += a14b_failures
            errors += a14b_errors
            continue
        config = CONFIGS[name]
        folder = Path(args.workdir) / f"wan-{name}"
        write_s = write_random_weights(name, config, folder, dtype)
        fp8_file = None
        if any(m.partition("@")[0] in FP8_MODES for m in args.modes):
            fp8_file, fp8_write_s = fp8_file_for(name, folder)
            write_s += fp8_write_s
        references: dict[int, torch.Tensor] = {}
        fp8_references: dict[int, torch.Tensor] = {}
        lora_references: dict[int, torch.Tensor] = {}
        by_mode: dict[tuple[str, int], dict] = {}
        resident_rows: dict[int, dict] = {}
        for mode in args.modes:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rss_before = host_memory().get("VmRSS")
            start = time.perf_counter()
            try:
                # "ours_fp8_stream@P:B:W": P widening programs (0: one per piece) of B elements and W warps
                base, _, widen = mode.removesuffix("_lora").partition("@")
                programs, block, warps = ((widen or "0").split(":") + [str(v) for v in DEFAULT_WIDEN[1:]])[:3]
                widen_kernel.WIDEN_PROGRAMS, widen_kernel.BLOCK, widen_kernel.WIDEN_WARPS = (
                    int(programs), int(block), int(warps))
                setup = setup_mode(base, folder, device, dtype, args.prefetch_depth, fp8_file, args.pin_fraction)
                if mode in LORA_MODES:
                    setup = add_lora(setup, args.lora_rank, dtype)
                sync(device)
            except SkipMode as e:
                emit({"config": name, "mode": mode, "skipped": str(e)}, out_file)
                continue
            except Exception as e:  # an OOM in one mode must not hide the others
                errors.append(f"{name}/{mode}: {type(e).__name__}: {e}")
                emit({"config": name, "mode": mode, "error": f"{type(e).__name__}: {e}"}, out_file)
                continue
            setup_s = time.perf_counter() - start
            host_after = host_memory()
            model = setup.model
            weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            block_bytes = sum(t.numel() * t.element_size() for t in model.blocks[0].parameters())
            non_block_bytes = weight_bytes - block_bytes * len(model.blocks)
            try:
                for frames in args.frames:
                    inputs, latent_frames, tokens = make_inputs(
                        config, frames, args.height, args.width, args.text_tokens, device, dtype
                    )
                    out, times, wall, peak, peak_reserved = run_row(model, inputs, device, args.warmup, args.repeats)
                    del inputs
                    stats = setup.offloader.stats() if setup.offloader else None
                    row = {
                        "config": name,
                        "mode": mode,
                        "frames": frames,
                        "latent_frames": latent_frames,
                        "tokens": tokens,
                        "height": args.height,
                        "width": args.width,
                        "s_per_step": statistics.median(times),
                        "s_per_step_all": [round(t, 4) for t in times],
                        "s_per_step_wall": round(wall, 4),
                        "ratio_to_resident": None,
                        "peak_vram_bytes": peak,
                        "peak_vram_gib": None if peak is None else round(peak / GiB, 3),
                        "peak_reserved_bytes": peak_reserved,
                        "host_rss_bytes": host_memory().get("VmRSS"),
                        "host_rss_delta_bytes": None if rss_before is None else host_after.get("VmRSS", 0) - rss_before,
                        "pinned_bytes": setup.pinned_bytes,
                        "host_arena_bytes": stats.host_bytes if stats else None,
                        "stored_narrow": stats.stored_narrow if stats else None,
                        "setup_s": round(setup_s, 2),
                        "weights_write_s": round(write_s, 2),
                        "weight_bytes": weight_bytes,
                        "block_bytes": block_bytes,
                        "non_block_bytes": non_block_bytes,
                        "resident_blocks": stats.resident_blocks
                        if stats
                        else (len(model.blocks) if mode == "resident" else 0),
                        "streamed_blocks": stats.streamed_blocks
                        if stats
                        else (0 if mode == "resident" else len(model.blocks)),
                        "streamed_bytes_per_step": (stats.streamed_blocks * stats.block_bytes)
                        if stats
                        else (0 if mode == "resident" else block_bytes * len(model.blocks)),
                        "prefetch_depth": args.prefetch_depth if mode.startswith("ours") else None,
                        "output_finite": bool(torch.isfinite(out.float()).all()),
                        "lora_rank": args.lora_rank if mode in LORA_MODES else None,
                        "widen_programs": widen_kernel.WIDEN_PROGRAMS if mode.startswith("ours_fp8") else None,
                        "widen_block": widen_kernel.BLOCK if mode.startswith("ours_fp8") else None,
                        "widen_warps": widen_kernel.WIDEN_WARPS if mode.startswith("ours_fp8") else None,
                        "lora_params": setup.info.get("lora_params"),
                        **bandwidth,
                        "device_name": env["device_name"],
                        "timed": TIMED,
                    }
                    if mode == "resident":
                        references[frames] = out
                        resident_rows[frames] = row
                        row["ratio_to_resident"] = 1.0
                        row["bit_exact"] = True
                    elif mode == "resident_fp8_widened":  # the fp8 rows' reference; timed against bf16 resident
                        fp8_references[frames] = out
                        row["bit_exact"] = True
                        if frames in resident_rows:
                            row["ratio_to_resident"] = round(row["s_per_step"] / resident_rows[frames]["s_per_step"], 4)
                    elif mode in LORA_MODES:  # timed against its mode without the LoRA
                        plain = by_mode.get((mode.removesuffix("_lora"), frames))
                        if plain is not None:
                            row["ratio_to_without_lora"] = round(row["s_per_step"] / plain["s_per_step"], 4)
                        if mode == "resident_lora":
                            lora_references[frames] = out
                            row["bit_exact"] = True
                        else:
                            ref = lora_references.get(frames) if mode == "ours_stream_lora" else None
                            row["bit_exact"] = None if ref is None else bit_equal(out, ref)
                            if ref is not None:
                                row["max_abs_diff_vs_resident_lora"] = (out.float() - ref.float()).abs().max().item()
                            if row["bit_exact"] is False:
                                failures.append(f"{name}/{mode}/{frames} frames: output differs from resident_lora")
                        if frames in resident_rows:
                            row["ratio_to_resident"] = round(row["s_per_step"] / resident_rows[frames]["s_per_step"], 4)
                    else:
                        ref = (fp8_references if mode.partition("@")[0] in FP8_MODES else references).get(frames)
                        row["bit_exact"] = None if ref is None else bit_equal(out, ref)
                        if frames in resident_rows:
                            row["ratio_to_resident"] = round(row["s_per_step"] / resident_rows[frames]["s_per_step"], 4)
                        if mode.startswith("ours") and row["bit_exact"] is False:
                            failures.append(f"{name}/{mode}/{frames} frames: output differs from the resident DiT")
                    row["targets"] = targets(row, resident_rows.get(frames))
                    if row.get("ratio_to_without_lora") is not None:
                        row["targets"]["lora_ratio_le_1.02"] = row["ratio_to_without_lora"] <= 1.02
                    by_mode[(mode, frames)] = row
                    rows.append(row)
                    emit(row, out_file)
            except Exception as e:
                errors.append(f"{name}/{mode}: {type(e).__name__}: {e}")
                emit({"config": name, "mode": mode, "error": f"{type(e).__name__}: {e}"}, out_file)
            finally:
                setup.close()
                del setup, model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    emit(summary(rows, failures, errors), out_file)
    if out_file is not None:
        out_file.close()
    if failures:
        print("BIT-EXACTNESS FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if errors:
        print("ERRORS:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
