"""The Wan2.2 VAE (TI2V-5B's: 48 latent channels, 16x spatial) as ComfyUI users hold it: ``vae/wan2.2_vae.safetensors``.

Diffusers builds it as ``AutoencoderKLWan(is_residual=True, patch_size=2, ...)``; the file keeps the original Wan
layout (``encoder.downsamples.N.downsamples.M``, ``decoder.upsamples.N.upsamples.M``, ``conv1``/``conv2``), which
ComfyUI tells from the Wan2.1 VAE by ``decoder.upsamples.0.upsamples.0.residual.2.weight`` (``comfy/sd.py``).
diffusers ships no single-file conversion for it, so both directions are written here, each from the two module
structures, and independently of each other: :func:`diffusers_name` reads a file (native key -> diffusers name),
:func:`native_key` writes one (diffusers name -> native key, for ``comfy_export``); a file written by one and read by
the other is therefore a real test of both.

The file carries no latent statistics; the DiT works on latents normalised with the Wan2.2 VAE's published
per-channel mean and std (:data:`WAN22_LATENTS_MEAN`, :data:`WAN22_LATENTS_STD`), which a model read from single
files takes from here - the same numbers ComfyUI's ``latent_formats.Wan22`` and the Diffusers folder's
``vae/config.json`` hold.
"""

from __future__ import annotations

import re

from ...core.spec import FileLayout, FileTensor, NotThisFile
from .files import count_indexed, what_is

WAN22_VAE_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"
"""The key ComfyUI uses to tell the Wan2.2 VAE from the Wan2.1 VAE (both have ``decoder.middle.0.residual.0.gamma``)."""

WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
"""Per-channel mean of the Wan2.2 VAE's raw latents (the TI2V-5B Diffusers folder's ``vae/config.json``)."""
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
"""Per-channel std of the Wan2.2 VAE's raw latents."""

WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
)
"""``AutoencoderKLWan`` arguments of the Wan2.2 VAE (704.7M parameters)."""

# Residual block parts: diffusers' name <-> the original ``residual`` Sequential's index.
_RESNET_TO_NATIVE = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                     ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_TOP_TO_NATIVE = (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2."),
                  ("encoder.conv_in.", "encoder.conv1."), ("decoder.conv_in.", "decoder.conv1."),
                  ("encoder.norm_out.", "encoder.head.0."), ("encoder.conv_out.", "encoder.head.2."),
                  ("decoder.norm_out.", "decoder.head.0."), ("decoder.conv_out.", "decoder.head.2."))


def _swap(rest: str, pairs: tuple[tuple[str, str], ...], forward: bool) -> str | None:
    for ours, theirs in pairs:
        old, new = (ours, theirs) if forward else (theirs, ours)
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def native_key(name: str, num_res_blocks: int) -> str:
    """A diffusers ``AutoencoderKLWan`` (Wan2.2 layout) tensor name -> its key in ``wan2.2_vae.safetensors``.

    Each encoder level holds its residual blocks then its downsampler in one list (``downsamples.N.downsamples.M``,
    the downsampler at ``M = num_res_blocks``); each decoder level its ``num_res_blocks + 1`` residual blocks then
    its upsampler."""
    top = _swap(name, _TOP_TO_NATIVE, True)
    if top is not None:
        return top
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", name):
        return f"{m.group(1)}.middle.1.{m.group(2)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"{m.group(1)}.middle.{2 * int(m.group(2))}.{_swap(m.group(3), _RESNET_TO_NATIVE, True)}"
    if m := re.fullmatch(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.(.*)", name):
        side, level, part, index, rest = m.groups()
        lists = "encoder.downsamples" if side == "encoder.down" else "decoder.upsamples"
        inner = lists.split(".")[1]
        if index is not None:
            return f"{lists}.{level}.{inner}.{index}.{_swap(rest, _RESNET_TO_NATIVE, True)}"
        position = num_res_blocks if part == "downsampler" else num_res_blocks + 1
        return f"{lists}.{level}.{inner}.{position}.{rest}"
    raise KeyError(name)


def diffusers_name(key: str, num_res_blocks: int) -> str | None:
    """A key of ``wan2.2_vae.safetensors`` -> the diffusers ``AutoencoderKLWan`` name (None: not a VAE tensor)."""
    top = _swap(key, _TOP_TO_NATIVE, False)
    if top is not None:
        return top
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.*)", key):
        side, position, rest = m.group(1), int(m.group(2)), m.group(3)
        if position == 1:
            return f"{side}.mid_block.attentions.0.{rest}"
        part = _swap(rest, _RESNET_TO_NATIVE, False)
        return None if part is None else f"{side}.mid_block.resnets.{position // 2}.{part}"
    if m := re.fullmatch(r"(encoder\.down|decoder\.up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)", key):
        side, level, position, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        blocks = "encoder.down_blocks" if side == "encoder.down" else "decoder.up_blocks"
        if rest.startswith(("resample.", "time_conv.")):
            return f"{blocks}.{level}.{'downsampler' if side == 'encoder.down' else 'upsampler'}.{rest}"
        part = _swap(rest, _RESNET_TO_NATIVE, False)
        return None if part is None else f"{blocks}.{level}.resnets.{position}.{part}"
    return None


