"""The ComfyUI boundary converts, nothing else does: the pack's LATENT is in the space ComfyUI's own Wan latents use
(raw VAE space: what VAE Encode makes, KSampler returns and VAE Decode takes), in both directions; and the Sample
node keeps the model folder's own flow shift unless told otherwise.

ComfyUI's conversion itself (``comfy/latent_formats.py``) is read from a ComfyUI checkout when ``COMFYUI_PATH``
names one (the project fetches Comfy-Org/ComfyUI to /tmp for this); without it those two tests are skipped and the
native-decode tests below still pin the meaning of the space.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_executor import REPO_ROOT, load_pack, make_folder_paths

SAMPLE = dict(width=48, height=32, num_frames=5, steps=2, cfg=5.0, flow_shift=0.0, seed=3)


@pytest.fixture(scope="module")
def nodes(tiny_t2v, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy-boundary")
    models, output = root / "models", root / "output"
    shutil.copytree(tiny_t2v, models / "tiny")
    shifted = models / "tiny-shift5"
    shutil.copytree(tiny_t2v, shifted)
    config_path = shifted / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["flow_shift"] = 5.0  # as a 720p folder ships it
    config_path.write_text(json.dumps(config))
    pack = load_pack(REPO_ROOT, make_folder_paths(models, output), {})
    instances = {name.removeprefix("VideoOffload"): cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    (model,) = instances["LoadModel"].load("tiny", "float32", "float32")
    (conditioning,) = instances["EncodePrompt"].encode(model, "a cat", "blurry")
    return pack, instances, model, conditioning


def comfy_latent_formats():
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "comfy" / "latent_formats.py").is_file():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to compare with its own latent conversion")
    spec = importlib.util.spec_from_file_location("comfyui_latent_formats", Path(root) / "comfy" / "latent_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vae_of(pack, model):
    return model.manager.component(model.model, "vae")


def test_the_sample_nodes_latent_is_what_comfyuis_sampler_would_return(nodes):
    pack, n, model, conditioning = nodes
    (latent,) = n["Sample"].sample(model, conditioning, **SAMPLE)
    normalised = pack.offload.pipeline.stages.sample_latents(
        model.manager, model.model, model.config, conditioning,
        pack.offload.SamplingParams(height=32, width=48, num_frames=5, num_inference_steps=2, seed=3),
    )
    wan21 = comfy_latent_formats().Wan21()
    # KSampler samples in the normalised space and returns process_out(samples): the raw VAE latent.
    assert torch.allclose(latent["samples"], wan21.process_out(normalised), atol=1e-6, rtol=1e-6)
    # ...and ComfyUI's process_in of our LATENT gives back what our DiT sampled.
    assert torch.allclose(wan21.process_in(latent["samples"]), normalised, atol=1e-5, rtol=1e-5)


def test_decode_vae_reads_latents_as_comfyuis_vae_encode_writes_them(nodes):
    pack, n, model, _ = nodes
    raw = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0)) * 2
    wan21 = comfy_latent_formats().Wan21()
    (frames,) = n["DecodeVAE"].decode(model, {"samples": raw})
    engine = pack.offload.pipeline.stages.decode_video(model.manager, model.model, model.config, wan21.process_in(raw))
    assert (frames - engine).abs().max() <= 1e-5


def native_vae_decode(vae, raw: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's VAE Decode does with a Wan LATENT: decode the raw latent as it is, frames in 0..1."""
    with torch.no_grad():
        video = vae.decode(raw, return_dict=False)[0]
    return (video[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)


def test_a_pack_latent_decodes_the_same_in_a_native_vae_decode(nodes):
    pack, n, model, conditioning = nodes
    (latent,) = n["Sample"].sample(model, conditioning, **SAMPLE)
    (ours,) = n["DecodeVAE"].decode(model, latent)
    native = native_vae_decode(vae_of(pack, model), latent["samples"])
    assert ours.shape == native.shape == (5, 32, 48, 3)
    assert (ours - native).abs().max() <= 1e-5


def test_a_native_vae_encodes_latent_decodes_the_same_in_the_packs_decode_vae(nodes, start_image):
    """A KSampler's (or VAE Encode's) LATENT is raw: the pack's Decode VAE must decode it as native VAE Decode does."""
    pack, n, model, _ = nodes
    vae = vae_of(pack, model)
    pixels = torch.from_numpy(np.array(start_image.resize((48, 32)))).float() / 127.5 - 1
    video = pixels.permute(2, 0, 1)[None, :, None].repeat(1, 1, 5, 1, 1)
    with torch.no_grad():
        raw = vae.encode(video).latent_dist.mode()
    (ours,) = n["DecodeVAE"].decode(model, {"samples": raw})
    assert (ours - native_vae_decode(vae, raw)).abs().max() <= 1e-5


def test_flow_shift_zero_keeps_the_model_folders_own_shift(nodes):
    pack, n, _, _ = nodes
    (model,) = n["LoadModel"].load("tiny-shift5", "float32", "float32")
    (conditioning,) = n["EncodePrompt"].encode(model, "a cat", "blurry")
    default = n["Sample"].sample(model, conditioning, **SAMPLE)[0]["samples"]
    five = n["Sample"].sample(model, conditioning, **{**SAMPLE, "flow_shift": 5.0})[0]["samples"]
    three = n["Sample"].sample(model, conditioning, **{**SAMPLE, "flow_shift": 3.0})[0]["samples"]
    assert torch.equal(default, five) and not torch.equal(default, three)
    assert n["Sample"].INPUT_TYPES()["required"]["flow_shift"][1]["default"] == 0.0


def test_decode_vae_refuses_latents_that_are_not_one_video_of_this_model(nodes):
    pack, n, model, _ = nodes
    with pytest.raises(pack.offload.ConfigError, match=r"latent=\(1, 16, 4, 4\): must be a 5-D video latent \[B, 16,"):
        n["DecodeVAE"].decode(model, {"samples": torch.zeros(1, 16, 4, 4)})
