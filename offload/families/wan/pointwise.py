"""The Wan block's element-wise steps, each in one pass on a GPU, with diffusers' numbers bit for bit.

diffusers' ``WanTransformerBlock`` writes its element-wise steps as chains of PyTorch operations, each one a kernel
that reads and writes the whole slice: the modulation ``(norm(x.float()) * (1 + scale) + shift).type_as(x)`` is
three (a multiply, an add, a cast), the gated residual ``(x.float() + y * gate).type_as(x)`` four, and the rotary
embedding of the query and the key (``x1 * cos - x2 * sin`` and its twin, into even and odd places) nine each.
At 480x832x81 every one of them moves 0.3-0.7 GB: on the H200 they took about a quarter of a 14B block's time, and
slicing the sequence (``lean_block``) made that share larger.

Each function here does one such chain in one Triton kernel, reading its inputs once and writing its result once.
The numbers are the chain's, bit for bit: the kernel performs the same float32 operations in the same order, each
rounded once (the kernels are compiled with ``enable_fp_fusion=False``, so no multiply and add are contracted into
an FMA that eager PyTorch would not use), and rounds to the output dtype to nearest even as ``type_as`` does.
``tests/test_lean_block.py`` checks the whole block against diffusers' with ``torch.equal`` on the GPU.

Off CUDA, without Triton (a CPU build), or for a layout the kernels do not take, each function runs diffusers'
expression itself, which is also the reference.

Within :func:`compiling_only` the same functions take meta tensors and compile the kernels they would launch for
real tensors of those dtypes and layouts, running nothing: how ``lean_block.lean_kernel_compile`` compiles a model's
kernels in the background before its first step needs them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

ROW_BLOCK = 1024
"""Elements of one token's row per Triton program (a 5,120-wide 14B row is five programs)."""


_COMPILE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("pointwise_compile_only", default=False)
"""Set by :func:`compiling_only` (per thread and task, as a context variable: a background compile never turns the
main thread's launches into compiles)."""


