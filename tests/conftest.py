"""Shared fixtures: tiny models built once per test session, and the ``gpu`` marker."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Plans the tests compute are kept in a directory of this session, never in the user's cache (core/plan_cache.py).
os.environ.setdefault("VIDEO_OFFLOAD_CACHE_DIR", tempfile.mkdtemp(prefix="video-offload-test-cache-"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one (run on the device machine)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on two CPU cores")
    config.addinivalue_line(
        "markers", "exhaustive: a proof over every case, or a real-size model on the CPU (minutes); skipped unless "
                   "selected with -m exhaustive (CI runs everything else)",
    )


def pytest_collection_modifyitems(config, items):
    if "exhaustive" not in (config.getoption("-m") or ""):
        long = pytest.mark.skip(reason="exhaustive: run with -m exhaustive")
        for item in items:
            if "exhaustive" in item.keywords:
                item.add_marker(long)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory):
    """A tiny random Wan2.1 T2V folder, built once per session (about a second)."""
    from video_offload.offload.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan2.1-t2v")


@pytest.fixture(scope="session")
def diffusers_t2v_reference(tiny_t2v):
    """Run diffusers' own WanPipeline on the tiny model: the oracle for our numerics."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    cache = {}

    def run(prompt, negative_prompt, seed, flow_shift=3.0, **sizes):
        key = (prompt, negative_prompt, seed, flow_shift, tuple(sorted(sizes.items())))
        if key not in cache:
            pipe = WanPipeline.from_pretrained(tiny_t2v, dtype=torch.float32)
            pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
            pipe.set_progress_bar_config(disable=True)
            out = pipe(
                prompt,
                negative_prompt=negative_prompt,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
                **sizes,
            ).frames[0]
            cache[key] = out
        return cache[key]

    return run


@pytest.fixture(scope="session")
def tiny_i2v(tmp_path_factory):
    """A tiny random Wan2.1 I2V folder (with image_encoder/ and image_processor/)."""
    from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan2.1-i2v", spec=TinyWanSpec(image_to_video=True))


@pytest.fixture(scope="session")
def start_image():
    """A deterministic RGB start image whose size differs from the video's, as real inputs do."""
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray((np.random.RandomState(0).rand(80, 120, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def diffusers_i2v_reference(tiny_i2v):
    """diffusers' WanImageToVideoPipeline on the tiny I2V model."""
    from diffusers import WanImageToVideoPipeline

    def run(image, prompt, negative_prompt, seed, **sizes):
        pipe = WanImageToVideoPipeline.from_pretrained(tiny_i2v, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            image,
            prompt,
            negative_prompt=negative_prompt,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **sizes,
        ).frames[0]

    return run


@pytest.fixture(scope="session")
def spiece_model():
    """A tiny SentencePiece model (what ComfyUI stores as ``spiece_model`` in the text encoder's file)."""
    pytest.importorskip("sentencepiece")
    from single_file_helpers import train_sentencepiece

    return train_sentencepiece()


@pytest.fixture(scope="session")
def single_file_folders(tmp_path_factory, spiece_model):
    """Tiny T2V and I2V Diffusers folders shaped like the real models where single files cannot say otherwise
    (``SINGLE_FILE_TINY``), sharing one text encoder and VAE, with the sentencepiece tokenizer."""
    import dataclasses

    from video_offload.offload.families.wan.text import tokenizer_from_sentencepiece
    from video_offload.offload.families.wan.tiny import SINGLE_FILE_TINY, build_tiny_wan

    root = tmp_path_factory.mktemp("single_files")
    tokenizer = tokenizer_from_sentencepiece(spiece_model)
    return {
        kind: build_tiny_wan(root / f"tiny-{kind}", seed=11, tokenizer=tokenizer,
                             spec=dataclasses.replace(SINGLE_FILE_TINY, image_to_video=kind == "i2v"))
        for kind in ("t2v", "i2v")
    }


@pytest.fixture(scope="session")
def single_files(single_file_folders, tmp_path_factory, spiece_model):
    """Comfy-Org-style single files per (kind, layout); the bf16 DiT carries ComfyUI's ``model.diffusion_model.``
    prefix."""
    from single_file_helpers import LAYOUTS

    from video_offload.offload.families.wan.comfy_export import export_single_files

    root = tmp_path_factory.mktemp("comfy_files")
    return {
        (kind, layout): export_single_files(
            folder, root / kind / layout, layout, spiece_model=spiece_model,
            dit_prefix="model.diffusion_model." if layout == "bf16" else "",
        )
        for kind, folder in single_file_folders.items()
        for layout in LAYOUTS
    }


@pytest.fixture(scope="session")
def single_file_references(single_file_folders, single_files, tmp_path_factory):
    """Per (kind, layout), a Diffusers folder holding exactly the numbers the single files hold (ComfyUI's rule)."""
    from single_file_helpers import reference_folder

    root = tmp_path_factory.mktemp("references")
    return {key: reference_folder(single_file_folders[key[0]], paths, root / f"{key[0]}-{key[1]}")
            for key, paths in single_files.items()}
