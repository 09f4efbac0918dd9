"""The shipped Wan2.2 workflows (A14B image-to-video and text-to-video with the lightx2v 4-step LoRAs, TI2V-5B)
run in the test executor as ComfyUI would run them, on tiny models under Comfy-Org's file names, and give the
frames of the Python API called with the same files, LoRAs and settings (which the Wan2.2 tests check against
diffusers' pipelines)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from comfy_executor import REPO_ROOT, core_nodes, execute, load_pack, make_folder_paths
from test_loras import make_lora, save

from video_offload import VideoGenerator
from video_offload.offload import OffloadManager

API = REPO_ROOT / "workflows" / "api"
WAN22 = sorted(API.glob("wan2.2_*.json"))
SMALL = {"width": 96, "height": 64, "num_frames": 9}


def test_the_wan22_workflows_mirror_comfyuis_templates():
    """ComfyUI's Wan2.2 templates: 14B experts in fp8 with the 4-step LoRAs at strength 1, 4 steps, cfg 1, shift 5,
    euler, 640x640x81 at 16 fps; TI2V-5B at 1280x704x121, 20 steps, cfg 5, shift 8, UniPC, 24 fps."""
    names = {p.stem for p in WAN22}
    assert names == {"wan2.2_a14b_i2v_4step_lora", "wan2.2_a14b_t2v_4step_lora", "wan2.2_ti2v_5b"}
    for path in WAN22:
        prompt = json.loads(path.read_text())
        sample = next(n["inputs"] for n in prompt.values() if n["class_type"] == "VideoOffloadSample")
        save_node = next(n["inputs"] for n in prompt.values() if n["class_type"] == "VideoOffloadSaveVideo")
        loras = [n["inputs"] for n in prompt.values() if n["class_type"] == "VideoOffloadLoadLoRA"]
        if "a14b" in path.stem:
            kind = "i2v" if "i2v" in path.stem else "t2v"
            assert (sample["steps"], sample["cfg"], sample["flow_shift"], sample["sampler"]) == (4, 1.0, 5.0, "euler")
            assert (sample["width"], sample["height"], sample["num_frames"], save_node["fps"]) == (640, 640, 81, 16)
            assert sorted((lora["expert"], lora["strength"]) for lora in loras) == [("high_noise", 1.0), ("low_noise", 1.0)]
            assert all(f"wan2.2_{kind}_lightx2v_4steps_lora" in lora["lora_name"] for lora in loras)
            dits = {n["inputs"]["dit_name"] for n in prompt.values() if n["class_type"] == "VideoOffloadLoadDiT"}
            assert dits == {f"wan2.2_{kind}_{noise}_noise_14B_fp8_scaled.safetensors" for noise in ("high", "low")}
        else:
            assert (sample["steps"], sample["cfg"], sample["flow_shift"], sample["sampler"]) == (20, 5.0, 8.0, "model")
            assert (sample["width"], sample["height"], sample["num_frames"], save_node["fps"]) == (1280, 704, 121, 24)
            assert not loras


def provision(root, prompt: dict, spiece_model) -> dict:
    """Tiny models under every file name ``prompt`` picks, in a ComfyUI-style models folder; returns the files by
    what the Python API calls them (``dit``, ``dit_2``, ``text_encoder``, ``vae``, and the LoRA files)."""
    from video_offload.offload.families.wan.text import tokenizer_from_sentencepiece
    from video_offload.offload.families.wan.tiny import SINGLE_FILE_TINY
    from video_offload.offload.families.wan.tiny_a14b import build_tiny_wan22_a14b, export_a14b_files
    from video_offload.offload.families.wan.tiny_ti2v import build_tiny_ti2v, export_ti2v_single_files

    tokenizer = tokenizer_from_sentencepiece(spiece_model)
    dit_names = [n["inputs"]["dit_name"] for n in prompt.values() if n["class_type"] == "VideoOffloadLoadDiT"]
    te_name = next(n["inputs"]["text_encoder_name"] for n in prompt.values()
                   if n["class_type"] == "VideoOffloadLoadTextEncoder")
    vae_name = next(n["inputs"]["vae_name"] for n in prompt.values() if n["class_type"] == "VideoOffloadLoadVAE")
    work = root / "work"
    if len(dit_names) == 2:
        kind = "i2v" if "_i2v_" in dit_names[0] else "t2v"
        folder = build_tiny_wan22_a14b(work / "folder", image_to_video=kind == "i2v", seed=5, tokenizer=tokenizer,
                                       spec=dataclasses.replace(SINGLE_FILE_TINY, num_layers=2))
        files = export_a14b_files(folder, work / "files", "fp8_scaled", spiece_model=spiece_model)
    else:
        folder = build_tiny_ti2v(work / "folder", tokenizer=tokenizer)
        files = export_ti2v_single_files(folder, work / "files", spiece_model=spiece_model)
    placed = {"dit": root / "diffusion_models" / dit_names[0], "text_encoder": root / "text_encoders" / te_name,
              "vae": root / "vae" / vae_name}
    if len(dit_names) == 2:
        placed["dit_2"] = root / "diffusion_models" / dit_names[1]
    for argument, target in placed.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[argument], target)
    from diffusers import WanTransformer3DModel

    for seed, node in enumerate(n for n in prompt.values() if n["class_type"] == "VideoOffloadLoadLoRA"):
        expert = "transformer" if node["inputs"]["expert"] == "high_noise" else "transformer_2"
        transformer = WanTransformer3DModel.from_pretrained(str(folder / expert))
        target = root / "loras" / node["inputs"]["lora_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        placed[f"lora:{expert}"] = save(make_lora(transformer, seed=seed + 1, rank=2), target)
    return placed


@pytest.mark.parametrize("api_file", WAN22, ids=lambda p: p.stem)
def test_wan22_workflow_runs_and_equals_the_python_api(api_file, tmp_path, start_image, spiece_model):
    prompt = json.loads(api_file.read_text())
    models = tmp_path / "models"
    files = provision(models, prompt, spiece_model)
    inputs, output = tmp_path / "input", tmp_path / "output"
    inputs.mkdir()
    start_image.save(inputs / "start_frame.png")
    pack = load_pack(REPO_ROOT, make_folder_paths(models / "diffusers", output, inputs), {})
    mappings = {**core_nodes(inputs), **pack.NODE_CLASS_MAPPINGS}
    for node in prompt.values():
        if node["class_type"] == "VideoOffloadSample":
            node["inputs"].update(SMALL)
        if node["class_type"] == "VideoOffloadWanModel":
            node["inputs"]["precision"] = "float32"
    sample = next(n["inputs"] for n in prompt.values() if n["class_type"] == "VideoOffloadSample")
    encode = next(n["inputs"] for n in prompt.values() if n["class_type"] == "VideoOffloadEncodePrompt")
    results = execute(prompt, mappings)
    frames = results[next(k for k, v in prompt.items() if v["class_type"] == "VideoOffloadDecodeVAE")][0].numpy()
    assert list(output.rglob("*.mp4")), "Save Video wrote nothing"

    generator = VideoGenerator.from_files(
        **{k: str(v) for k, v in files.items() if not k.startswith("lora:")}, precision="float32",
        manager=OffloadManager("cpu"),
    )
    loras = [(str(path), 1.0, key.split(":")[1]) for key, path in files.items() if key.startswith("lora:")]
    job = dict(height=sample["height"], width=sample["width"], num_frames=sample["num_frames"],
               num_inference_steps=sample["steps"], guidance_scale=sample["cfg"], flow_shift=sample["flow_shift"],
               seed=sample["seed"], sampler=sample["sampler"], save_video=False,
               image=start_image if "image" in encode else None)
    expected = generator.generate_video(encode["prompt"], encode["negative_prompt"], loras=loras, **job)
    assert frames.shape == expected.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    assert np.abs(frames - expected).max() <= 1e-4  # the bound every frame comparison of the pack uses
    if loras:  # the LoRAs matter: without them the video differs
        plain = generator.generate_video(encode["prompt"], encode["negative_prompt"], **job)
        assert np.abs(plain - expected).max() > 1e-4
    assert torch.is_tensor(results[next(k for k, v in prompt.items() if v["class_type"] == "VideoOffloadSample")][0]["samples"])
