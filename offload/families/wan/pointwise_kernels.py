"""The Triton kernels of ``pointwise`` (imported only where Triton is installed).

They live in a module of their own, at its top level, because a ``triton.jit`` function finds the jit functions it
calls (``piece``) among its module's globals: defined inside a function, ``piece`` is not found and the kernels do
not compile. The arithmetic and its exactness are described in ``pointwise``.

The token count is not a specialisation (``do_not_specialize``): Triton would otherwise compile each kernel again for
a count that is a multiple of 16 and one that is not (a 32,760-token sequence in slices of 8,192 has both), and a
compile ahead of time (``pointwise.compiling_only``) could not know the counts a run will meet. It only picks a
row's batch and token (``row // tokens``), so nothing is lost. The strides stay specialised: their divisibility is
what lets a row be loaded in wide vectors.
"""

import triton
import triton.language as tl


@triton.jit
def piece(tokens, width, BLOCK: tl.constexpr):
    """This program's (batch, token) row and its BLOCK columns (of ``width``) in a (batch x tokens, pieces) grid."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return row // tokens, row % tokens, cols, cols < width


@triton.jit(do_not_specialize=["tokens"])
def rows(first, f_b, f_t, second, s_b, s_t, third, t_b, t_t, out, o_b, o_t, tokens, dim,
         RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """first * second + third (a modulation) or, with RESIDUAL, first + second * third (a gated residual)."""
    b, t, cols, mask = piece(tokens, dim, BLOCK)
    a = tl.load(first + b * f_b + t * f_t + cols, mask=mask).to(tl.float32)
    x = tl.load(second + b * s_b + t * s_t + cols, mask=mask).to(tl.float32)
    y = tl.load(third + b * t_b + t * t_t + cols, mask=mask).to(tl.float32)
    value = a + x * y if RESIDUAL else a * x + y
    value = value.to(out.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(out + b * o_b + t * o_t + cols, value, mask=mask)


@triton.jit(do_not_specialize=["tokens"])
def rotate(x, x_b, x_t, cos, c_b, c_t, sin, s_b, s_t, out, o_b, o_t, tokens, pairs,
           HALF: tl.constexpr, BLOCK: tl.constexpr):
    """diffusers' rotary embedding of one row's (heads x head_dim) values, taken as pairs (even, odd)."""
    b, t, pair, mask = piece(tokens, pairs, BLOCK)
    freq = 2 * (pair % HALF)  # diffusers takes cos[..., 0::2] and sin[..., 1::2] of each head's frequencies
    x1 = tl.load(x + b * x_b + t * x_t + 2 * pair, mask=mask).to(tl.float32)
    x2 = tl.load(x + b * x_b + t * x_t + 2 * pair + 1, mask=mask).to(tl.float32)
    c = tl.load(cos + b * c_b + t * c_t + freq, mask=mask).to(tl.float32)
    s = tl.load(sin + b * s_b + t * s_t + freq + 1, mask=mask).to(tl.float32)
    even = (x1 * c - x2 * s).to(out.dtype.element_ty, fp_downcast_rounding="rtne")
    odd = (x1 * s + x2 * c).to(out.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(out + b * o_b + t * o_t + 2 * pair, even, mask=mask)
    tl.store(out + b * o_b + t * o_t + 2 * pair + 1, odd, mask=mask)
