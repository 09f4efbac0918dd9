"""The Wan VAE's residual block, as the tiled passes run it: diffusers' numbers with fewer full-size transients.

Why: the peak of a tiled VAE pass is inside the residual blocks at full resolution, at the causal convolution's
input. diffusers' ``WanResidualBlock.forward`` keeps, at that moment, the block input, its RMS norm, the SiLU of
that (a second copy), the cache frames concatenated in front of it (a third) and that concatenation zero-padded (a
fourth, ``WanCausalConv3d.forward``). On the real-size Wan2.1 VAE at 480x832 that point is 2.34 GiB of a one-third
tile's 2.34 GiB peak. Here the SiLU runs in place on the norm's output (its only reader), and the cache frames and
the input are written once into a buffer that already has the padding, which is what the convolution reads; the
norm's output is dropped before the convolution runs. The convolution, the norms, the caches and the order of
every operation are diffusers', so the output and the caches are bit for bit diffusers' (``tests/test_vae_resnet.py``).

Only the tiled passes (``vae_tiling``) use it; an untiled pass is diffusers' own ``decode``/``encode``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders import autoencoder_kl_wan as wan
from torch import nn


def padded_input(conv: wan.WanCausalConv3d, x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor | None:
    """What ``WanCausalConv3d.forward`` feeds its convolution - the cache's frames in front of ``x``, zero padding in
    time and space - built in one buffer instead of a concatenation and then a padded copy of it. None where
    diffusers' padding would crop (more cache frames than the causal padding; not in Wan's VAEs)."""
    left, right, top, bottom, front, back = conv._padding
    lead = 0
    if cache is not None and front > 0:
        cache = cache.to(x.device)
        lead = cache.shape[2]
        front -= lead
    if front < 0:
        return None
    b, c, t, h, w = x.shape
    buffer = x.new_empty((b, c, front + lead + t + back, top + h + bottom, left + w + right))
    body = slice(front, front + lead + t)
    buffer[:, :, : body.start].zero_()
    buffer[:, :, body.stop :].zero_()
    buffer[:, :, body, :top].zero_()
    buffer[:, :, body, top + h :].zero_()
    buffer[:, :, body, top : top + h, :left].zero_()
    buffer[:, :, body, top : top + h, left + w :].zero_()
    inner = buffer[:, :, body, top : top + h, left : left + w]
    if lead:
        inner[:, :, :lead].copy_(cache)
    inner[:, :, lead:].copy_(x)
    return buffer


def rms_norm(norm: wan.WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` (``WanRMS_norm.forward``: normalize, then times ``scale``, times ``gamma``, plus ``bias``), the last
    three in place on the normalized tensor - the same operations in the same order - instead of one new full-size
    tensor each. Where a product would widen the dtype (a bfloat16 input against float32 ``gamma``), diffusers'."""
    if x.dtype != norm.gamma.dtype or (isinstance(norm.bias, torch.Tensor) and norm.bias.dtype != x.dtype):
        return norm(x)
    needs_fp32 = x.dtype in (torch.float16, torch.bfloat16) or any(t in str(x.dtype) for t in ("float4_", "float8_"))
    normalized = F.normalize(x.float() if needs_fp32 else x, dim=(1 if norm.channel_first else -1)).to(x.dtype)
    return normalized.mul_(norm.scale).mul_(norm.gamma).add_(norm.bias)


def activate(nonlinearity: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``nonlinearity(x)``; SiLU in place (the same kernel and numbers), for a ``x`` that has no other reader."""
    if isinstance(nonlinearity, nn.SiLU):
        return F.silu(x, inplace=True)
    return nonlinearity(x)


def cached_conv(conv: wan.WanCausalConv3d, box: list, cache: list, idx: list, padded: bool = True) -> torch.Tensor:
    """A cached causal convolution with diffusers' cache bookkeeping (``WanResidualBlock.forward`` writes it inline,
    as do the encoder's and decoder's ``forward`` for conv_in and conv_out). Its input comes in ``box``, the only
    reference to it, so that it is freed once copied into the padded buffer, before the convolution runs.
    ``padded=False``: diffusers' own ``conv(x, cache)`` (what a memory estimate of diffusers' pass replays)."""
    i = idx[0]
    x = box.pop()
    cache_x = x[:, :, -wan.CACHE_T :].clone()
    if cache_x.shape[2] < 2 and cache[i] is not None:
        cache_x = torch.cat([cache[i][:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
    buffer = padded_input(conv, x, cache[i]) if padded else None
    if buffer is None:
        out = conv(x, cache[i])
    else:
        del x
        out = nn.Conv3d.forward(conv, buffer)  # its own padding is zero: the buffer carries it
        del buffer
    cache[i] = cache_x
    idx[0] += 1
    return out


def residual_block(block: wan.WanResidualBlock, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """``block(x, feat_cache=cache, feat_idx=idx)``, bit for bit, with fewer full-size tensors alive at once."""
    h = block.conv_shortcut(x)
    y = cached_conv(block.conv1, [activate(block.nonlinearity, rms_norm(block.norm1, x))], cache, idx)
    box = [block.dropout(activate(block.nonlinearity, rms_norm(block.norm2, y)))]
    del y  # the first convolution's output, as diffusers drops it once normed
    y = cached_conv(block.conv2, box, cache, idx)
    return y.add_(h)  # diffusers: x + h; addition commutes exactly, and y is this block's own