class Wan22VaeFormat:
    """The Wan2.2 VAE (``wan2.2_vae.safetensors``), in the original Wan layout; sizes are read from shapes."""

    expected = "the Wan2.2 VAE (vae/wan2.2_vae.safetensors)"

    def recognise(self, tensors: dict[str, FileTensor]) -> FileLayout:
        if "decoder.middle.0.residual.0.gamma" not in tensors:
            raise NotThisFile(what_is(tensors) or "it has no decoder.middle.0.residual.0.gamma, so it is not a Wan VAE")
        if WAN22_VAE_MARKER not in tensors:
            raise NotThisFile("it is the Wan2.1 VAE (wan_2.1_vae.safetensors, 16 latent channels); TI2V-5B works in "
                              "the Wan2.2 VAE's 48-channel latent space")

        def shape(key: str) -> tuple[int, ...]:
            if key not in tensors:
                raise NotThisFile(f"it lacks {key}")
            return tensors[key].shape

        base = shape("encoder.conv1.weight")[0]
        in_channels = shape("encoder.conv1.weight")[1]
        z_dim = shape("conv2.weight")[0]
        decoder_base = shape("decoder.head.2.weight")[1]
        out_channels = shape("decoder.head.2.weight")[0]
        patch = round((in_channels / 3) ** 0.5)
        if z_dim != len(WAN22_LATENTS_MEAN) or in_channels != 3 * patch * patch or out_channels != in_channels:
            raise NotThisFile(f"its {z_dim} latent channels and {in_channels} input channels are not the Wan2.2 VAE's "
                              f"({len(WAN22_LATENTS_MEAN)} and 12)")
        levels = count_indexed(tensors, "encoder.downsamples.{}.")
        res_blocks = count_indexed(tensors, "encoder.downsamples.0.downsamples.{}.residual.")
        if levels < 2 or res_blocks < 1:
            raise NotThisFile("its encoder has no levels of residual blocks")
        dim_mult = [shape(f"encoder.downsamples.{i}.downsamples.0.residual.2.weight")[0] // base for i in range(levels)]
        temporal = [f"encoder.downsamples.{i}.downsamples.{res_blocks}.time_conv.weight" in tensors
                    for i in range(levels - 1)]
        config = dict(
            WAN22_VAE, base_dim=base, decoder_base_dim=decoder_base, z_dim=z_dim, dim_mult=dim_mult,
            num_res_blocks=res_blocks, temperal_downsample=temporal, in_channels=in_channels,
            out_channels=out_channels, patch_size=patch, scale_factor_temporal=2 ** sum(temporal),
            scale_factor_spatial=patch * 2 ** (levels - 1),
        )
        keys = {}
        for key in tensors:
            name = diffusers_name(key, res_blocks)
            if name is not None:
                keys[name] = key
        return FileLayout(f"Wan2.2 VAE (base width {base}, {z_dim} latent channels)", "AutoencoderKLWan", config, keys)
