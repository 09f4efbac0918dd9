"""Image-to-video frames equal diffusers' WanImageToVideoPipeline; wrong inputs are refused up front."""

import numpy as np
import pytest
import torch

from video_offload import VideoGenerator
from video_offload.offload import ConfigError

SIZES = dict(height=64, width=96, num_frames=9, num_inference_steps=3)


@pytest.mark.parametrize("layerwise", [False, True], ids=["resident", "layerwise"])
def test_i2v_matches_diffusers(tiny_i2v, start_image, diffusers_i2v_reference, layerwise):
    generator = VideoGenerator.from_pretrained(tiny_i2v, precision="float32", dit_layerwise_offload=layerwise)
    ours = generator.generate_video("a cat", negative_prompt="blurry", image=start_image, seed=11, save_video=False, **SIZES)
    reference = diffusers_i2v_reference(start_image, "a cat", "blurry", 11, **SIZES)
    assert np.abs(ours - reference).max() <= 1e-4


@pytest.mark.parametrize("form", ["path", "uint8 array", "float array", "comfy tensor"])
def test_start_image_forms_give_the_same_video(tiny_i2v, start_image, tmp_path, form):
    generator = VideoGenerator.from_pretrained(tiny_i2v, precision="float32", dit_layerwise_offload=False)
    pixels = np.asarray(start_image)
    image = {
        "path": lambda: (start_image.save(tmp_path / "start.png"), tmp_path / "start.png")[1],
        "uint8 array": lambda: pixels,
        "float array": lambda: pixels.astype(np.float32) / 255.0,
        "comfy tensor": lambda: torch.from_numpy(pixels.astype(np.float32) / 255.0)[None],
    }[form]()
    base = generator.generate_video("a cat", image=start_image, seed=2, save_video=False, **SIZES)
    other = generator.generate_video("a cat", image=image, seed=2, save_video=False, **SIZES)
    assert np.array_equal(base, other)


def test_i2v_model_needs_an_image(tiny_i2v):
    generator = VideoGenerator.from_pretrained(tiny_i2v, precision="float32")
    with pytest.raises(ConfigError, match=r"image=None: .*image-to-video model and needs a start image"):
        generator.generate_video("a cat", save_video=False, **SIZES)


def test_t2v_model_refuses_an_image(tiny_t2v, start_image):
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    with pytest.raises(ConfigError, match=r"image=.*text-to-video model and takes no start image"):
        generator.generate_video("a cat", image=start_image, save_video=False, **SIZES)


def test_bad_images_are_refused(tiny_i2v):
    generator = VideoGenerator.from_pretrained(tiny_i2v, precision="float32")
    with pytest.raises(ConfigError, match=r"image=.*could not be read as an image"):
        generator.generate_video("a cat", image="/nonexistent.png", save_video=False, **SIZES)
    with pytest.raises(ConfigError, match=r"image=.*non-finite"):
        generator.generate_video("a cat", image=np.full((8, 8, 3), np.nan), save_video=False, **SIZES)
    with pytest.raises(ConfigError, match=r"image=\(8, 8\): is not an \[H, W, 3\] image"):
        generator.generate_video("a cat", image=np.zeros((8, 8)), save_video=False, **SIZES)
