"""One pass per tensor to widen fp8 weights in a GPU slot, where PyTorch's eager rule takes two.

:meth:`stored_format.StagedLayout.decode` widens a block as ComfyUI does - ``copy_`` (fp8 to the compute dtype),
then ``mul_`` by the scale - which reads and writes each widened weight twice: 7 bytes of device traffic per
parameter, about 2.5 GB for one 14B Wan block, run on the copy stream *while the previous block computes*. That
traffic is taken from the compute stream (the H200 rows of issue 11: streaming fp8 cost 2.9% at 81 frames and 13.5%
at 17 against bf16 streaming's 0.2% and 7.7%). This kernel reads the fp8 bytes once and writes the widened value
once (3 bytes per parameter).

The numbers are the eager rule's, bit for bit: an fp8 value and a scale already rounded to the compute dtype are
both exact in float32, and so is their product (at most 4 + 11 significant bits), so computing it in float32 and
rounding once to the compute dtype (round to nearest even) is exactly what the eager ``mul_`` in bfloat16/float16
does; in float32 the one rounding is the same multiplication. ``tests/test_stored_format.py`` checks it on the GPU
for every fp8 bit pattern.

Triton ships with PyTorch's CUDA builds; without it (a CPU build) or off CUDA, :func:`decoder_for` returns the eager
rule, which is also the reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from .stored_format import NARROW_FLOATS, StagedLayout

log = logging.getLogger(__name__)

Views = list[tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]

BLOCK = 16384
"""Elements per Triton program: large enough that launch and tail costs vanish on 10^7-element weights. With
:data:`WIDEN_WARPS` 8 it streamed 14B fp8 at 17 frames 0.3-0.4% faster than 4,096 elements and 4 warps in each of
two runs on H200s (1.017x / 1.021x and 1.018x / 1.021x the bf16 resident forward, medians of 3 and 7 forwards,
``bench/layerwise.py --modes ours_fp8_stream,ours_fp8_stream@0:16384:8``): fewer, longer programs beside the block
being computed."""

WIDEN_PROGRAMS = 0
"""Programs per widening kernel: 0 launches one per :data:`BLOCK` elements (the whole GPU for a moment); N > 0
launches N that loop over the tensor, so the widening, which runs on the copy stream beside the block being computed,
takes N SMs' share for longer instead of every SM at once (``bench/layerwise.py --modes ours_fp8_stream@N``)."""

WIDEN_WARPS = 8
"""Warps per widening program; with :data:`BLOCK` what one program moves at a time (see :data:`BLOCK`)."""


@functools.cache
def _build_kernel():
    """The Triton kernel, defined once per process: each ``triton.jit`` function keeps its own compile cache, so a
    new definition per slot set would compile again for every model placed."""
    import triton
    import triton.language as tl

    @triton.jit
    def widen(src, dst, scale, n, programs, pieces_each, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        # program p widens pieces p, p + programs, p + 2 programs, ... (pieces_each of them, the last maybe empty)
        for i in tl.range(0, pieces_each):
            start = (tl.program_id(0) + i * programs).to(tl.int64) * BLOCK
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < n
            value = tl.load(src + offsets, mask=mask).to(tl.float32)
            if HAS_SCALE:
                value = value * tl.load(scale).to(tl.float32)
            tl.store(dst + offsets, value.to(dst.dtype.element_ty), mask=mask)

    return widen, triton.cdiv


class TritonWidener:
    """Widen a block's fp8 tensors on the current stream with one Triton kernel each; tensors stored in their
    compute dtype are copied as they are."""

    def __init__(self, programs: int = 0, block: int = BLOCK, warps: int = WIDEN_WARPS):
        self._kernel, self._cdiv = _build_kernel()
        self.programs, self.block, self.warps = programs, block, warps
        """:data:`WIDEN_PROGRAMS`, :data:`BLOCK` and :data:`WIDEN_WARPS` when this widener was made."""

    def __call__(self, views: Views) -> None:
        for compute, stored, scale in views:
            if stored.dtype == compute.dtype and scale is None:
                compute.copy_(stored)
                continue
            n = compute.numel()
            pieces = self._cdiv(n, self.block)
            programs = min(pieces, self.programs) if self.programs > 0 else pieces
            self._kernel[(programs,)](
                stored, compute, compute if scale is None else scale, n, programs, self._cdiv(pieces, programs),
                HAS_SCALE=scale is not None, BLOCK=self.block, num_warps=self.warps,
            )


def decoder_for(device: torch.device, staged: StagedLayout) -> Callable[[Views], None]:
    """How ``staged`` blocks are widened on ``device``: the one-pass kernel on CUDA when Triton is there and every
    narrow tensor is fp8 into a floating compute dtype, else the eager rule (:meth:`StagedLayout.decode`)."""
    if device.type != "cuda":
        return StagedLayout.decode
    narrow = [s for s in staged.steps if s.stored.dtype != s.compute.dtype]
    if not all(s.stored.dtype in NARROW_FLOATS and s.compute.dtype.is_floating_point for s in narrow):
        return StagedLayout.decode
    try:
        widener = TritonWidener(WIDEN_PROGRAMS, BLOCK, WIDEN_WARPS)
    except ImportError:
        log.info("Triton is not installed: fp8 blocks are widened with two PyTorch kernels per tensor")
        return StagedLayout.decode
    log.debug("fp8 blocks are widened with one Triton kernel per tensor")
    return widener
