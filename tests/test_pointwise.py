"""The Wan block's one-pass element-wise kernels (``families/wan/pointwise.py``): the numbers of diffusers' own
expressions, bit for bit.

On a CPU the kernels run in Triton's interpreter (in a child process: the interpreter is chosen when the kernels are
first defined), which checks their indexing - batches, slices of a longer sequence, per-token modulation, widths
that are not a multiple of the block - and their float32 arithmetic in float16 and float32. The interpreter rounds to
bfloat16 by truncation, unlike a GPU (round to nearest even, as PyTorch), so bfloat16 is checked on the GPU, where
the whole 14B block is compared with diffusers' (``tests/test_lean_block.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from video_offload.offload.families.wan import pointwise

COUNT_LAUNCHES = r"""
import torch
from video_offload.offload.families.wan import pointwise as pw

kernels = pw._kernels()
launched = {"rows": 0, "rotate": 0}  # which kernel each call ran: the checks must not pass on the fallback alone
real_launch = kernels.launch

def counting(kernel, grid, *args, **meta):
    ran = real_launch(kernel, grid, *args, **meta)
    launched["rotate" if kernel is kernels.rotate else "rows"] += ran
    return ran

kernels.launch = counting
"""
"""A child's prelude: ``launched`` counts the kernels that ran, so no check passes on the PyTorch fallback alone."""

CHECKS = COUNT_LAUNCHES + r"""
torch.manual_seed(0)
batch, tokens, heads, head_dim = 2, 7, 3, 24  # 72 wide, 36 pairs a token: a partial block
dim = heads * head_dim
failures = []

def check(name, seen, expected):
    if not torch.equal(seen, expected):
        failures.append(name)

for dtype in (torch.float16, torch.float32):
    x = torch.randn(batch, tokens, dim).to(dtype)
    normed = torch.randn(batch, tokens, dim)
    scale, shift = torch.randn(1, 1, dim), torch.randn(1, 1, dim)
    per_token_scale = torch.randn(batch, tokens, dim)
    check(f"modulate {dtype}", pw.modulate(normed, scale, shift, dtype), (normed * (1 + scale) + shift).type_as(x))
    check(f"modulate per token {dtype}", pw.modulate(normed, per_token_scale, shift, dtype),
          (normed * (1 + per_token_scale) + shift).type_as(x))
    longer = torch.zeros(batch, tokens + 5, dim, dtype=dtype)
    pw.modulate(normed, scale, shift, dtype, out=longer[:, 3:3 + tokens])
    check(f"modulate into a slice {dtype}", longer[:, 3:3 + tokens], (normed * (1 + scale) + shift).type_as(x))
    check(f"modulate leaves the rest {dtype}", longer[:, :3], torch.zeros_like(longer[:, :3]))

    update, gate = torch.randn(batch, tokens, dim).to(dtype), torch.randn(1, 1, dim)
    expected = (x.float() + update.float() * gate).type_as(x)
    in_place = x.clone()
    pw.gated_residual_into(in_place, in_place, update, gate)
    check(f"gated residual in place {dtype}", in_place, expected)
    out = torch.empty_like(x)
    pw.gated_residual_into(out, x, update.float(), per_token_scale)
    check(f"gated residual per token {dtype}", out, (x.float() + update.float() * per_token_scale).type_as(x))

    q = torch.randn(batch, tokens, heads, head_dim).to(dtype)
    cos, sin = torch.randn(1, tokens, 1, head_dim), torch.randn(1, tokens, 1, head_dim)
    x1, x2 = q.unflatten(-1, (-1, 2)).unbind(-1)
    expected = torch.empty_like(q)
    expected[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    expected[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    whole = torch.zeros(batch, tokens + 4, heads, head_dim, dtype=dtype)
    pw.rotate_into(whole[:, 2:2 + tokens], q, cos, sin)
    check(f"rotary into a slice {dtype}", whole[:, 2:2 + tokens], expected)
    check(f"rotary leaves the rest {dtype}", whole[:, :2], torch.zeros_like(whole[:, :2]))
print(launched["rows"], launched["rotate"])
print("FAILED " + ", ".join(failures) if failures else "ALL EQUAL")
"""


def test_the_kernels_compute_diffusers_expressions_bit_for_bit_in_tritons_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ALL EQUAL"), run.stdout[-2000:]
    # per dtype: three modulations and two gated residuals in the row kernel, one rotation in its own
    assert run.stdout.split()[:2] == ["10", "2"], run.stdout[-2000:]


BLOCK_CHECK = COUNT_LAUNCHES + r"""
from diffusers import WanTransformer3DModel
from video_offload.offload.families.wan.lean_block import apply_lean_blocks

for dtype in (torch.float32, torch.float16):
    launched.update(rows=0, rotate=0)
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32).to(dtype).eval()
    x = torch.randn(1, 16, 3, 10, 14, dtype=dtype)
    kwargs = dict(hidden_states=x, timestep=torch.tensor([731]), return_dict=False,
                  encoder_hidden_states=torch.randn(1, 512, 24, dtype=dtype))
    with torch.no_grad():
        expected = model(**kwargs)[0]
        apply_lean_blocks(list(model.blocks), 40)
        lean = model(**kwargs)[0]
    print(dtype, torch.equal(lean, expected), launched["rows"] > 0, launched["rotate"] > 0)
"""


