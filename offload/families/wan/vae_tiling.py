"""Exact, memory-bounded decode and encode for diffusers' ``AutoencoderKLWan``: the ``vae_tiling`` option.

The Wan VAE is a stack of causal 3D convolutions plus ONE global operation per direction: the single-head
self-attention of the mid block, which runs over the whole spatial plane of each latent frame. Everything else is
spatially local (3x3 convolutions with zero padding 1, RMS norms over the channels of one pixel, nearest 2x
upsampling, stride-2 downsampling, the per-pixel ``DupUp3D``/``AvgDown3D`` shortcuts of the Wan2.2 variant). So:

decode = GLOBAL  post_quant_conv; conv_in, mid block (+ the resnets of up_blocks[0] when that block has no
                 shortcut) frame by frame at latent size, with their own causal cache -> a latent-size store
         LOCAL   the rest, one spatial tile at a time: all latent frames of a tile pass before the next tile
                 starts, each tile with its OWN causal cache; the tile's core is written into the output
encode = LOCAL   conv_in + down blocks, one tile at a time over all time chunks -> a latent-size store
         GLOBAL  mid block + norm_out/conv_out chunk by chunk, then quant_conv over the whole latent

A tile carries a halo at least as wide as the receptive field of what it still has to compute, so its core is
computed by the same arithmetic as the untiled pass: border tiles end at the image border and get the same zero
padding; at interior edges zero padding replaces real neighbours, which spoils a band that the halo absorbs. The
decoder crops that band after every module call, so each call carries only the halo the rest of the stack needs
(Wan2.1 and Wan2.2 alike: 7 latent px into up_blocks[0]'s upsampler, then 12/10/8 px at 2x, 10/8/6 at 4x, 7/5/3
and 1 at 8x). Inside a tile the decoder goes depth first in time: the frames made by a temporal upsample enter
the next block one at a time, which gives each causal conv the same three frames as before (same arithmetic)
with a quarter of the full-resolution transients.

Only diffusers' modules compute (their ``forward`` on sub-tensors, with per-tile cache lists); this file adds the
loops, the crops, the three lines of cache bookkeeping that ``WanDecoder3d.forward`` writes inline for
``conv_in``/``conv_out``, and the shortcut sum of ``WanResidualUpBlock.forward``. Nothing in diffusers is patched.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import weakref
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffusers.models.autoencoders import autoencoder_kl_wan as wan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ...core.host_copies import HostWriter, to_device
from ...core.plan_cache import PlanCache, default_cache_dir, fingerprint
from .vae_resnet import activate, cached_conv, residual_block, rms_norm

__all__ = [
    "DecodePlan",
    "EncodePlan",
    "MemoryEstimate",
    "plan_decode",
    "plan_encode",
    "decode_tiled",
    "encode_tiled",
    "estimate_decode_memory",
    "estimate_encode_memory",
    "area_overhead",
    "count_flops",
    "choose_decode_grid",
    "choose_decode_tiling",
    "choose_encode_tiling",
    "VaeTiling",
    "choose_encode_grid",
]


# ----------------------------------------------------------------------------------------------------------------
# Receptive field: how wide a band of wrong values a module leaves at a tile edge where zero padding stands in for
# the true neighbours. A band is (left, right) in pixels; the same numbers hold for rows and columns.
# ----------------------------------------------------------------------------------------------------------------

Band = tuple[int, int]


def _conv_band(kernel: int, pad: int, stride: int, band: Band) -> Band:
    if stride != 1 or kernel != 2 * pad + 1:
        raise ValueError(f"unsupported convolution for tiling: kernel {kernel}, padding {pad}, stride {stride}")
    r = (kernel - 1) // 2
    return band[0] + r, band[1] + r


def _causal_conv_band(conv: wan.WanCausalConv3d, band: Band) -> Band:
    # WanCausalConv3d keeps its padding in ``_padding`` = (w, w, h, h, 2*t, 0) and pads inside forward.
    if conv.kernel_size[1] != conv.kernel_size[2] or conv._padding[0] != conv._padding[2]:
        raise ValueError(f"non-square causal convolution {conv} cannot be tiled")
    return _conv_band(conv.kernel_size[2], conv._padding[0], conv.stride[2], band)


def _band(module: nn.Module, band: Band) -> Band:
    """Band of wrong values at the output of ``module`` given the band at its input (same-resolution units)."""
    if isinstance(module, (wan.WanAttentionBlock, wan.WanMidBlock)):
        raise ValueError(f"{type(module).__name__} attends over the whole frame; it cannot run on tiles")
    if isinstance(module, wan.WanCausalConv3d):
        return _causal_conv_band(module, band)
    if isinstance(module, wan.WanResidualBlock):
        if not isinstance(module.conv_shortcut, nn.Identity) and module.conv_shortcut.kernel_size[1:] != (1, 1):
            raise ValueError("a residual shortcut wider than 1x1 is not supported")
        return _causal_conv_band(module.conv2, _causal_conv_band(module.conv1, band))
    if isinstance(module, wan.WanResample):
        if module.mode in ("upsample2d", "upsample3d"):  # time_conv is (3, 1, 1): no spatial reach
            conv = module.resample[1]
            return _conv_band(conv.kernel_size[0], conv.padding[0], conv.stride[0], (2 * band[0], 2 * band[1]))
        if module.mode in ("downsample2d", "downsample3d"):
            # ZeroPad2d((0, 1, 0, 1)) then a 3x3 stride-2 conv: output o reads inputs 2o..2o+2, tiles start on even
            # pixels, so a band b on the left leaves ceil(b/2) and on the right (plus the pad column) b//2 + 1.
            return -(-band[0] // 2), band[1] // 2 + 1
        return band
    if isinstance(module, wan.WanResidualDownBlock):
        # The AvgDown3D shortcut averages aligned 2x2 blocks: ceil(b/2), inside the main path's band.
        for resnet in module.resnets:
            band = _band(resnet, band)
        return band if module.downsampler is None else _band(module.downsampler, band)
    raise ValueError(f"no receptive-field rule for {type(module).__name__}")


def _scale(module: nn.Module) -> Fraction:
    """Output pixels per input pixel."""
    s = Fraction(1)
    for m in module.modules():
        if isinstance(m, wan.WanResample):
            if m.mode.startswith("upsample"):
                s *= 2
            elif m.mode.startswith("downsample"):
                s /= 2
    return s


def _is_temporal(module: nn.Module) -> bool:
    """True if the module changes the frame count (it then needs a whole time chunk at once)."""
    for m in module.modules():
        if isinstance(m, wan.WanResample) and m.mode in ("upsample3d", "downsample3d"):
            return True
        if isinstance(m, (wan.AvgDown3D, wan.DupUp3D)) and m.factor_t > 1:
            return True
    return False


def _n_slots(module: nn.Module) -> int:
    """Cache slots a module uses (an upper bound: 1x1 shortcut convs count but take none)."""
    return max(1, sum(isinstance(m, wan.WanCausalConv3d) for m in module.modules()))


# ----------------------------------------------------------------------------------------------------------------
# Decoder: global part and the list of local calls ("ops").
# ----------------------------------------------------------------------------------------------------------------


def _global_resnets(vae) -> list[nn.Module]:
    """Resnets of up_blocks[0] that run in the global part: they are at latent size, so running them whole costs
    nothing extra and saves their halo. Only when the block has no shortcut from its input (Wan2.1), since the
    Wan2.2 DupUp3D shortcut would need the block input stored as well."""
    block = vae.decoder.up_blocks[0]
    if isinstance(block, wan.WanUpBlock):
        return list(block.resnets)
    return []


@dataclass(frozen=True, eq=False)
class _Op:
    """One call into a diffusers module on a tile."""

    module: nn.Module
    kind: str  # "resnet" | "sampler" | "head"
    scale: int
    band: int
    temporal: bool
    block: int  # index of the up block (or -1 for the head)
    saves_block_input: bool = False  # first op of a block whose sampler adds a shortcut from the block input
    shortcut: nn.Module | None = None  # DupUp3D of a WanResidualUpBlock, added after its sampler

    def __call__(self, x: torch.Tensor, cache: list, first_chunk: bool, lean: bool = True) -> torch.Tensor:
        if self.kind == "head":
            dec = self.module
            if not lean:
                return cached_conv(dec.conv_out, [dec.nonlinearity(dec.norm_out(x))], cache, [0], padded=False)
            return cached_conv(dec.conv_out, [activate(dec.nonlinearity, rms_norm(dec.norm_out, x))], cache, [0])
        return _stage(self.module, x, cache, lean)


def _stage(module: nn.Module, x: torch.Tensor, cache: list, lean: bool = True) -> torch.Tensor:
    """``module(x, feat_cache=cache, feat_idx=[0])``; with ``lean`` a residual block runs as ``vae_resnet`` runs it
    (the same numbers, fewer full-size transients: the tiled passes' peak is inside these blocks). ``lean=False``
    is for estimating diffusers' own blocks (the untiled pass that runs when it fits)."""
    if lean and isinstance(module, wan.WanResidualBlock):
        return residual_block(module, x, cache, [0])
    return module(x, feat_cache=cache, feat_idx=[0])


def _decoder_ops(vae, skip_resnets: int) -> list[_Op]:
    ops = []
    for b, block in enumerate(vae.decoder.up_blocks):
        sampler = block.upsamplers[0] if isinstance(block, wan.WanUpBlock) and block.upsamplers else None
        shortcut = None
        if isinstance(block, wan.WanResidualUpBlock):
            sampler, shortcut = block.upsampler, block.avg_shortcut
        resnets = list(block.resnets)[skip_resnets if b == 0 else 0 :]
        if shortcut is not None and len(resnets) != len(block.resnets):
            raise ValueError("cannot split a block with a shortcut between the global and the local part")
        for j, r in enumerate(resnets):
            ops.append(_Op(r, "resnet", 1, max(_band(r, (0, 0))), False, b, saves_block_input=(shortcut is not None
                                                                                               and j == 0)))
        if sampler is not None:
            ops.append(_Op(sampler, "sampler", int(_scale(sampler)), max(_band(sampler, (0, 0))),
                           _is_temporal(sampler), b, shortcut=shortcut))
        elif shortcut is not None:
            raise ValueError("a shortcut without an upsampler is not supported")
    head = vae.decoder
    ops.append(_Op(head, "head", 1, max(_causal_conv_band(head.conv_out, (0, 0))), False, -1))
    return ops


def _decode_global(vae, z: torch.Tensor, store: torch.Tensor, n_resnets: int, writer: HostWriter) -> None:
    """post_quant_conv over all of z (as diffusers), then conv_in, the mid block and the first ``n_resnets``
    resnets of up_blocks[0], frame by frame, each frame written into ``store`` (by ``writer``: it may be host
    memory)."""
    dec = vae.decoder
    resnets = list(dec.up_blocks[0].resnets)[:n_resnets]
    x = vae.post_quant_conv(z)
    cache = [None] * (1 + _n_slots(dec.mid_block) + sum(_n_slots(r) for r in resnets))
    for k in range(x.shape[2]):
        idx = [0]
        y = cached_conv(dec.conv_in, [x[:, :, k : k + 1]], cache, idx)
        y = dec.mid_block(y, feat_cache=cache, feat_idx=idx)
        for r in resnets:
            y = r(y, feat_cache=cache, feat_idx=idx)
        writer.write(store[:, :, k : k + 1], y)
        del y


# ----------------------------------------------------------------------------------------------------------------
# Plans.
# ----------------------------------------------------------------------------------------------------------------

Region = tuple[int, int, int, int]  # r0, r1, c0, c1


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _scaled(region: Region, f: int) -> Region:
    return tuple(v * f for v in region)


@dataclass(frozen=True)
class _Tile:
    rows: tuple[int, int]  # core, latent pixels
    cols: tuple[int, int]
    regions: tuple[Region, ...]  # decode: input of each op, then the output core; encode: (input, latent)


@dataclass(frozen=True)
class DecodePlan:
    latent_hw: tuple[int, int]
    grid: tuple[int, int]
    halos: tuple[int, ...]  # at the input of each local op, then 0 at the output; in that op's pixels
    scales: tuple[int, ...]  # resolution of each op's input relative to the latent
    tiles: tuple[_Tile, ...] = field(repr=False)
    store_channels: int = 0  # channels of the latent-size store between the global and the local part
    global_resnets: int = 0  # leading resnets of up_blocks[0] run in the global part


def _decode_halos(ops: list[_Op]) -> list[int]:
    """An op of scale s that makes a band g from a zero-padded edge turns a valid halo h at its input into
    s*h - g at its output, so the halo its input needs is ceil((h_next + g) / s)."""
    halos = [0]
    for op in reversed(ops):
        halos.append(math.ceil((halos[-1] + op.band) / op.scale))
    return halos[::-1]


def plan_decode(vae, latent_hw, grid=(1, 1), *, halos=None, crop: bool = True,
                global_resnets: bool = True) -> DecodePlan:
    """Split a latent ``(h, w)`` into ``grid = (rows, cols)`` tiles, with each op's halo.

    For experiments: ``halos`` overrides the halos, an int the one at the input of the first local op, a sequence
    all of them; ``crop=False`` keeps the whole tile through every op and crops only the output (the plain exact
    scheme; more compute). ``global_resnets=False`` keeps up_blocks[0]'s resnets in the local part.
    """
    h, w = latent_hw
    skip = len(_global_resnets(vae)) if global_resnets else 0
    ops = _decoder_ops(vae, skip)
    hl = _decode_halos(ops)
    if isinstance(halos, int):
        hl[0] = halos
    elif halos is not None:
        if len(halos) != len(hl):
            raise ValueError(f"need {len(hl)} halos (one per local op and the output), got {len(halos)}")
        hl = list(halos)
    if not crop:
        hl[1:-1] = [10**9] * (len(hl) - 2)
    scales = [1]
    for op in ops:
        scales.append(scales[-1] * op.scale)
    tiles = []
    for r in _split(h, grid[0]):
        for c in _split(w, grid[1]):
            regions = []
            for i, (halo, s) in enumerate(zip(hl, scales)):
                lo = (0, h * s, 0, w * s) if i == 0 else _scaled(regions[-1], ops[i - 1].scale)
                regions.append((max(lo[0], r[0] * s - halo), min(lo[1], r[1] * s + halo),
                                max(lo[2], c[0] * s - halo), min(lo[3], c[1] * s + halo)))
            tiles.append(_Tile(r, c, tuple(regions)))
    if skip:
        channels = vae.decoder.up_blocks[0].resnets[skip - 1].out_dim
    else:
        channels = vae.decoder.mid_block.dim
    return DecodePlan((h, w), tuple(grid), tuple(hl), tuple(scales), tuple(tiles), channels, skip)


@dataclass(frozen=True)
class EncodePlan:
    latent_hw: tuple[int, int]
    grid: tuple[int, int]
    halo: int  # latent pixels
    factor: int  # input pixels (after patchify) per latent pixel
    tiles: tuple[_Tile, ...] = field(repr=False)


class _ConvIn:
    """The encoder's conv_in as a stage, with its cache."""

    def __init__(self, enc):
        self.conv = enc.conv_in

    def __call__(self, x, feat_cache, feat_idx):
        return cached_conv(self.conv, [x], feat_cache, feat_idx)

    def modules(self):
        return iter((self.conv,))


def _encoder_stages(vae) -> list:
    for m in vae.encoder.down_blocks:
        if isinstance(m, wan.WanAttentionBlock):
            raise ValueError("this encoder has attention in its down blocks (attn_scales); it cannot be tiled")
    return [_ConvIn(vae.encoder), *vae.encoder.down_blocks]


def _encode_halo(vae) -> tuple[int, int]:
    """(halo in latent pixels, input pixels per latent pixel) of the local encoder part."""
    band: Band = (0, 0)
    factor = Fraction(1)
    for stage in _encoder_stages(vae):
        band = _causal_conv_band(stage.conv, band) if isinstance(stage, _ConvIn) else _band(stage, band)
        factor /= _scale(stage)
    return max(band), int(factor)


def _pixels_per_latent(vae) -> int:
    """Input pixels per latent pixel along a side: the encoder's downsampling times the patch size."""
    return _encode_halo(vae)[1] * (vae.config.patch_size or 1)


def plan_encode(vae, latent_hw, grid=(1, 1), *, halo: int | None = None) -> EncodePlan:
    """Tiles of the encoder: cores in latent pixels; inputs start on multiples of the downsampling factor, so
    every stride-2 conv sees the same pixel pairs as in the untiled pass."""
    h, w = latent_hw
    need, factor = _encode_halo(vae)
    halo = need if halo is None else halo
    tiles = []
    for r in _split(h, grid[0]):
        for c in _split(w, grid[1]):
            lat = (max(0, r[0] - halo), min(h, r[1] + halo), max(0, c[0] - halo), min(w, c[1] + halo))
            tiles.append(_Tile(r, c, (_scaled(lat, factor), lat)))
    return EncodePlan((h, w), tuple(grid), halo, factor, tuple(tiles))


# ----------------------------------------------------------------------------------------------------------------
# Decode.
# ----------------------------------------------------------------------------------------------------------------


def _crop(x: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    if have == want:
        return x
    r0, c0 = want[0] - have[0], want[2] - have[2]
    # A copy, not a view: elementwise kernels (RMS norm, SiLU, adds) on strided views are several times slower
    # (CPU measurement), and the uncropped tensor is dropped right after anyway.
    return x[..., r0 : r0 + want[1] - want[0], c0 : c0 + want[3] - want[2]].contiguous()


def _buffer(shape, dtype, compute: torch.device, where: torch.device) -> torch.Tensor:
    pin = where.type == "cpu" and compute.type == "cuda"
    return torch.empty(shape, dtype=dtype, device=where, pin_memory=pin)


def _store_buffer(shape, dtype, compute: torch.device, where: torch.device) -> torch.Tensor:
    """The latent-size ``[B, C, T, h, w]`` buffer between the global part and the tiles, laid out frame-major in
    memory: one frame of it (``store[:, :, k:k+1]``, batch 1) is one contiguous block, which in host memory is one
    DMA each way (``core.host_copies``) where a channel-major frame would be a synchronous strided copy."""
    b, c, t, h, w = shape
    return _buffer((b, t, c, h, w), dtype, compute, where).transpose(1, 2)


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """A decoded video ``[B, C, F, H, W]`` in -1..1 as frames ``[B, F, H, W, C]`` float32 in 0..1 - diffusers'
    ``x * 0.5 + 0.5`` clamped, the layout of ComfyUI's IMAGE - as a view where it can be (not contiguous). The one
    definition both the untiled decode and the tiles use, so their frames are the same bit for bit."""
    return (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()


def _frames_out(vae, t_latent: int) -> int:
    ft = 2 ** sum(isinstance(m, wan.WanResample) and m.mode == "upsample3d" for m in vae.decoder.modules())
    return 1 + (t_latent - 1) * ft


class _TileRun:
    """The local decoder part for one tile: per-op causal caches, depth first over frames.

    A class rather than a recursive closure: a closure that calls itself is a reference cycle and would keep the
    tile's caches alive until the garbage collector runs, i.e. into the next tile.
    """

    def __init__(self, vae, plan: DecodePlan, tile: _Tile, out: torch.Tensor, frame_split: bool, lean: bool,
                 writer: HostWriter, frames: bool):
        self.ops = _decoder_ops(vae, plan.global_resnets)
        self.caches = [[None] * _n_slots(op.module if op.kind != "head" else op.module.conv_out) for op in self.ops]
        self.block_inputs: dict[int, tuple[torch.Tensor, Region]] = {}
        self.plan, self.tile, self.out, self.frame_split, self.lean = plan, tile, out, frame_split, lean
        self.writer, self.frames = writer, frames
        self.p = vae.config.patch_size or 1
        self.t_out = 0

    def emit(self, y: torch.Tensor) -> None:
        p = self.p
        r0, r1, c0, c1 = self.tile.regions[-1]
        if p > 1:
            y = wan.unpatchify(y, patch_size=p)
        y = torch.clamp(y, min=-1.0, max=1.0)
        n = y.shape[2]
        t, rows, cols = slice(self.t_out, self.t_out + n), slice(p * r0, p * r1), slice(p * c0, p * c1)
        if self.frames:  # made on the device, a tile at a time: the host only puts them in place
            self.writer.write(self.out[:, t, rows, cols], video_to_frames(y))
        else:
            self.writer.write(self.out[:, :, t, rows, cols], y)
        self.t_out += n

    def run(self, i: int, x: torch.Tensor, first_chunk: bool) -> None:
        """Ops i, i+1, ... on ``x``; recurses only where a temporal upsample's frames are fed one at a time, so
        an op's output is dropped as soon as the next op has consumed it."""
        regions = self.tile.regions
        while True:
            op = self.ops[i]
            if op.saves_block_input:
                self.block_inputs[op.block] = (x, regions[i])
            y = op(x, self.caches[i], first_chunk, self.lean)
            x = None
            have = _scaled(regions[i], op.scale)
            if op.shortcut is not None:  # WanResidualUpBlock: x + avg_shortcut(x_copy, first_chunk)
                xin, rin = self.block_inputs.pop(op.block)
                y = y + _crop(op.shortcut(xin, first_chunk=first_chunk), _scaled(rin, op.scale), have)
                del xin
            y = _crop(y, have, regions[i + 1])
            if i + 1 == len(self.ops):
                self.emit(y)
                return
            if self.frame_split and op.temporal and y.shape[2] > 1:
                for t in range(y.shape[2]):
                    self.run(i + 1, y[:, :, t : t + 1].contiguous(), first_chunk)
                return
            x, y, i = y, None, i + 1


def _decode_tile(vae, plan: DecodePlan, tile: _Tile, store: torch.Tensor, out: torch.Tensor, device,
                 frame_split: bool, lean: bool, writer: HostWriter, frames: bool) -> None:
    run = _TileRun(vae, plan, tile, out, frame_split, lean, writer, frames)
    r0, r1, c0, c1 = tile.regions[0]
    for k in range(store.shape[2]):
        # the whole frame travels (one DMA from a host store) and is cropped on the device
        x = to_device(store[:, :, k : k + 1], device)[..., r0:r1, c0:c1].contiguous()
        run.run(0, x, first_chunk=(k == 0))
        del x
    expected = out.shape[1 if frames else 2]
    if run.t_out != expected:
        raise RuntimeError(f"decoded {run.t_out} frames, expected {expected}")


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, grid=None, *, budget_bytes: int | None = None, frame_split: bool = True,
                 output_device=None, store_device=None, plan: DecodePlan | None = None,
                 frames: bool = False) -> torch.Tensor:
    """``vae.decode(z).sample`` computed tile by tile: ``[B, C, F, H, W]``, clamped to -1..1; with ``frames``,
    that video as :func:`video_to_frames` gives it, ``[B, F, H, W, C]`` in 0..1, made tile by tile on the device.

    grid: ``(rows, cols)`` of spatial tiles; None takes the cheapest grid whose estimated activation peak fits
      ``budget_bytes`` (untiled when no budget is given).
    frame_split: frames made by a temporal upsample enter the next block one at a time (less memory, same math).
    output_device: where the video is assembled (default z's device). "cpu" keeps it off the GPU; tiles are
      copied out through pinned memory while the next ones are computed (``core.host_copies``).
    store_device: where the latent-size output of the global part waits for the tiles (default z's device).
    """
    device = z.device
    b, _, t, h, w = z.shape
    output_device = device if output_device is None else torch.device(output_device)
    store_device = device if store_device is None else torch.device(store_device)
    if plan is None:
        if grid is None:
            grid = (1, 1) if budget_bytes is None else choose_decode_grid(
                vae, z.shape, budget_bytes, frame_split=frame_split, output_on_device=output_device == device,
                store_on_device=store_device == device)
        plan = plan_decode(vae, (h, w), grid)
    dec = vae.decoder
    p = vae.config.patch_size or 1
    c_out = dec.conv_out.out_channels // (p * p)
    s = plan.scales[-1] * p
    writer = HostWriter()
    store = _store_buffer((b, plan.store_channels, t, h, w), z.dtype, device, store_device)
    _decode_global(vae, z, store, plan.global_resnets, writer)
    n_frames = _frames_out(vae, t)
    if frames:  # assembled by the host from staged tiles: ordinary (pageable) memory
        out = torch.empty((b, n_frames, h * s, w * s, c_out), dtype=torch.float32, device=output_device)
    else:
        out = _buffer((b, c_out, n_frames, h * s, w * s), z.dtype, device, output_device)
    for tile in plan.tiles:
        _decode_tile(vae, plan, tile, store, out, device, frame_split, True, writer, frames)
    writer.finish(device if output_device != device or store_device != device else None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Encode.
# ----------------------------------------------------------------------------------------------------------------


def _chunks(n_frames: int) -> list[tuple[int, int]]:
    """diffusers' encode chunks: frame 0 alone, then 4 at a time (trailing frames past 1+4k are dropped)."""
    n = 1 + (n_frames - 1) // 4
    return [(0, 1)] + [(1 + 4 * (i - 1), 1 + 4 * i) for i in range(1, n)]


def _encode_tile(vae, plan: EncodePlan, tile: _Tile, video: torch.Tensor, store: torch.Tensor, device,
                 frame_split: bool = True, lean: bool = True) -> None:
    stages = _encoder_stages(vae)
    caches = [[None] * _n_slots(s) for s in stages]
    split = next((i for i, s in enumerate(stages) if _is_temporal(s)), len(stages))
    p = vae.config.patch_size or 1
    (i0, i1, j0, j1), lat = tile.regions
    core = (*tile.rows, *tile.cols)
    for k, (f0, f1) in enumerate(_chunks(video.shape[2])):
        # the video may be a host tensor: only this tile's frames of this chunk travel
        x = to_device(video[:, :, f0:f1, p * i0 : p * i1, p * j0 : p * j1], device)
        if p > 1:
            x = wan.patchify(x, patch_size=p)
        # Before the first temporal downsample the stages may see one frame at a time (frame_split: a quarter of
        # the full-resolution transients, same causal windows) or the whole chunk, as diffusers' encoder does.
        pieces = [x[:, :, t : t + 1].contiguous() for t in range(x.shape[2])] if frame_split else [x]
        del x
        frames = []
        while pieces:
            y = pieces.pop(0)
            for i in range(split):
                y = _stage(stages[i], y, caches[i], lean)
            frames.append(y)
        del y
        y = frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)
        del frames
        for i in range(split, len(stages)):
            y = _stage(stages[i], y, caches[i], lean)
        y = _crop(y, lat, core)
        store[:, :, k : k + 1, core[0] : core[1], core[2] : core[3]].copy_(y, non_blocking=True)


def _encode_global(enc, store: torch.Tensor, device) -> list[torch.Tensor]:
    """The encoder's global part over the latent-size ``store``, chunk by chunk through its causal caches: the mid
    block (its attention over whole frames), then norm_out and conv_out. One output per time chunk."""
    cache = [None] * (_n_slots(enc.mid_block) + 1)
    outs = []
    for k in range(store.shape[2]):
        idx = [0]
        y = enc.mid_block(store[:, :, k : k + 1].to(device, non_blocking=True), feat_cache=cache, feat_idx=idx)
        outs.append(cached_conv(enc.conv_out, [activate(enc.nonlinearity, enc.norm_out(y))], cache, idx))
    return outs


@torch.no_grad()
def encode_tiled(vae, video: torch.Tensor, grid=None, *, budget_bytes: int | None = None, device=None,
                 store_device=None, plan: EncodePlan | None = None, frame_split: bool = True
                 ) -> DiagonalGaussianDistribution:
    """``vae.encode(video).latent_dist``, computed tile by tile.

    ``video`` may stay on the CPU (give ``device``): each tile's frames are moved when they are needed.
    frame_split: the stages before the first temporal downsample see one frame at a time (less memory, same math)
      rather than a whole chunk of four.
    """
    device = video.device if device is None else torch.device(device)
    store_device = device if store_device is None else torch.device(store_device)
    b, _, f, hh, ww = video.shape
    enc = vae.encoder
    if plan is None:
        factor = _pixels_per_latent(vae)
        if hh % factor or ww % factor:
            raise ValueError(f"frame size {hh}x{ww} must be a multiple of {factor} for an exact tiled encode")
        if grid is None:
            grid = (1, 1) if budget_bytes is None else choose_encode_grid(
                vae, video.shape, budget_bytes, store_on_device=store_device == device, frame_split=frame_split)
        plan = plan_encode(vae, (hh // factor, ww // factor), grid)
    h, w = plan.latent_hw
    chunks = _chunks(f)
    store = _buffer((b, enc.mid_block.dim, len(chunks), h, w), video.dtype, device, store_device)
    for tile in plan.tiles:
        _encode_tile(vae, plan, tile, video, store, device, frame_split)
    outs = _encode_global(enc, store, device)
    del store
    moments = vae.quant_conv(torch.cat(outs, dim=2))
    return DiagonalGaussianDistribution(moments)


# ----------------------------------------------------------------------------------------------------------------
# Memory and FLOP estimates: run the same code on the meta device.
# ----------------------------------------------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, as a caching allocator would see them (no fragmentation, no workspaces)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live:
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out

    def _free(self, key):
        self.current -= self.live.pop(key)

    def reset_peak(self):
        self.peak = self.current


class _GpuKernels(TorchFunctionMode):
    """Two calls whose meta replay would not be what a GPU does, replaced by what the GPU allocates.

    SDPA: on meta it decomposes to the math path (an N x N score matrix); a GPU runs fp32 attention with the
    memory-efficient kernel, whose only extra buffer is O(N). ``F.normalize`` (the VAE's RMS norms): on meta it runs
    as PyTorch's Python reference, a dozen decomposed operations each seen by :class:`_LiveBytes` - two thirds of a
    plan's time (1.0 s of a 1.55 s start-frame encode plan on this repository's CPU) - where a GPU computes the norm
    (one value per position) and then the quotient (input-sized): the same two allocations, and the same peak, as
    the reference's (``tests/test_vae_tiling.py`` checks the estimates are unchanged)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        if func is F.normalize and args[0].device.type == "meta":
            x = args[0]
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
            dims = {d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim)}
            norm = x.new_empty(tuple(1 if i in dims else n for i, n in enumerate(x.shape)))
            out = x.new_empty(x.shape)
            del norm
            return out
        return func(*args, **kwargs)


@functools.cache
def _plans() -> PlanCache:
    """The machine's plan cache (``core.plan_cache``), opened on first use."""
    return PlanCache(default_cache_dir())


@functools.cache
def _planner_version() -> str:
    """What the replays' answers depend on besides their arguments: this file, the residual blocks it runs
    (``vae_resnet``) and the libraries that run them."""
    import diffusers

    here = Path(__file__).parent
    return fingerprint(Path(__file__).read_bytes(), (here / "vae_resnet.py").read_bytes(), torch.__version__,
                       diffusers.__version__)


def _kept_on_disk(namespace: str):
    """Keep a replay's answers on disk between processes (below the in-process ``lru_cache``)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            return _plans().memoize(namespace, _planner_version())(fn)(*args)

        return wrapper

    return decorate


def _vae_key(vae) -> tuple:
    """What a replay depends on: the class, the config and the dtype (hashable, for the caches below)."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    return type(vae), json.dumps(config, sort_keys=True), str(next(vae.parameters()).dtype)


def weightless_vae(cls: type, config: dict, dtype: torch.dtype) -> nn.Module:
    """A VAE of ``cls`` built from ``config`` on the meta device, with the replays' own copy of it made too: what
    planning needs of a VAE that is not loaded, built here because building touches process-wide state (the
    default device) that planning in a background thread must not (``tiling_policy.decode_planner``). Kept per
    class, config and dtype: the sampler asks for it before every run's steps."""
    return _weightless_vae(cls, json.dumps(config, sort_keys=True), str(dtype))


@functools.lru_cache(maxsize=4)
def _weightless_vae(cls: type, config_json: str, dtype: str) -> nn.Module:
    with torch.device("meta"):
        vae = cls.from_config(json.loads(config_json)).eval()
    vae = nn.Module.to(vae, getattr(torch, dtype.split(".")[-1]))
    _meta_vae(_vae_key(vae))
    return vae


@functools.lru_cache(maxsize=4)
def _meta_vae(key: tuple):
    """A weightless copy of a VAE (same config and dtype) on the meta device."""
    cls, config_json, dtype = key
    with torch.device("meta"):
        meta = cls.from_config(json.loads(config_json)).eval()
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32 modules, which do not matter without weights
    return nn.Module.to(meta, getattr(torch, dtype.split(".")[-1]))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of activations (weights excluded) of a tiled run, from a meta-device replay of the code."""

    peak: int  # max of the two phases below, for the full frame count
    global_phase: int  # global part at latent size (+ the buffers alive then)
    tile_phase: int  # worst tile (+ store and output buffers if on the device)
    store: int  # latent-size buffer between the phases
    output: int  # output video (decode) if on the device
    weights: int  # parameters of the whole VAE (for reference)

    def total(self) -> int:
        return self.peak + self.weights


def _weights(vae) -> int:
    return sum(p.numel() * p.element_size() for p in vae.parameters())


def _worst_tiles(tiles) -> list[_Tile]:
    """The tiles with the largest area at some level (usually one tile: an interior one). Memory grows with the
    area at every level, so the peak of a grid is the peak of one of these."""
    picks = {}
    for lvl in range(len(tiles[0].regions)):
        t = max(tiles, key=lambda tl: (tl.regions[lvl][1] - tl.regions[lvl][0]) * (tl.regions[lvl][3] - tl.regions[lvl][2]))
        picks[id(t)] = t
    return list(picks.values())


def estimate_decode_memory(vae, latent_shape, grid=(1, 1), *, frame_split=True, output_on_device=True, lean=True,
                           store_on_device=True, probe_frames: int = 3, frames: bool = True) -> MemoryEstimate:
    """Peak activation bytes of ``decode_tiled`` for ``latent_shape = (B, C, T, h, w)``.

    Replays the code on the meta device for ``probe_frames`` latent frames (the causal caches are full from the
    second frame on, so later frames repeat the same pattern) for the worst tile, and scales the
    frame-proportional buffers (store, output) to T. Results are cached per (config, dtype, shape, options).
    ``frames``: the tiles made into frames on the device (``decode_tiled(frames=True)``, what the pipeline runs).
    """
    est = _estimate_decode(_vae_key(vae), tuple(latent_shape), tuple(grid), frame_split, output_on_device, lean,
                           store_on_device, probe_frames, frames)
    return MemoryEstimate(*est, _weights(vae))


@functools.lru_cache(maxsize=256)
def _estimate_decode(key, latent_shape, grid, frame_split, output_on_device, lean, store_on_device, probe_frames,
                     frames=True):
    b, c, t, h, w = latent_shape
    global_peak, tile_peak, store_probe, out_probe, store_frame, out_frame, frames_per_latent = _replay_decode(
        key, (b, c, min(t, probe_frames), h, w), grid, frame_split, lean, frames)
    store_full = store_frame * t if store_on_device else 0
    out_full = out_frame * (1 + (t - 1) * frames_per_latent) if output_on_device else 0
    # the probe's store and output covered its frames; the real ones cover t (or live on the host)
    global_phase = global_peak - store_probe + store_full
    tile_phase = tile_peak - store_probe - out_probe + store_full + out_full
    return max(global_phase, tile_phase), global_phase, tile_phase, store_full, out_full


@functools.lru_cache(maxsize=256)
@_kept_on_disk("vae-decode-replay")
@torch.no_grad()
def _replay_decode(key, probe_shape, grid, frame_split, lean=True, frames=True):
    """The meta replay behind :func:`estimate_decode_memory`, for ``probe_shape``'s few latent frames: the peaks of
    the global part and of the worst tile, the probe's store and output bytes, and the bytes per frame of both and
    the output frames per latent frame, so that any frame count and buffer placement is arithmetic on it."""
    meta = _meta_vae(key)
    dtype = next(meta.parameters()).dtype
    b, c, tp, h, w = probe_shape
    plan = plan_decode(meta, (h, w), grid)
    p = meta.config.patch_size or 1
    c_out = meta.decoder.conv_out.out_channels // (p * p)
    s = plan.scales[-1] * p
    item = torch.empty((), dtype=dtype).element_size()
    out_item = 4 if frames else item  # frames are float32
    meta_dev = torch.device("meta")
    writer = HostWriter()  # on meta every write is a plain copy
    with _GpuKernels(), _LiveBytes() as mem:
        z = torch.empty((b, c, tp, h, w), dtype=dtype, device=meta_dev)
        store = torch.empty((b, plan.store_channels, tp, h, w), dtype=dtype, device=meta_dev)
        _decode_global(meta, z, store, plan.global_resnets, writer)
        del z
        global_peak = mem.peak
        n_out = _frames_out(meta, tp)
        out_probe = (torch.empty((b, n_out, h * s, w * s, c_out), dtype=torch.float32, device=meta_dev) if frames
                     else torch.empty((b, c_out, n_out, h * s, w * s), dtype=dtype, device=meta_dev))
        tile_peak = 0
        for tile in _worst_tiles(plan.tiles):
            mem.reset_peak()
            _decode_tile(meta, plan, tile, store, out_probe, meta_dev, frame_split, lean, writer, frames)
            tile_peak = max(tile_peak, mem.peak)
        store_probe = store.numel() * item
        out_probe_bytes = out_probe.numel() * out_item
    store_frame = b * plan.store_channels * h * w * item
    out_frame = b * c_out * h * s * w * s * out_item
    return global_peak, tile_peak, store_probe, out_probe_bytes, store_frame, out_frame, _frames_out(meta, 2) - 1


def estimate_encode_memory(vae, video_shape, grid=(1, 1), *, store_on_device=True, video_on_device=False,
                           frame_split: bool = True, probe_chunks: int = 3, lean: bool = True) -> MemoryEstimate:
    """Peak activation bytes of ``encode_tiled`` for ``video_shape = (B, C, F, H, W)`` (video kept on the CPU
    unless ``video_on_device``), from a meta replay of ``probe_chunks`` time chunks of the worst tile."""
    est = _estimate_encode(_vae_key(vae), tuple(video_shape), tuple(grid), store_on_device, video_on_device,
                           frame_split, probe_chunks, lean)
    return MemoryEstimate(*est, _weights(vae))


@functools.lru_cache(maxsize=256)
def _estimate_encode(key, video_shape, grid, store_on_device, video_on_device, frame_split, probe_chunks, lean):
    b, c, f, hh, ww = video_shape
    n = len(_chunks(f))
    probe_frames = 1 + 4 * (min(n, probe_chunks) - 1)
    global_peak, tile_peak, store_probe, store_chunk, item = _replay_encode(
        key, (b, c, probe_frames, hh, ww), grid, frame_split, lean)
    store_full = store_chunk * n if store_on_device else 0
    video_full = b * c * f * hh * ww * item if video_on_device else 0
    tile_phase = tile_peak - store_probe + store_full + video_full
    global_phase = global_peak - store_probe + store_full + video_full
    return max(tile_phase, global_phase), global_phase, tile_phase, store_full, 0


@functools.lru_cache(maxsize=256)
@_kept_on_disk("vae-encode-replay")
@torch.no_grad()
def _replay_encode(key, probe_shape, grid, frame_split, lean=True):
    """The meta replay behind :func:`estimate_encode_memory`, for ``probe_shape``'s few frames (the video itself
    counted as a host tensor): the peaks of the worst tile and of the global part, the probe's store bytes, the
    store's bytes per time chunk and the element size, so that any frame count and placement is arithmetic on it."""
    meta = _meta_vae(key)
    dtype = next(meta.parameters()).dtype
    b, c, fp, hh, ww = probe_shape
    factor = _pixels_per_latent(meta)
    plan = plan_encode(meta, (hh // factor, ww // factor), grid)
    h, w = plan.latent_hw
    item = torch.empty((), dtype=dtype).element_size()
    dim = meta.encoder.mid_block.dim
    meta_dev = torch.device("meta")
    with _GpuKernels(), _LiveBytes() as mem:
        video = torch.empty((b, c, fp, hh, ww), dtype=dtype, device=meta_dev)
        video_probe = video.numel() * item
        mem.current -= video_probe  # the meta "video" stands for a host tensor
        mem.peak = mem.current
        store_shape = (b, dim, len(_chunks(fp)), h, w)
        store = torch.empty(store_shape, dtype=dtype, device=meta_dev)
        store_probe = store.numel() * item
        tile_peak = 0
        for tile in _worst_tiles(plan.tiles):
            mem.reset_peak()
            _encode_tile(meta, plan, tile, video, store, meta_dev, frame_split, lean)
            tile_peak = max(tile_peak, mem.peak)
        mem.current += video_probe  # balance the finalizer of the meta video
    return _replay_encode_global(key, store_shape), tile_peak, store_probe, b * dim * h * w * item, item


@functools.lru_cache(maxsize=64)
@_kept_on_disk("vae-encode-global-replay")
@torch.no_grad()
def _replay_encode_global(key, store_shape):
    """The peak of the encoder's global part over a latent-size store of ``store_shape`` (the store included): the
    same for every grid, so replayed once per size rather than with each grid's tiles (a third of a replay's time,
    on the path of a process's first start-frame encode)."""
    meta = _meta_vae(key)
    with _GpuKernels(), _LiveBytes() as mem:
        store = torch.empty(store_shape, dtype=next(meta.parameters()).dtype, device="meta")
        mem.reset_peak()
        outs = _encode_global(meta.encoder, store, torch.device("meta"))
        meta.quant_conv(torch.cat(outs, dim=2))
        return mem.peak


def count_flops(vae, latent_shape, grid=(1, 1), *, encode: bool = False) -> int:
    """FLOPs (convolutions, matmuls, attention) of the tiled decode or encode of ``latent_shape``, on meta.

    Exact for any frame count: frame 0 and one steady-state frame are counted and the latter repeated.
    """
    return _count_flops(_vae_key(vae), tuple(latent_shape), tuple(grid), encode)


def _tile_shape(tile: _Tile) -> tuple:
    """What a tile's FLOPs depend on: the size of its region at every level (not where it lies)."""
    return tuple((r[1] - r[0], r[3] - r[2]) for r in tile.regions)


@functools.lru_cache(maxsize=256)
@_kept_on_disk("vae-flops")
@torch.no_grad()
def _count_flops(key, latent_shape, grid, encode):
    """Replays the pass once without tiles (the parts outside them) and once per distinct tile shape (a 2x3 grid
    has two: edge and middle columns), not once per tile: the count is the same, the replay a third of the time
    (it runs on the planner's path, before a VAE pass of the first run at a size)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = _meta_vae(key)
    dtype = next(meta.parameters()).dtype
    b, c, t, h, w = latent_shape
    plan = plan_encode(meta, (h, w), grid) if encode else plan_decode(meta, (h, w), grid)
    shapes = collections.Counter(_tile_shape(tile) for tile in plan.tiles)
    representative = {_tile_shape(tile): tile for tile in reversed(plan.tiles)}

    def run(frames: int, tiles: tuple[_Tile, ...]) -> int:
        part = dataclasses.replace(plan, tiles=tiles)
        with FlopCounterMode(display=False) as fc:
            if encode:
                factor = _pixels_per_latent(meta)
                video = torch.empty((b, meta.config.in_channels // (meta.config.patch_size or 1) ** 2,
                                     1 + 4 * (frames - 1), h * factor, w * factor), dtype=dtype, device="meta")
                encode_tiled(meta, video, plan=part)
            else:
                decode_tiled(meta, torch.empty((b, c, frames, h, w), dtype=dtype, device="meta"), plan=part)
        return fc.get_total_flops()

    def total(frames: int) -> int:
        outside = run(frames, ())
        return outside + sum(n * (run(frames, (representative[shape],)) - outside) for shape, n in shapes.items())

    f1 = total(1)
    return f1 if t == 1 else f1 + (t - 1) * (total(2) - f1)


# ----------------------------------------------------------------------------------------------------------------
# Choosing tiles from a memory budget.
# ----------------------------------------------------------------------------------------------------------------


def _grids(h: int, w: int, max_tiles: int = 64):
    """Candidate grids, cheapest first. A cut across a side of length n recomputes a halo band of fixed width, so
    its compute overhead is proportional to 1/n: a grid costs (rows - 1)/h + (cols - 1)/w."""
    grids = [(r, c) for r in range(1, min(h, 16) + 1) for c in range(1, min(w, 16) + 1) if r * c <= max_tiles]
    return sorted(grids, key=lambda g: ((g[0] - 1) / h + (g[1] - 1) / w, g[0] * g[1]))


SKIP_PREDICTED_OVER = 1.15
"""A candidate grid whose peak, interpolated from grids already replayed, exceeds the budget by this factor is
skipped without its own replay (each replay of the real-size Wan VAE takes about half a second of CPU, on the path
of the first VAE pass at a size). What is interpolated is the tile phase's peak, which grows with the tile's area
(with its halo) and so lies at or above the straight line between two replayed grids: the interpolation errs low,
and the margin covers integer effects. A candidate is only ever *chosen* after a replay says it fits."""


def _choose(h: int, w: int, estimate, budget: int) -> tuple[int, int]:
    """Cheapest grid whose ``estimate(grid)`` (a :class:`MemoryEstimate`) has a peak within ``budget``. Memory only
    grows with the tile size, so a grid whose tiles are no smaller than those of a grid that did not fit is skipped,
    if the finest grid does not fit nothing does, and a grid that the replays so far predict to be far over the
    budget is skipped (:data:`SKIP_PREDICTED_OVER`). The finest grid is replayed only once two grids have not fit
    (a tight budget, where it anchors the guesses) or none did: where the first or second grid fits, as on a
    6-12 GiB card at 480p-720p, its replay would be a third of the plan's time for nothing."""
    grids = _grids(h, w)
    finest = max(grids, key=lambda g: (g[0] * g[1], -abs(h / g[0] - w / g[1])))

    def tile_of(g: tuple[int, int]) -> tuple[int, int]:
        return -(-h // g[0]), -(-w // g[1])

    def area(g: tuple[int, int]) -> int:
        rows, cols = tile_of(g)
        return rows * cols

    seen: dict[int, int] = {}  # tile area -> tile phase peak, of the grids replayed

    def replay(g: tuple[int, int]) -> int:
        est = estimate(g)
        seen[area(g)] = est.tile_phase
        return est.peak

    def predicted(g: tuple[int, int]) -> float | None:
        a = area(g)
        below = max((x for x in seen if x <= a), default=None)
        above = min((x for x in seen if x >= a), default=None)
        if below is None or above is None:
            return None
        if above == below:
            return seen[a]
        return seen[below] + (seen[above] - seen[below]) * (a - below) / (above - below)

    def check_finest() -> None:  # a replay the estimate's cache answers when it was made before
        if replay(finest) > budget:
            raise MemoryError("no tiling of the VAE pass fits the memory budget; free GPU memory or keep the output "
                              "and the store on the CPU (output_device='cpu', store_device='cpu')")

    too_big = []
    for g in grids:
        tile = tile_of(g)
        if any(tile[0] >= a and tile[1] >= b for a, b in too_big):
            continue
        guess = predicted(g) if len(seen) >= 2 else None
        if guess is not None and guess > SKIP_PREDICTED_OVER * budget:
            continue
        if replay(g) <= budget:
            return g
        too_big.append(tile)
        if len(too_big) == 2:  # a tight budget: the finest grid answers whether anything fits, and anchors guesses
            check_finest()
    check_finest()
    return finest


def choose_decode_grid(vae, latent_shape, budget_bytes: int, *, frame_split=True, output_on_device=True,
                       store_on_device=True) -> tuple[int, int]:
    """Cheapest grid whose estimated activation peak (weights excluded) fits ``budget_bytes``."""
    h, w = latent_shape[-2:]
    return _choose(h, w, lambda g: estimate_decode_memory(
        vae, latent_shape, g, frame_split=frame_split, output_on_device=output_on_device,
        store_on_device=store_on_device), budget_bytes)


@dataclass(frozen=True)
class VaeTiling:
    """How a tiled decode or encode is cut: spatial tiles, and whether frames go on one at a time (after a
    temporal upsample in the decoder, before the first temporal downsample in the encoder)."""

    grid: tuple[int, int]
    frame_split: bool

    def at_least_two(self) -> VaeTiling:
        """The same tiling with at least two tiles (a grid of one tile becomes 1x2)."""
        return self if self.grid != (1, 1) else VaeTiling((1, 2), self.frame_split)


SPLIT_FRAMES_COST = 1.3
"""Time of a decode with a temporal upsample's frames one at a time, over the same grid with whole frames (H200,
480x832x81, fp32: 1x2 1.34x / 1.05x untiled, 1x3 1.45x / 1.08x): the split doubles the causal convolutions' cache
copies and layout conversions and quarters their size."""


def area_overhead(plan: DecodePlan | EncodePlan) -> float:
    """An upper bound on a tiling's FLOPs over the untiled pass's, from its plan alone (no replay).

    Every local op (a convolution, a resample) does the same work per pixel of the region it runs on, so its
    tiled work over its untiled work is the summed area of its tiles' regions (halos included) over the full
    area at its scale; the global part is the same in both. The whole pass's ratio is a weighted mean of those
    per-op ratios, so it is at most their maximum. The planner asks this before counting FLOPs by replay (two
    thirds of a first plan's time, about 3 s on the real-size Wan VAE): when the bound already answers, the
    replay is skipped and the choice is the same."""
    h, w = plan.latent_hw
    worst = 1.0
    for level in range(len(plan.tiles[0].regions)):
        if isinstance(plan, DecodePlan):
            scale = plan.scales[level]
        else:  # encode: the input pixels, then the latent
            scale = plan.factor if level == 0 else 1
        summed = sum((t.regions[level][1] - t.regions[level][0]) * (t.regions[level][3] - t.regions[level][2])
                     for t in plan.tiles)
        worst = max(worst, summed / (h * scale * w * scale))
    return worst


def _fastest_tiling(pick, flops, overhead=lambda grid: math.inf) -> VaeTiling:
    """The faster of the whole-frame and the split-frame tiling that fit: time is modelled as the grid's FLOPs
    (its halo recompute) times :data:`SPLIT_FRAMES_COST` when frames are split. ``pick(frame_split)`` is the
    cheapest grid that fits (MemoryError when none does); ``flops(grid)`` its FLOPs; ``overhead(grid)`` an upper
    bound on its FLOPs over the untiled ones (:func:`area_overhead`), asked first because it costs no replay."""
    try:
        whole = pick(False)
    except MemoryError:
        whole = None
    if whole is not None and (overhead(whole) <= SPLIT_FRAMES_COST
                              or flops(whole) <= SPLIT_FRAMES_COST * flops((1, 1))):
        return VaeTiling(whole, False)  # no split grid can be cheaper: its FLOPs are at least the untiled ones
    split = pick(True)
    if whole is not None and flops(whole) <= SPLIT_FRAMES_COST * flops(split):
        return VaeTiling(whole, False)
    return VaeTiling(split, True)


def choose_decode_tiling(vae, latent_shape, budget_bytes: int, *, output_on_device=True,
                         store_on_device=True) -> VaeTiling:
    """The fastest decode tiling whose estimated peak fits ``budget_bytes`` (:func:`_fastest_tiling`). Whole frames
    in a finer grid usually win (2x2 whole: 2.46 GiB estimated at 480p81 and 1.11x the FLOPs, against 2.48 GiB for
    1x3 split); split frames only where the whole-frame grid that fits is so fine that its halos cost more."""
    return _fastest_tiling(
        lambda split: choose_decode_grid(vae, latent_shape, budget_bytes, frame_split=split,
                                         output_on_device=output_on_device, store_on_device=store_on_device),
        lambda grid: count_flops(vae, latent_shape, grid),
        lambda grid: area_overhead(plan_decode(vae, latent_shape[-2:], grid)))


def choose_encode_grid(vae, video_shape, budget_bytes: int, *, store_on_device=True, frame_split=True) -> tuple[int, int]:
    """Cheapest encoder grid whose estimated activation peak (weights excluded) fits ``budget_bytes``."""
    factor = _pixels_per_latent(vae)
    h, w = video_shape[-2] // factor, video_shape[-1] // factor
    return _choose(h, w, lambda g: estimate_encode_memory(
        vae, video_shape, g, store_on_device=store_on_device, frame_split=frame_split), budget_bytes)


def choose_encode_tiling(vae, video_shape, budget_bytes: int, *, store_on_device=True) -> VaeTiling:
    """The fastest encode tiling that fits ``budget_bytes``, by the same model as the decode's
    (:func:`_fastest_tiling`; the encoder's halo is 9 latent px, so a 2x2 grid at 480x832 is 1.51x the untiled
    FLOPs and 1x2 1.17x)."""
    factor = _pixels_per_latent(vae)
    latent = (1, 1, 1 + (video_shape[2] - 1) // 4, video_shape[-2] // factor, video_shape[-1] // factor)
    return _fastest_tiling(
        lambda split: choose_encode_grid(vae, video_shape, budget_bytes, store_on_device=store_on_device,
                                         frame_split=split),
        lambda grid: count_flops(vae, latent, grid, encode=True),
        lambda grid: area_overhead(plan_encode(vae, latent[-2:], grid)))
