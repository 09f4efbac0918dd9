"""The Wan block run over slices of the sequence (``families/wan/lean_block.py``): the same numbers as diffusers'
own block, far less activation memory, installed and removed through diffusers' hooks and processor API."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from video_offload.offload.families.wan.lean_block import (
    LeanWanAttnProcessor,
    apply_lean_blocks,
    lean_tokens,
    remove_lean_blocks,
)


def tiny_dit(image_to_video: bool, dtype: torch.dtype) -> WanTransformer3DModel:
    torch.manual_seed(0)
    extra = dict(image_dim=24, added_kv_proj_dim=32) if image_to_video else {}
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36 if image_to_video else 16,
        out_channels=16, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=3, rope_max_seq_len=32, **extra,
    )
    return model.to(dtype).eval()


def inputs(model: WanTransformer3DModel, dtype: torch.dtype, per_token_timestep: bool = False) -> dict:
    torch.manual_seed(1)
    channels = model.config.in_channels
    x = torch.randn(1, channels, 3, 10, 14, dtype=dtype)  # 3 x 5 x 7 = 105 tokens
    timestep = torch.tensor([731])
    if per_token_timestep:  # Wan2.2 TI2V: one timestep per token (the first frame's tokens at 0)
        timestep = torch.cat([torch.zeros(35), torch.full((70,), 731.0)])[None]
    kwargs = dict(hidden_states=x, timestep=timestep, encoder_hidden_states=torch.randn(1, 512, 24, dtype=dtype),
                  return_dict=False)
    if model.config.image_dim is not None:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, 257, 24, dtype=dtype)
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("image_to_video, per_token", [(False, False), (True, False), (False, True)])
def test_lean_blocks_equal_diffusers_blocks_bit_for_bit(dtype, image_to_video, per_token):
    model = tiny_dit(image_to_video, dtype)
    kwargs = inputs(model, dtype, per_token)
    with torch.no_grad():
        expected = model(**kwargs)[0]
        seen = []
        hooks = [b.attn1.to_q.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1])) for b in model.blocks]
        assert apply_lean_blocks(list(model.blocks), 64) == 3
        assert apply_lean_blocks(list(model.blocks), 40) == 3  # idempotent: only the slice size changes
        lean = model(**kwargs)[0]
        for hook in hooks:
            hook.remove()
    assert torch.equal(lean, expected)
    assert seen and max(seen) <= 40  # the projections saw slices, never the whole 105-token sequence
    assert all(lean_tokens(b) == 40 for b in model.blocks)


def test_removing_lean_blocks_restores_diffusers_forward_and_processors():
    model = tiny_dit(True, torch.float32)
    originals = [(b.attn1.processor, b.attn2.processor) for b in model.blocks]
    kwargs = inputs(model, torch.float32)
    with torch.no_grad():
        expected = model(**kwargs)[0]
        apply_lean_blocks(list(model.blocks), 8)
        assert all(isinstance(b.attn1.processor, LeanWanAttnProcessor) for b in model.blocks)
        remove_lean_blocks(list(model.blocks))
        remove_lean_blocks(list(model.blocks))  # idempotent
        again = model(**kwargs)[0]
    assert [(b.attn1.processor, b.attn2.processor) for b in model.blocks] == originals
    assert all(isinstance(p, WanAttnProcessor) for pair in originals for p in pair)
    assert all(lean_tokens(b) is None for b in model.blocks)
    assert torch.equal(again, expected)


def test_the_caller_hidden_states_are_never_written():
    model = tiny_dit(False, torch.float32)
    block = model.blocks[0]
    apply_lean_blocks([block], 10)
    x = torch.randn(1, 105, 32)
    before = x.clone()
    temb = torch.randn(1, 6, 32)
    rotary = model.rope(torch.randn(1, 16, 3, 10, 14))
    with torch.no_grad():
        block(x, torch.randn(1, 512, 32), temb, rotary)
    assert torch.equal(x, before)


def test_a_bad_slice_size_is_refused():
    with pytest.raises(ValueError, match="max_tokens=0"):
        apply_lean_blocks(list(tiny_dit(False, torch.float32).blocks), 0)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, chunk", [(32760, 4096), (75600, 8192)])
def test_gpu_lean_14b_block_is_bit_exact_and_bounds_activation_memory(tokens, chunk):
    """One Wan 14B block (bf16, dim 5120, 40 heads) at 480p81 and 720p81 sequence lengths on CUDA: the lean forward
    equals diffusers' block bit for bit, and its peak activation memory is a fraction of the whole-sequence one."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    torch.manual_seed(0)
    block = WanTransformerBlock(5120, 13824, 40, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    block = block.to("cuda", torch.bfloat16).eval()
    frames, h, w = (21, 30, 52) if tokens == 32760 else (21, 45, 80)
    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024).to("cuda")
    rotary = rope(torch.empty(1, 16, frames, 2 * h, 2 * w, device="cuda"))
    x = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(1, 512, 5120, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(1, 6, 5120, device="cuda", dtype=torch.float32)

    def run():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = block(x, context, temb, rotary)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    with torch.no_grad():
        whole, whole_peak = run()
        apply_lean_blocks([block], chunk, fused_pointwise=False)
        lean_eager, _ = run()
        apply_lean_blocks([block], chunk)  # the one-pass element-wise kernels (the default)
        lean, lean_peak = run()
    print(f"tokens={tokens} chunk={chunk}: peak activations whole {whole_peak / 2**30:.2f} GiB, "
          f"lean {lean_peak / 2**30:.2f} GiB; max abs diff {(lean.float() - whole.float()).abs().max().item()}")
    assert torch.equal(lean_eager, whole)
    assert torch.equal(lean, whole)
    assert lean_peak < 0.55 * whole_peak  # measured on an H200: 0.49x at 32,760 tokens, 0.50x at 75,600


@pytest.mark.gpu
@pytest.mark.parametrize("image_to_video, per_token", [(False, False), (True, False), (False, True)])
def test_gpu_lean_tiny_blocks_with_one_pass_kernels_equal_diffusers(image_to_video, per_token):
    """The tiny models of the CPU test on CUDA in bfloat16, where the element-wise steps run as Triton kernels: the
    image-context attention (I2V) and one modulation per token (Wan2.2 TI2V) too."""
    model = tiny_dit(image_to_video, torch.bfloat16).to("cuda")
    model.rope.float()  # rotary frequencies in float32, as diffusers loads them (`_keep_in_fp32_modules`)
    kwargs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v
              for k, v in inputs(model, torch.bfloat16, per_token).items()}
    with torch.no_grad():
        expected = model(**kwargs)[0]
        apply_lean_blocks(list(model.blocks), 40)
        lean = model(**kwargs)[0]
    assert torch.equal(lean, expected)
