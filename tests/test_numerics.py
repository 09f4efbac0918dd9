"""Our frames equal diffusers' WanPipeline for the same prompt, seed, size and steps (the oracle)."""

import numpy as np
import pytest

from video_offload import VideoGenerator

SIZES = dict(height=64, width=96, num_frames=9, num_inference_steps=3)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "resident"])
def test_video_generator_matches_wan_pipeline(tiny_t2v, diffusers_t2v_reference, tmp_path, layerwise):
    generator = VideoGenerator.from_pretrained(tiny_t2v, dit_layerwise_offload=layerwise, precision="float32")
    ours = generator.generate_video(
        "A curious raccoon peers through sunflowers",
        negative_prompt="blurry, static",
        seed=1234,
        guidance_scale=5.0,
        output_path=tmp_path,
        **SIZES,
    )
    reference = diffusers_t2v_reference("A curious raccoon peers through sunflowers", "blurry, static", 1234, **SIZES)
    assert ours.dtype == np.float32 and ours.shape == (9, 64, 96, 3)
    assert 0.0 <= ours.min() and ours.max() <= 1.0
    assert np.abs(ours - reference).max() <= 1e-4
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000


def test_guidance_off_and_flow_shift_match_too(tiny_t2v, diffusers_t2v_reference):
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    ours = generator.generate_video(
        "a lion", guidance_scale=1.0, flow_shift=5.0, seed=3, save_video=False, **SIZES
    )
    reference = diffusers_t2v_reference("a lion", None, 3, flow_shift=5.0, guidance_scale=1.0, **SIZES)
    assert np.abs(ours - reference).max() <= 1e-4


def test_a_seed_is_the_same_video_and_another_seed_is_not(tiny_t2v):
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    a = generator.generate_video("a cat", seed=5, save_video=False, **SIZES)
    b = generator.generate_video("a cat", seed=5, save_video=False, **SIZES)
    c = generator.generate_video("a cat", seed=6, save_video=False, **SIZES)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_model_limits_are_checked_before_sampling(tiny_t2v):
    from video_offload.offload import ConfigError

    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    # The tiny model's rotary tables cover 32 positions per axis: 32 * 2 * 8 = 512 pixels.
    with pytest.raises(ConfigError, match=r"height=528: is larger than this model supports \(512\)"):
        generator.generate_video("a cat", height=528, width=64, num_frames=5, num_inference_steps=1, save_video=False)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "resident"])
def test_runs_under_inference_mode_as_comfyui_runs_nodes(tiny_t2v, diffusers_t2v_reference, layerwise):
    """ComfyUI executes every node inside torch.inference_mode(); loading and sampling must work there."""
    import torch

    with torch.inference_mode():
        generator = VideoGenerator.from_pretrained(tiny_t2v, dit_layerwise_offload=layerwise, precision="float32")
        ours = generator.generate_video("a lion", negative_prompt="", seed=8, save_video=False, **SIZES)
    reference = diffusers_t2v_reference("a lion", "", 8, **SIZES)
    assert np.abs(ours - reference).max() <= 1e-4
