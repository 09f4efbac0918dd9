"""TI2V-5B through the nodes as ComfyUI runs them (Load Model -> Encode Prompt -> Sample -> Decode VAE, with and
without a start image, from the Diffusers folder and from Comfy-Org's single files), and its LATENT at the ComfyUI
boundary: in the space of ComfyUI's ``latent_formats.Wan22``, the one its native VAE Decode with
``wan2.2_vae.safetensors`` takes.

Comparisons with ComfyUI's own code run when ``COMFYUI_PATH`` names a ComfyUI checkout (skipped otherwise), as in
``test_comfy_boundary.py``; the native VAE also needs ``einops`` importable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_executor import REPO_ROOT, execute, load_pack, make_folder_paths, core_nodes

SAMPLE = dict(width=64, height=64, num_frames=9, steps=3, cfg=4.0, flow_shift=0.0, seed=5)
PROMPT, NEGATIVE = "a cat turns its head", "blurry"
FOLDER_NAME = "Wan2.2-TI2V-5B-Diffusers"


@pytest.fixture(scope="module")
def env(tmp_path_factory, start_image):
    """A ComfyUI-style models folder with the tiny TI2V model as a Diffusers folder and as Comfy-Org's files."""
    from video_offload.offload.families.wan.comfy_export import tiny_sentencepiece_model
    from video_offload.offload.families.wan.text import tokenizer_from_sentencepiece
    from video_offload.offload.families.wan.tiny_ti2v import build_tiny_ti2v, export_ti2v_single_files

    root = tmp_path_factory.mktemp("comfyui-ti2v")
    models, output, inputs = root / "models", root / "output", root / "input"
    inputs.mkdir(parents=True)
    start_image.save(inputs / "start_frame.png")
    spiece = tiny_sentencepiece_model()
    folder = build_tiny_ti2v(models / "diffusers" / FOLDER_NAME, tokenizer=tokenizer_from_sentencepiece(spiece))
    files = export_ti2v_single_files(folder, models, spiece_model=spiece, comfy_folders=True)
    pack = load_pack(REPO_ROOT, make_folder_paths(models / "diffusers", output, inputs), {})
    mappings = {**core_nodes(inputs), **pack.NODE_CLASS_MAPPINGS}
    return dict(pack=pack, mappings=mappings, folder=folder, files=files)


def workflow(loader: str, image: bool) -> dict:
    """The API prompt: the model from its folder or from files, Encode Prompt (with the start image or not),
    Sample, Decode VAE."""
    if loader == "folder":
        prompt = {"1": {"class_type": "VideoOffloadLoadModel", "inputs": {
            "model_name": FOLDER_NAME, "precision": "float32", "vae_precision": "float32"}}}
    else:
        prompt = {
            "11": {"class_type": "VideoOffloadLoadDiT", "inputs": {"dit_name": "wan2.2_ti2v_5B_fp16.safetensors"}},
            "12": {"class_type": "VideoOffloadLoadTextEncoder", "inputs": {
                "text_encoder_name": "umt5_xxl_fp16.safetensors"}},
            "13": {"class_type": "VideoOffloadLoadVAE", "inputs": {"vae_name": "wan2.2_vae.safetensors"}},
            "1": {"class_type": "VideoOffloadWanModel", "inputs": {
                "dit": ["11", 0], "text_encoder": ["12", 0], "vae": ["13", 0], "precision": "float32",
                "vae_precision": "float32"}},
        }
    encode = {"model": ["1", 0], "prompt": PROMPT, "negative_prompt": NEGATIVE}
    if image:
        prompt["5"] = {"class_type": "LoadImage", "inputs": {"image": "start_frame.png"}}
        encode["image"] = ["5", 0]
    prompt["2"] = {"class_type": "VideoOffloadEncodePrompt", "inputs": encode}
    prompt["3"] = {"class_type": "VideoOffloadSample", "inputs": {"model": ["1", 0], "conditioning": ["2", 0], **SAMPLE}}
    prompt["4"] = {"class_type": "VideoOffloadDecodeVAE", "inputs": {"model": ["1", 0], "latent": ["3", 0]}}
    return prompt