@contextlib.contextmanager
def compiling_only() -> Iterator[None]:
    """Within: the functions below take *meta* tensors and, where they would launch a kernel on CUDA tensors of those
    dtypes and layouts, compile it for the current CUDA device without running it (Triton's ``warmup``; it specialises
    on dtypes and on the strides' divisibility, not on the data). Their outputs stay unwritten."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


class _Kernels:
    """The compiled kernels of a process, and whether they failed to compile here (Triton on a GPU it cannot target,
    such as bfloat16 on one older than Ampere): then every step runs as PyTorch operations, the same numbers."""

    def __init__(self, rows, rotate, cdiv):
        self.rows, self.rotate, self.cdiv = rows, rotate, cdiv
        self.failed: str | None = None

    def launch(self, kernel, grid, *args, **meta) -> bool:
        """Run ``kernel`` (within :func:`compiling_only`: compile it for these operands' dtypes and strides); False
        (and PyTorch from then on) if Triton cannot compile or launch it."""
        try:
            if _COMPILE_ONLY.get():
                kernel.warmup(*[a.dtype if isinstance(a, torch.Tensor) else a for a in args], grid=grid, **meta,
                              enable_fp_fusion=False)
            else:
                kernel[grid](*args, **meta, enable_fp_fusion=False)
            return True
        except Exception as e:  # noqa: BLE001 - any compiler failure: the caller computes the same numbers itself
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("The Wan block's one-pass kernels do not compile here (%s); its element-wise steps run as "
                        "PyTorch operations: the same numbers, about 7%% slower per step", self.failed.splitlines()[0])
            return False


@functools.cache
def _kernels() -> _Kernels | None:
    """The Triton kernels (``pointwise_kernels``), imported once per process; None where Triton is not installed."""
    try:
        import triton

        from . import pointwise_kernels
    except ImportError:
        log.info("Triton is not installed: the Wan block's element-wise steps run as PyTorch operations")
        return None
    return _Kernels(pointwise_kernels.rows, pointwise_kernels.rotate, triton.cdiv)


def _fused(out: torch.Tensor, enabled: bool):
    """The kernels when they can run on ``out``'s device, else None. Triton's interpreter (``TRITON_INTERPRET=1``)
    runs them on CPU tensors too: that is how the CPU tests check their indexing and arithmetic. Within
    :func:`compiling_only`, meta tensors stand for CUDA ones."""
    if _COMPILE_ONLY.get():
        if not enabled or out.device.type != "meta" or os.environ.get("TRITON_INTERPRET") == "1":
            return None
    elif not enabled or (out.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        return None
    kernels = _kernels()
    return None if kernels is None or kernels.failed else kernels


def _in_float32(*dtypes: torch.dtype) -> bool:
    """Whether PyTorch computes an operation on operands of ``dtypes`` in float32, as the kernels do (a model whose
    rotary frequencies were cast to bfloat16 makes diffusers rotate in bfloat16: then its expression runs)."""
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return promoted == torch.float32


def _rows(t: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int, int] | None:
    """``t`` broadcast to the ``(batch, tokens, dim)`` ``shape`` as (tensor, batch stride, token stride), or None
    when its rows are not contiguous (the kernels index each row as one run of memory)."""
    if t.ndim != 3:
        return None
    t = t.expand(shape)
    if t.stride(2) != 1 and shape[2] > 1:
        return None
    return t, t.stride(0), t.stride(1)


def _rows_kernel(kernels: _Kernels, args: list, out: torch.Tensor, residual: bool) -> bool:
    """The row kernel over ``out``'s ``(batch, tokens, dim)`` rows, on operands ``args`` (each a ``_rows`` triple of
    tensor, batch stride, token stride); False when they cannot take it (a layout it does not index) or it failed
    to compile: the caller then computes the same expression itself."""
    if any(a is None for a in args):
        return False
    batch, tokens, dim = out.shape
    return kernels.launch(kernels.rows, (batch * tokens, kernels.cdiv(dim, ROW_BLOCK)), *[v for a in args for v in a],
                          tokens, dim, RESIDUAL=residual, BLOCK=ROW_BLOCK)


def modulate(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype,
             out: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """``(normed * (1 + scale) + shift).to(dtype)``, diffusers' modulation of a normed sub-layer input, written into
    ``out`` when given. ``normed`` is the float32 norm of ``(batch, tokens, dim)`` tokens, ``scale`` and ``shift``
    broadcast to it."""
    one_plus_scale = 1 + scale  # the same small tensor diffusers computes
    kernels = _fused(normed, fused) if _in_float32(normed.dtype, one_plus_scale.dtype, shift.dtype) else None
    if kernels is not None and out is None:
        out = torch.empty(normed.shape, dtype=dtype, device=normed.device)
    if kernels is not None and _rows_kernel(kernels, [_rows(t, out.shape) for t in (normed, one_plus_scale, shift, out)],
                                            out, residual=False):
        return out
    result = (normed * one_plus_scale + shift).to(dtype)
    return result if out is None else out.copy_(result)


def gated_residual_into(out: torch.Tensor, x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor,
                        fused: bool = True) -> None:
    """``out[:] = (x.float() + update.float() * gate).type_as(out)``: diffusers' gated residual update (``out`` may be
    ``x`` itself: each element is read before it is written, by the same program)."""
    kernels = _fused(out, fused) if _in_float32(torch.float32, gate.dtype) else None  # x.float(), update.float()
    if kernels is not None and _rows_kernel(kernels, [_rows(t, out.shape) for t in (x, update, gate, out)], out,
                                            residual=True):
        return
    out.copy_((x.float() + update.float() * gate).type_as(out))


def _rotary_rows(t: torch.Tensor, shape: torch.Size, per_head: bool) -> tuple[torch.Tensor, int, int] | None:
    """``t`` broadcast to the ``(batch, tokens, heads, head_dim)`` ``shape`` as (tensor, batch stride, token stride),
    or None unless each token's values are one run of memory: all heads' (``per_head``: queries, keys) or one head's,
    the same for every head (the frequencies)."""
    t = t.expand(shape)
    heads, head_dim = shape[2], shape[3]
    if t.stride(3) != 1 or (heads > 1 and t.stride(2) != (head_dim if per_head else 0)):
        return None
    return t, t.stride(0), t.stride(1)


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = True) -> None:
    """diffusers' ``apply_rotary_emb`` (inside ``WanAttnProcessor.__call__``) of ``(batch, tokens, heads, head_dim)``
    queries or keys, written into ``out`` (diffusers writes into a fresh ``empty_like``: the same casts)."""
    kernels = _fused(out, fused) if _in_float32(x.dtype, cos.dtype) and _in_float32(x.dtype, sin.dtype) else None
    args = [None]
    if kernels is not None and x.shape == out.shape and out.ndim == 4:
        args = [_rotary_rows(x, out.shape, True), _rotary_rows(cos, out.shape, False),
                _rotary_rows(sin, out.shape, False), _rotary_rows(out, out.shape, True)]
    if all(a is not None for a in args):
        batch, tokens, heads, head_dim = out.shape
        pairs = heads * head_dim // 2
        if kernels.launch(kernels.rotate, (batch * tokens, kernels.cdiv(pairs, ROW_BLOCK)),
                          *[v for a in args for v in a], tokens, pairs, HALF=head_dim // 2, BLOCK=ROW_BLOCK):
            return
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
