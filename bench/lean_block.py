"""Benchmark one real-size Wan 14B block: diffusers' forward against the pack's lean block at several slice sizes.

Why: under a VRAM cap ``dit_activation_chunking=auto`` runs every block lean (``families/wan/lean_block.py``) with a
slice size taken from free memory; this says what each slice size costs in time and saves in memory, so the policy
can pick the largest slice that fits rather than a small one. Random bf16 weights, 40 heads of 128, FFN 13,824, a
512-token text context; one JSON row per (tokens, slice size): median seconds of ``--repeats`` forwards after a
warm-up, the ratio to diffusers' block, the peak activation bytes (the block's weights excluded) and whether the
output equals diffusers' bit for bit; each slice size with the element-wise steps fused (``pointwise.py``) and as
PyTorch operations.

    python bench/lean_block.py                      # 32,760 and 75,600 tokens (480p81, 720p81) on a GPU, ~1 min
    python bench/lean_block.py --tiny               # a CPU smoke test of this script
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vae import emit  # bench/ is the script's folder, on sys.path: the same JSON-row writer
from video_offload.offload.families.wan.lean_block import apply_lean_blocks, remove_lean_blocks  # noqa: E402

SEQUENCES = {32760: (21, 30, 52), 75600: (21, 45, 80)}
"""tokens: latent frames and the patch grid (480p81, 720p81 for Wan2.1 14B)."""


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="32760,75600")
    parser.add_argument("--slices", default="whole,16384,8192,4096,2520",
                        help="lean slice sizes; 'whole' is one slice of the whole sequence")
    parser.add_argument("--pointwise", default="fused,eager",
                        help="the lean block's element-wise steps: 'fused' (one Triton pass each), 'eager' (PyTorch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="also append rows here (default: $OUT/lean_block.jsonl)")
    args = parser.parse_args()
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    out_path = args.out or (os.path.join(os.environ["OUT"], "lean_block.jsonl") if os.environ.get("OUT") else None)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dim, ffn, heads = (64, 128, 4) if args.tiny else (5120, 13824, 40)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.manual_seed(0)
    block = WanTransformerBlock(dim, ffn, heads, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    block = block.to(device, dtype).eval()
    rope = WanRotaryPosEmbed(dim // heads, (1, 2, 2), 1024).to(device)
    emit(dict(bench="lean_block", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              torch=torch.__version__, dim=dim, ffn=ffn, heads=heads, dtype=str(dtype)), out_path)

    def timed(x, context, temb, rotary):
        results = []
        block(x, context, temb, rotary)  # warm-up
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = block(x, context, temb, rotary)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results.append(time.perf_counter() - started)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = block(x, context, temb, rotary)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = 0
        return out, statistics.median(results), peak

    for tokens in (int(t) for t in args.tokens.split(",")):
        frames, h, w = SEQUENCES.get(tokens, (1, 1, tokens)) if not args.tiny else (3, 4, 6)
        tokens = frames * h * w
        rotary = rope(torch.empty(1, 16, frames, 2 * h, 2 * w, device=device))
        x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
        context = torch.randn(1, 512, dim, device=device, dtype=dtype)
        temb = torch.randn(1, 6, dim, device=device, dtype=torch.float32)
        remove_lean_blocks([block])
        reference, t_ref, p_ref = timed(x, context, temb, rotary)
        emit(dict(tokens=tokens, mode="diffusers", seconds=round(t_ref, 5), peak_activation_gib=round(p_ref / 2**30, 3)),
             out_path)
        for entry in args.slices.split(","):
            size = tokens if entry == "whole" else min(int(entry), tokens)
            for pointwise in args.pointwise.split(","):
                apply_lean_blocks([block], size, fused_pointwise=pointwise == "fused")
                out, t, p = timed(x, context, temb, rotary)
                emit(dict(tokens=tokens, mode="lean", pointwise=pointwise, slice_tokens=size, slices=-(-tokens // size),
                          seconds=round(t, 5), time_ratio=round(t / t_ref, 4), peak_activation_gib=round(p / 2**30, 3),
                          peak_ratio=round(p / p_ref, 4) if p_ref else None,
                          bit_exact=bool(torch.equal(out, reference))), out_path)
                del out
        remove_lean_blocks([block])
        _, t_again, _ = timed(x, context, temb, rotary)  # the reference again: how far the GPU's speed drifted
        emit(dict(tokens=tokens, mode="diffusers_again", seconds=round(t_again, 5),
                  time_ratio=round(t_again / t_ref, 4)), out_path)
        del reference, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