def diffusers_frames(folder: Path, image) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipe = (WanPipeline if image is None else WanImageToVideoPipeline).from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    args = () if image is None else (image,)
    return pipe(*args, prompt=PROMPT, negative_prompt=NEGATIVE, height=SAMPLE["height"], width=SAMPLE["width"],
                num_frames=SAMPLE["num_frames"], num_inference_steps=SAMPLE["steps"], guidance_scale=SAMPLE["cfg"],
                generator=torch.Generator("cpu").manual_seed(SAMPLE["seed"]), output_type="np").frames[0]


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("loader", ["folder", "files"])
def test_nodes_give_diffusers_frames(env, start_image, loader, image):
    results = execute(workflow(loader, image), env["mappings"])
    frames = results["4"][0]
    assert isinstance(frames, torch.Tensor) and frames.dtype == torch.float32 and frames.shape == (9, 64, 64, 3)
    assert results["3"][0]["samples"].shape == (1, 48, 3, 4, 4)
    reference = diffusers_frames(env["folder"], start_image if image else None)
    assert np.abs(frames.numpy() - reference).max() <= 1e-4


# ------------------------------------------------------------------------------------------------------ boundary


def comfyui_root() -> Path:
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "comfy" / "latent_formats.py").is_file():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to compare with its own latent conversion")
    return Path(root)


def comfy_wan22_format():
    path = comfyui_root() / "comfy" / "latent_formats.py"
    spec = importlib.util.spec_from_file_location("comfyui_latent_formats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Wan22()


@pytest.fixture(scope="module")
def sampled(env):
    """The Sample node's LATENT and the engine's normalised latents for the same job (text-to-video)."""
    pack, mappings = env["pack"], env["mappings"]
    results = execute(workflow("folder", False), mappings)
    model, conditioning = results["1"][0], results["2"][0]
    params = pack.offload.SamplingParams(height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=4.0,
                                         seed=5)
    normalised = pack.offload.pipeline.stages.sample_latents(model.manager, model.model, model.config, conditioning,
                                                             params)
    return pack, model, results["3"][0], normalised


def test_the_sample_nodes_latent_is_what_comfyuis_wan22_sampler_would_return(sampled):
    pack, model, latent, normalised = sampled
    wan22 = comfy_wan22_format()
    assert wan22.latent_channels == latent["samples"].shape[1] == 48
    # KSampler samples in the normalised space and returns process_out(samples): the raw Wan2.2 VAE latent.
    assert torch.allclose(latent["samples"], wan22.process_out(normalised), atol=1e-6, rtol=1e-6)
    assert torch.allclose(wan22.process_in(latent["samples"]), normalised, atol=1e-5, rtol=1e-5)


def test_decode_vae_reads_a_wan22_latent_as_comfyuis_vae_encode_writes_it(sampled):
    pack, model, _, _ = sampled
    decode = pack.NODE_CLASS_MAPPINGS["VideoOffloadDecodeVAE"]
    raw = torch.randn(1, 48, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    (frames,) = decode().decode(model, {"samples": raw})
    engine = pack.offload.pipeline.stages.decode_video(model.manager, model.model, model.config,
                                                       comfy_wan22_format().process_in(raw))
    assert frames.shape == (5, 32, 48, 3) and (frames - engine).abs().max() <= 1e-5


def test_comfyuis_native_wan22_vae_decodes_the_packs_latent_from_the_packs_vae_file(env, sampled, monkeypatch):
    """ComfyUI's own Wan2.2 VAE (``comfy/ldm/wan/vae2_2.py``), loaded strictly from the ``wan2.2_vae.safetensors``
    this pack writes, decodes the Sample node's LATENT to the pack's frames - the LATENT and the file are both what
    a native VAE Decode expects."""
    from safetensors.torch import load_file

    root = comfyui_root()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--cpu"])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        from comfy.ldm.wan.vae2_2 import WanVAE
    except Exception as e:  # noqa: BLE001 - ComfyUI's import needs its own dependencies (einops)
        pytest.skip(f"comfy.ldm.wan.vae2_2 does not import here: {type(e).__name__}: {e}")
    pack, model, latent, _ = sampled
    config = model.manager.component(model.model, "vae").config
    native = WanVAE(dim=config.base_dim, dec_dim=config.decoder_base_dim, z_dim=config.z_dim,
                    dim_mult=list(config.dim_mult), num_res_blocks=config.num_res_blocks,
                    temperal_downsample=list(config.temperal_downsample))
    native.load_state_dict({k: v.float() for k, v in load_file(str(env["files"]["vae"])).items()}, strict=True)
    with torch.no_grad():
        video = native.decode(latent["samples"])
    native_frames = ((video[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # ComfyUI's VAE.decode output in 0..1
    (frames,) = pack.NODE_CLASS_MAPPINGS["VideoOffloadDecodeVAE"]().decode(model, latent)
    assert frames.shape == native_frames.shape == (9, 64, 64, 3)
    assert (frames - native_frames).abs().max() <= 1e-4
