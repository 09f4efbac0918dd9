"""vae_resnet: the Wan VAE's residual blocks as the tiled passes run them equal diffusers' blocks bit for bit (outputs
and causal caches, chunk after chunk), and hold fewer full-size tensors at their peak - which is the tiled passes'
peak, so the planner fits coarser (faster) tiles in the same memory."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan as wan
from test_vae_tiling import WAN21_REAL, WAN21_SMALL, WAN22_TINY, _vae

from video_offload.offload.families.wan import vae_tiling as tv
from video_offload.offload.families.wan.vae_resnet import cached_conv, residual_block, rms_norm


def residual_blocks(vae):
    return [m for m in vae.modules() if isinstance(m, wan.WanResidualBlock)]


@pytest.mark.parametrize("cfg", [WAN21_SMALL, WAN22_TINY], ids=["wan2.1", "wan2.2"])
@torch.no_grad()
def test_residual_blocks_equal_diffusers_chunk_after_chunk(cfg):
    """Every residual block of the VAE (encoder and decoder, with and without a channel-changing shortcut), over
    three chunks of 1, 4 and 1 frames carrying their caches: the same output and the same caches, bit for bit."""
    vae = _vae(cfg)
    blocks = residual_blocks(vae)
    assert any(not isinstance(b.conv_shortcut, torch.nn.Identity) for b in blocks)
    generator = torch.Generator().manual_seed(0)
    for block in blocks:
        ours, theirs = [None, None], [None, None]
        for frames in (1, 4, 1):
            x = torch.randn(1, block.conv1.in_channels, frames, 10, 14, generator=generator)
            expected = block(x, feat_cache=theirs, feat_idx=[0])
            got = residual_block(block, x, ours, [0])
            assert torch.equal(got, expected)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@torch.no_grad()
def test_the_norm_and_the_convolution_equal_diffusers():
    vae = _vae(WAN21_SMALL)
    block = residual_blocks(vae)[0]
    x = torch.randn(1, block.conv1.in_channels, 3, 8, 8)
    assert torch.equal(rms_norm(block.norm1, x.clone()), block.norm1(x))
    # A bfloat16 input against float32 gamma widens in diffusers' product: that case is diffusers' own call.
    assert torch.equal(rms_norm(block.norm1, x.bfloat16()), block.norm1(x.bfloat16()))
    cache_ours, cache_theirs = [x[:, :, -1:].clone()], [x[:, :, -1:].clone()]
    got = cached_conv(block.conv1, [x.clone()], cache_ours, [0])
    assert torch.equal(got, block.conv1(x, cache_theirs[0]))
    assert torch.equal(cache_ours[0][:, :, -1:], x[:, :, -1:])  # the cache now ends with the input's last frame


def _peak(fn) -> int:
    """Bytes of tensor storage alive at the peak of ``fn()`` on meta, above what was alive before."""
    with torch.no_grad(), tv._LiveBytes() as mem:
        base = mem.current
        fn()
        return mem.peak - base


def test_a_full_resolution_block_holds_fewer_full_size_tensors():
    """The decoder's last residual block at 480x832 (96 channels, 4 frames, a 2-frame cache). Beyond its input,
    diffusers' forward holds five input-sized tensors at its peak (the norm 1, its SiLU 1, the cache frames
    concatenated in front 1.5, that padded 1.5); this one three and a half (no concatenation, the SiLU in place,
    and the activation freed once copied into the padded buffer, before the convolution)."""
    with torch.device("meta"):
        vae = AutoencoderKLWan(**WAN21_REAL).eval()
    block = vae.decoder.up_blocks[-1].resnets[-1]
    x = torch.empty(1, 96, 4, 480, 832, device="meta")
    full = x.numel() * 4

    def run(forward):
        cache = [torch.empty(1, 96, 2, 480, 832, device="meta"), torch.empty(1, 96, 2, 480, 832, device="meta")]
        return _peak(lambda: forward(cache))

    theirs = run(lambda cache: block(x, feat_cache=cache, feat_idx=[0]))
    ours = run(lambda cache: residual_block(block, x, cache, [0]))
    assert ours <= theirs - 1.45 * full, (ours / full, theirs / full)


def test_the_tiled_decode_plan_needs_less_memory():
    """What the planner sees: a 1x3 whole-frame decode at 480p81 estimated at 1.98 GiB of activations (2.27 with
    diffusers' blocks), the 1x2 encode at 2.71 (3.21)."""
    with torch.device("meta"):
        vae = AutoencoderKLWan(**WAN21_REAL).eval()
    where = dict(output_on_device=False, store_on_device=False, frame_split=False)
    decode = tv.estimate_decode_memory(vae, (1, 16, 21, 60, 104), (1, 3), **where).peak
    encode = tv.estimate_encode_memory(vae, (1, 3, 81, 480, 832), (1, 2), frame_split=False).peak
    assert decode < 2.0 * 2**30 and encode < 2.75 * 2**30


def test_whether_the_untiled_pass_fits_is_still_asked_of_diffusers_blocks():
    """``auto`` runs diffusers' own untiled decode when its estimate fits. That estimate replays diffusers' blocks
    (the GPU allowance was measured against it): with free memory between what the leaner blocks would need and what
    diffusers' need, the decode must take the pack's own pass (here in one tile, whose blocks fit), not run
    diffusers' pass out of memory."""
    from video_offload.offload.families.wan import tiling_policy

    with torch.device("meta"):
        vae = AutoencoderKLWan(**WAN21_REAL).eval()
    shape = (1, 16, 21, 60, 104)
    lean = tv.estimate_decode_memory(vae, shape, (1, 1), frame_split=False).peak
    theirs = tv.estimate_decode_memory(vae, shape, (1, 1), frame_split=False, lean=False).peak
    assert lean < theirs
    budget = (lean + theirs) // 2
    available = int(budget * tiling_policy.GPU_ALLOWANCE / tiling_policy.ALLOCATOR_HEADROOM) + 1
    tiling = tiling_policy.decode_grid(vae, shape, "auto", available)
    assert tiling is not None
    assert tv.estimate_decode_memory(vae, shape, tiling.grid, frame_split=tiling.frame_split, output_on_device=False,
                                     store_on_device=False).peak <= budget
    video = (1, 3, 81, 480, 832)
    lean = tv.estimate_encode_memory(vae, video, (1, 1), video_on_device=True, frame_split=False).peak
    theirs = tv.estimate_encode_memory(vae, video, (1, 1), video_on_device=True, frame_split=False, lean=False).peak
    assert lean < theirs
