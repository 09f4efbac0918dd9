"""Benchmark the exact tiled Wan VAE (``vae_tiling``) against diffusers' untiled decode and encode, on a GPU.

The real-size Wan2.1 VAE with random weights, fp32 (the pack's default VAE precision). Per size: diffusers' untiled
``vae.decode`` (peak, time), then the tiled decode at the grid the pack's policy picks for the issue-10 budget
(2.5 GiB at 480p81, 4 GiB at 720p81, weights included) and at the neighbouring grids, video assembled in host
memory; and the image-to-video start-frame encode (the image, then 80 zero frames) untiled and tiled. One JSON row
per run: peak ``max_memory_allocated`` (weights included), the time of one run after a warm-up, the ratio to the
untiled pass, the max abs difference of the frames in 0..1 (decode) or of the latent mode (encode).

    python bench/vae.py                 # 480p81 and 720p81 (about 2 minutes on an H200)
    python bench/vae.py --tiny          # seconds, on the CPU: the same code on a tiny VAE
    python bench/vae.py --vae wan2.2    # the Wan2.2 VAE (TI2V-5B) at its 1280x704x121, start-frame encode alone
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from video_offload.offload.families.wan import vae_tiling as tv  # noqa: E402
from video_offload.offload.families.wan.shapes import WAN_VAE  # noqa: E402
from video_offload.offload.families.wan.tiling_policy import GPU_ALLOWANCE, decode_grid, encode_grid  # noqa: E402
from video_offload.offload.families.wan.vae22 import WAN22_VAE  # noqa: E402

GiB = 2**30
SIZES = {"480p81": ((1, 16, 21, 60, 104), 2.5), "720p81": ((1, 16, 21, 90, 160), 4.0)}
"""latent shape, issue 10's decode peak target in GiB"""
TINY = dict(WAN_VAE, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
SIZES_22 = {"704p121": ((1, 48, 31, 44, 80), 8.0)}
"""The Wan2.2 VAE (TI2V-5B's default 1280x704x121): a budget to report against, not an issue target (the VAE alone
is 2.6 GiB in fp32)."""
TINY_22 = dict(WAN22_VAE, base_dim=8, decoder_base_dim=12, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
VAES = {"wan2.1": (WAN_VAE, TINY, SIZES, (1, 16, 3, 12, 20)), "wan2.2": (WAN22_VAE, TINY_22, SIZES_22, (1, 48, 3, 6, 10))}


def emit(row: dict, out_path: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as handle:
            handle.write(line + "\n")


def measure(fn, device):
    """``fn``'s output, its time and peak after one warm-up call, and the warm-up call's own time: a pass's first
    call in a process pays the first use of its shapes (cuDNN's choice of algorithm per convolution shape, the
    allocator's growth), which the tiled passes, with shapes of their own, pay again."""
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return out, time.perf_counter() - started, peak, round(first, 3)


def profile_row(fn, device, label: dict, out_path: str | None, top: int = 8) -> None:
    """Where one run's GPU time goes: total kernel time and count, and the ``top`` kernels by total time."""
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    emit(dict(**label, profile_kernel_ms=round(total / 1e3, 1), kernels=sum(e.count for e in events),
              top=[dict(name=e.key[:90], ms=round(e.device_time_total / 1e3, 1), count=e.count) for e in events[:top]]),
         out_path)


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", choices=list(VAES), default="wan2.1")
    parser.add_argument("--sizes", nargs="+", default=None, help="default: every size of the VAE")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="also append rows here (default: $OUT/vae.jsonl)")
    parser.add_argument("--grids", default=None, help="tiled grids to run, e.g. 1x2,1x3 (default: the policy's pick "
                        "and one neighbour)")
    parser.add_argument("--frame-split", default="policy", choices=("policy", "on", "off", "both"),
                        help="frames made by a temporal upsample enter the next block one at a time (on) or together "
                        "(off); policy: as the pack's policy chooses for the budget")
    parser.add_argument("--profile", action="store_true",
                        help="also a row per decode with its 8 most expensive CUDA kernels (torch.profiler)")
    parser.add_argument("--no-encode", action="store_true")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    out_path = args.out or (os.path.join(os.environ["OUT"], "vae.jsonl") if os.environ.get("OUT") else None)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    config, tiny, sizes, tiny_shape = VAES[args.vae]
    vae = AutoencoderKLWan(**(tiny if args.tiny else config)).eval().to(device)
    spatial = vae.config.scale_factor_spatial
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    emit(dict(bench="vae", vae=args.vae, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              torch=torch.__version__, tf32_convs=torch.backends.cudnn.allow_tf32, vae_weight_gib=weights / GiB),
         out_path)
    for name in args.sizes or list(sizes):
        shape, target = sizes[name]
        if args.tiny:
            shape = tiny_shape
        z = torch.randn(shape, device=device)
        reference, t_ref, p_ref, first_ref = measure(lambda: vae.decode(z).sample.cpu(), device)
        emit(dict(size=name, stage="decode", mode="untiled", peak_gib=round(p_ref / GiB, 3), seconds=round(t_ref, 3),
                  first_call_seconds=first_ref), out_path)
        available = int(target * GiB) - weights  # the weights are on the device already, as in the pipeline
        policy = decode_grid(vae, shape, "auto", available)
        chosen = policy.grid if policy is not None else (1, 1)
        grids = [chosen] + [g for g in ((1, 2), (1, 3), (2, 2)) if g != chosen][: 0 if args.tiny else 1]
        if args.grids:
            grids = [tuple(int(n) for n in g.split("x")) for g in args.grids.split(",")]
        if args.profile:
            profile_row(lambda: vae.decode(z).sample.cpu(), device, dict(size=name, stage="decode", mode="untiled"),
                        out_path)
        splits = {"on": (True,), "off": (False,), "both": (True, False),
                  "policy": (policy.frame_split if policy is not None else False,)}[args.frame_split]
        for grid, split in ((g, s) for g in grids for s in splits):
            def tiled():
                return tv.decode_tiled(vae, z, grid, output_device="cpu", store_device="cpu", frame_split=split)

            out, t, p, first = measure(tiled, device)
            if args.profile:
                profile_row(tiled, device, dict(size=name, stage="decode", mode="tiled", grid=list(grid),
                                                frame_split=split), out_path)
            emit(dict(size=name, stage="decode", mode="tiled", grid=list(grid), frame_split=split,
                      policy_choice=grid == chosen and (policy is None or split == policy.frame_split),
                      budget_gib=target, allowance=GPU_ALLOWANCE, peak_gib=round(p / GiB, 3),
                      peak_within_target=p <= target * GiB, seconds=round(t, 3), first_call_seconds=first,
                      time_ratio=round(t / t_ref, 4),
                      time_within_1_10=t / t_ref <= 1.10,
                      max_abs_diff_0_1=float(((out.float() - reference.float()) * 0.5).abs().max())), out_path)
            del out
        del reference
        if name in ("480p81", "704p121") and not args.no_encode:  # the start-frame encode: the image, then zeros (Wan2.2: the image alone)
            frames = (shape[2] - 1) * 4 + 1 if args.vae == "wan2.1" else 1
            video = torch.zeros(1, 3, frames, shape[3] * spatial, shape[4] * spatial)
            video[:, :, 0] = torch.rand(3, shape[3] * spatial, shape[4] * spatial) * 2 - 1
            ref_e, t_e, p_e, first_e = measure(lambda: vae.encode(video.to(device)).latent_dist.mode().cpu(), device)
            emit(dict(size=name, stage="encode", mode="untiled", peak_gib=round(p_e / GiB, 3), seconds=round(t_e, 3),
                      first_call_seconds=first_e), out_path)
            # the policy's pick for the decode's budget, and for what a 6 GiB card has free at the start-frame
            # encode (the VAE placed, nothing else)
            for budget_gib in (target, 6.0 - 0.8):
                tiling = encode_grid(vae, tuple(video.shape), "auto", int(budget_gib * GiB) - weights)
                if tiling is None:
                    continue
                out, t, p, first = measure(lambda: tv.encode_tiled(vae, video, tiling.grid, device=device,
                                                            frame_split=tiling.frame_split).mode().cpu(), device)
                emit(dict(size=name, stage="encode", mode="tiled", budget_gib=budget_gib, grid=list(tiling.grid),
                          frame_split=tiling.frame_split, peak_gib=round(p / GiB, 3), seconds=round(t, 3),
                          first_call_seconds=first,
                          time_ratio=round(t / t_e, 4), max_abs_diff=float((out - ref_e).abs().max())), out_path)
                del out
        z = None  # noqa: F841 - free the latents before the next size
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