def test_a_lean_block_on_the_kernels_equals_diffusers_block_in_tritons_interpreter():
    """The whole lean block (105 tokens in slices of 40) with every element-wise step in a kernel: the same output
    as diffusers' block. (A batch of one, as the pack runs: on a CPU PyTorch's linear layers give other numbers for
    a slice of a batch of two, lean or not; the kernels' batch indexing is checked above.)"""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", BLOCK_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # float32: every step in a kernel; float16: the model's rotary frequencies were cast to float16 with it, so
    # diffusers rotates in float16 and the rotation runs as its expression, the rest still in kernels
    assert run.stdout.split() == ["torch.float32", "True", "True", "True",
                                  "torch.float16", "True", "True", "False"], run.stdout[-2000:]


def test_off_cuda_the_functions_are_diffusers_expressions():
    """Without a GPU (and without the interpreter) nothing is compiled: diffusers' own expressions run."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.bfloat16)
    normed, scale, shift = torch.randn(1, 5, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    assert torch.equal(pointwise.modulate(normed, scale, shift, x.dtype), (normed * (1 + scale) + shift).type_as(x))
    out = x.clone()
    pointwise.gated_residual_into(out, out, x, scale)
    assert torch.equal(out, (x.float() + x.float() * scale).type_as(x))


def test_a_layout_the_kernels_do_not_take_falls_back_to_the_expression():
    """Rows that are not one run of memory (here a transposed update) are computed by PyTorch, with the same
    numbers, rather than read wrongly by a kernel."""
    pytest.importorskip("triton")
    script = r"""
import torch
from video_offload.offload.families.wan import pointwise as pw
torch.manual_seed(0)
x = torch.randn(1, 6, 8)
update = torch.randn(1, 8, 6).transpose(1, 2)
gate = torch.randn(1, 1, 8)
out = torch.empty_like(x)
kernels = pw._kernels()
kernels.launch = lambda *args, **meta: print("a kernel was launched") or True
pw.gated_residual_into(out, x, update, gate)
print(torch.equal(out, (x.float() + update.float() * gate).type_as(x)))
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True"], run.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True])
def test_gpu_kernels_equal_diffusers_expressions_in_bfloat16(per_token):
    """On CUDA, in bfloat16 (rounding to nearest even), at a 14B block's width and a 480p slice's length."""
    torch.manual_seed(0)
    batch, tokens, heads, head_dim = 2, 8192, 40, 128
    dim = heads * head_dim
    cuda = dict(device="cuda")
    x = torch.randn(batch, tokens, dim, dtype=torch.bfloat16, **cuda)
    normed = torch.randn(batch, tokens, dim, **cuda)
    scale = torch.randn(batch, tokens, dim, **cuda) if per_token else torch.randn(1, 1, dim, **cuda)
    shift = torch.randn(1, 1, dim, **cuda)
    assert torch.equal(pointwise.modulate(normed, scale, shift, x.dtype), (normed * (1 + scale) + shift).type_as(x))
    update = torch.randn(batch, tokens, dim, dtype=torch.bfloat16, **cuda)
    out = x.clone()
    pointwise.gated_residual_into(out, out, update, scale)
    assert torch.equal(out, (x.float() + update * scale).type_as(x))
    q = torch.randn(batch, tokens, heads, head_dim, dtype=torch.bfloat16, **cuda)
    cos, sin = torch.randn(1, tokens, 1, head_dim, **cuda), torch.randn(1, tokens, 1, head_dim, **cuda)
    fused, eager = torch.empty_like(q), torch.empty_like(q)
    pointwise.rotate_into(fused, q, cos, sin)
    pointwise.rotate_into(eager, q, cos, sin, fused=False)
    assert torch.equal(fused, eager)
    kernels = pointwise._kernels()  # the kernels compiled and ran: the equalities were not the fallback's
    assert kernels is not None and kernels.failed is None


FAILING_COMPILE = r"""
import logging, torch
from video_offload.offload.families.wan import pointwise as pw

class Uncompilable:  # what Triton does on a GPU it cannot target (bfloat16 before Ampere, say)
    def __getitem__(self, grid):
        def launch(*args, **meta):
            raise RuntimeError("PassManager::run failed: bf16 is not supported on sm_61")
        return launch

logging.basicConfig(level=logging.WARNING)
kernels = pw._kernels()
kernels.rows = kernels.rotate = Uncompilable()
torch.manual_seed(0)
x, update, gate = torch.randn(1, 6, 8).half(), torch.randn(1, 6, 8).half(), torch.randn(1, 1, 8)
out = x.clone()
pw.gated_residual_into(out, out, update, gate)
first = torch.equal(out, (x.float() + update.float() * gate).type_as(x))
q, cos, sin = torch.randn(1, 6, 2, 4).half(), torch.randn(1, 6, 1, 4), torch.randn(1, 6, 1, 4)
rotated = torch.empty_like(q)
pw.rotate_into(rotated, q, cos, sin)
x1, x2 = q.unflatten(-1, (-1, 2)).unbind(-1)
expected = torch.empty_like(q)
expected[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
expected[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
print(first, torch.equal(rotated, expected), pw._fused(out, True) is None)
"""


def test_kernels_that_do_not_compile_fall_back_to_the_same_numbers_with_a_warning():
    """Triton can be installed where it cannot compile these kernels (an older GPU): the block then runs diffusers'
    expressions - the same numbers - says so once, and does not try the kernels again."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", FAILING_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True", "True", "True"], run.stdout
    assert run.stderr.count("do not compile here") == 1 and "sm_61" in run.stderr
