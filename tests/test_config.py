"""Bad options and parameters fail at construction, naming the field, the value and the fix."""

import math

import pytest

from video_offload.offload import ConfigError, OffloadConfig, SamplingParams
from video_offload.offload.config import validate_prompt
from video_offload.offload.core.spec import LatentSpace

WAN21 = LatentSpace(channels=16, temporal_factor=4, spatial_factor=8, patch=(1, 2, 2))
"""Wan2.1's latent geometry: sizes are checked against it once the model is known."""


def test_defaults_are_fastvideos():
    c = OffloadConfig()
    assert (c.use_fsdp_inference, c.dit_cpu_offload, c.dit_layerwise_offload) == (False, True, True)
    assert (c.text_encoder_cpu_offload, c.image_encoder_cpu_offload, c.vae_cpu_offload, c.pin_cpu_memory) == (
        True,
        True,
        True,
        True,
    )


def test_layerwise_with_fsdp_is_an_error_not_an_override():
    with pytest.raises(ConfigError, match=r"dit_layerwise_offload=True: .*not compatible with use_fsdp_inference.*"
                                         r"Fix: set dit_layerwise_offload=False"):
        OffloadConfig(num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=True)


def test_fsdp_needs_several_gpus_and_several_gpus_need_fsdp():
    with pytest.raises(ConfigError, match=r"use_fsdp_inference=True: .*num_gpus=1.*Fix: set num_gpus to 2"):
        OffloadConfig(use_fsdp_inference=True, dit_layerwise_offload=False)
    with pytest.raises(ConfigError, match=r"num_gpus=2: .*Fix: set use_fsdp_inference=True"):
        OffloadConfig(num_gpus=2)
    assert OffloadConfig(num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False).distributed


@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("pin_cpu_memory", "yes", "pass pin_cpu_memory=True or pin_cpu_memory=False"),
        ("num_gpus", 0, "use 1 for one GPU"),
        ("prefetch_depth", 0, "use 1"),
        ("resident_blocks", -1, 'or "auto"'),
        ("resident_blocks", "all", 'or "auto"'),
    ],
)
def test_bad_offload_option(field, value, fix):
    with pytest.raises(ConfigError, match=rf"{field}={value!r}.*Fix: .*{fix}"):
        OffloadConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("num_frames", 80, "use 77 or 81"),
        ("num_frames", 0, "use 4k\\+1 frames"),
        ("num_frames", 10**9, "use 4k\\+1 frames"),
        ("height", 470, "use 464 or 480"),
        ("width", 830, "use 816 or 832"),
        ("width", 8, "multiple of 16"),
        ("num_inference_steps", 0, "at least 1"),
        ("guidance_scale", -1.0, "use 5.0"),
        ("guidance_scale", math.nan, "use 5.0"),
        ("flow_shift", math.inf, "use 3.0"),
        ("seed", -5, "from 0 to 2\\*\\*64-1"),
        ("height", True, "multiple of 16"),
        ("num_frames", 81.0, "use 4k\\+1 frames"),
    ],
)
def test_bad_sampling_parameter(field, value, fix):
    with pytest.raises(ConfigError, match=rf"^{field}=.*Fix: .*{fix}"):
        WAN21.check(SamplingParams(**{field: value}))


def test_prompt_must_be_text():
    with pytest.raises(ConfigError, match="prompt='  ': is empty"):
        validate_prompt("prompt", "  ")
    with pytest.raises(ConfigError, match="negative_prompt=3.*must be text"):
        validate_prompt("negative_prompt", 3, allow_empty=True)


def test_next_option_follows_the_seed_order():
    assert OffloadConfig(dit_layerwise_offload=False).next_option_to_enable() == "dit_layerwise_offload"
    c = OffloadConfig(image_encoder_cpu_offload=False, vae_cpu_offload=False, text_encoder_cpu_offload=False)
    assert c.next_option_to_enable() == "image_encoder_cpu_offload"
    c = OffloadConfig(text_encoder_cpu_offload=False)
    assert c.next_option_to_enable() == "vae_tiling"  # the exact memory savers come before the text encoder
    c = OffloadConfig(text_encoder_cpu_offload=False, vae_tiling="on", dit_activation_chunking="on")
    assert c.next_option_to_enable() == "text_encoder_layerwise_offload"  # streamed through the GPU first...
    c = OffloadConfig(text_encoder_cpu_offload=False, vae_tiling="on", dit_activation_chunking="on",
                      text_encoder_layerwise_offload=True)
    assert c.next_option_to_enable() == "text_encoder_cpu_offload"  # ...then computed on the CPU
    assert OffloadConfig(vae_tiling="on", dit_activation_chunking="on").next_option_to_enable() is None
    multi = OffloadConfig(
        num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=False,
    )
    assert multi.next_option_to_enable() == "vae_tiling"
    multi = OffloadConfig(
        num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=False, vae_tiling="on",
    )
    assert multi.next_option_to_enable() == "dit_cpu_offload"
    multi = OffloadConfig(
        num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=False,
        text_encoder_cpu_offload=False,
    )
    assert multi.next_option_to_enable() == "text_encoder_cpu_offload"
