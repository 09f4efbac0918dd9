"""The files ComfyUI users already have: Comfy-Org-style single files in every layout (bf16, fp16, fp8_e4m3fn,
scaled fp8), each written by the test from a tiny Diffusers model it builds, give the frames of that model's
Diffusers folder - bit for bit where the weights are the same numbers (bf16/fp16 files against a folder rounded
alike; fp8 files against a folder holding ComfyUI's dequantisation of the file, computed here from ComfyUI's rule).
Wrong files fail with the file named and what was expected; fp8 weights sit in host memory at one byte each."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from video_offload import VideoGenerator
from video_offload.offload import ModelLoadError, OffloadManager
from video_offload.offload.families import open_files
from single_file_helpers import LAYOUTS, comfyui_dequantize, generator_for
from video_offload.offload.families.wan.comfy_export import KEY_LAYOUTS, export_component, write_safetensors
from video_offload.offload.weights.diffusers_folder import DiffusersFolder

spm = pytest.importorskip("sentencepiece")

FP8 = torch.float8_e4m3fn
SIZES = dict(height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=4.0, seed=7)
PROMPT, NEGATIVE = "A curious raccoon peers through a field of sunflowers.", "blurred, static"


@pytest.fixture(scope="module")
def folders(single_file_folders):
    return single_file_folders


@pytest.fixture(scope="module")
def files(single_files):
    return single_files


@pytest.fixture(scope="module")
def references(single_file_references):
    return single_file_references


def frames(generator: VideoGenerator, image=None) -> np.ndarray:
    return generator.generate_video(PROMPT, NEGATIVE, image=image, save_video=False, **SIZES)


# ------------------------------------------------------------------------------------------------------ numerics


def test_the_tokenizer_comes_from_the_text_encoder_file_and_tokenizes_as_comfyui(files, spiece_model):
    """ComfyUI's SPieceTokenizer is sentencepiece over ``spiece_model`` with ``add_eos``; ours must give its ids."""
    source, spec = open_files(files[("t2v", "fp8_scaled")])
    tokenizer = source.load(spec.component("tokenizer"), None)
    comfyui = spm.SentencePieceProcessor(model_proto=spiece_model, add_bos=False, add_eos=True)
    for text in [PROMPT, "  two  spaces, UPPER case & digits 0123 ", "ÅÉ ﬁ ＡＢ fullwidth", "tabs\tand\nlines", "x", ""]:
        assert tokenizer(text, add_special_tokens=True).input_ids == comfyui.encode(text), text


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_frames_from_single_files_equal_frames_from_the_folder(files, references, kind, layout, start_image):
    image = start_image if kind == "i2v" else None
    expected = frames(generator_for(references[(kind, layout)]), image)
    generator = generator_for(files[(kind, layout)])
    assert generator.model.spec.name == f"wan2.1-{kind}"
    got = frames(generator, image)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_fp8_weights_equal_comfyui_dequantisation_elementwise(files):
    """Every tensor of every component loaded from the scaled-fp8 files equals ComfyUI's computation on the file,
    element for element, in float32 and in bfloat16 - whole (text encoder, VAE) or widened in a slot (DiT)."""
    paths = files[("t2v", "fp8_scaled")]
    source, spec = open_files(paths)
    for dtype in (torch.float32, torch.bfloat16):
        for argument, component_name in (("dit", "transformer"), ("text_encoder", "text_encoder")):
            component = spec.component(component_name)
            model = source.load(component, dtype)
            with safe_open(str(paths[argument]), "pt") as handle:
                keys = set(handle.keys())
                checked = 0
                for name, value in model.state_dict().items():
                    key = KEY_LAYOUTS[component_name]("shared.weight" if name == "encoder.embed_tokens.weight" else name)
                    stored = handle.get_tensor(key)
                    if stored.dtype != FP8:
                        continue
                    scale = handle.get_tensor(key[: -len("weight")] + "scale_weight")
                    assert torch.equal(value, comfyui_dequantize(stored, scale, value.dtype)), name
                    checked += 1
                assert checked > 0 and "scaled_fp8" in keys


def test_comfyui_ops_when_available(files, monkeypatch):
    """With COMFYUI_PATH pointing at a ComfyUI checkout whose comfy.ops imports here, compare against its own
    scaled-fp8 Linear (cast_bias_weight then the scale), not only against this file's reading of it."""
    import os
    import sys

    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to compare against comfy.ops itself")
    monkeypatch.syspath_prepend(path)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"]))
    try:
        import comfy.options

        comfy.options.enable_args_parsing()  # so that --cpu (above) reaches ComfyUI's own argument parser
        import comfy.ops
    except Exception as e:  # noqa: BLE001 - ComfyUI's import needs its own dependencies
        pytest.skip(f"comfy.ops does not import here: {type(e).__name__}: {e}")
    paths = files[("t2v", "fp8_scaled")]
    source, spec = open_files(paths)
    model = source.load(spec.component("transformer"), torch.bfloat16)
    ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False, override_dtype=FP8)
    with safe_open(str(paths["dit"]), "pt") as handle:
        key = "blocks.0.self_attn.q"
        weight, scale = handle.get_tensor(key + ".weight"), handle.get_tensor(key + ".scale_weight")
        linear = ops.Linear(weight.shape[1], weight.shape[0], bias=False, device="cpu", dtype=FP8)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        linear.scale_weight = torch.nn.Parameter(scale, requires_grad=False)
        ours = model.blocks[0].attn1.to_q.weight
        # ComfyUI's dequantised weight: its cast (cast_bias_weight) then its scaling (convert_weight).
        x = torch.randn(1, 2 * weight.numel() // weight.shape[1], weight.shape[1], dtype=torch.bfloat16)
        cast, _ = comfy.ops.cast_bias_weight(linear, x)
        assert torch.equal(linear.convert_weight(cast), ours)
        # And its forward, on an input larger than the weight (so it scales the weight, not the input).
        assert torch.equal(linear.forward_comfy_cast_weights(x), torch.nn.functional.linear(x, ours))


# ------------------------------------------------------------------------------------------------------ placement


def test_fp8_stays_fp8_in_host_memory_and_over_the_slot_pipeline(files):
    """Defaults (layerwise DiT, text encoder on the CPU): both stream from their fp8 bytes; the bytes copied per
    block are the stored bytes; the host holds about one byte per fp8 parameter."""
    paths = files[("t2v", "fp8_scaled")]
    generator = generator_for(paths)
    frames(generator)
    manager, model = generator.manager, generator.model
    dit = manager.offloader(model, "transformer")
    text = manager.offloader(model, "text_encoder")
    for offloader, argument in ((dit, "dit"), (text, "text_encoder")):
        stats = offloader.stats()
        assert stats.stored_narrow and stats.block_bytes < stats.device_block_bytes
        assert stats.transferred_bytes == stats.transfers * stats.block_bytes
        stored = {s.name: s for s in offloader.staged.stored.slots}
        block = offloader.blocks[0]
        linears = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(stored[f"{n}.weight"].dtype == FP8 for n in linears)
        with safe_open(str(paths[argument]), "pt") as handle:
            header_fp8 = sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1]
                             for k in handle.keys() if handle.get_slice(k).get_dtype() == "F8_E4M3"
                             and (".blocks." in f".{k}" or k.startswith("encoder.block.")))
        fp8_in_arena = sum(s.nbytes for s in offloader.staged.stored.slots if s.dtype == FP8) * stats.num_blocks
        assert fp8_in_arena == header_fp8  # every fp8 byte of the blocks, once, at one byte per parameter
    assert text.device.type == "cpu" and dit.device == manager.device
    stats = dit.stats()
    assert stats.host_bytes < stats.num_blocks * stats.device_block_bytes / 2  # fp8 blocks vs their float32 slots
    records = {r.component: r for r in generator.report()}
    assert records["transformer"].nbytes == stats.host_bytes + stats.non_block_bytes
    assert records["text_encoder"].device == "cpu"


def test_bf16_files_stream_like_folders(files):
    generator = generator_for(files[("t2v", "bf16")])
    frames(generator)
    assert not generator.manager.offloader(generator.model, "transformer").stats().stored_narrow
    assert generator.manager.offloader(generator.model, "text_encoder") is None  # loaded whole, as from a folder


def test_resident_and_device_text_encoder_paths_widen_once(files, references):
    """Without layerwise offload and without text-encoder CPU offload, fp8 files are widened at placement."""
    expected = frames(generator_for(references[("t2v", "fp8_scaled")]))
    options = dict(dit_layerwise_offload=False, text_encoder_cpu_offload=False)
    generator = generator_for(files[("t2v", "fp8_scaled")], **options)
    assert np.array_equal(frames(generator), expected)
    assert generator.manager.offloader(generator.model, "transformer") is None
    assert generator.manager.offloader(generator.model, "text_encoder") is None


def test_fp8_text_encoder_streamed_through_the_device_stays_fp8(files, references):
    """text_encoder_layerwise_offload: the fp8 text encoder streams from its stored form, its embedding (a host
    module) widened once in host memory; same frames."""
    expected = frames(generator_for(references[("t2v", "fp8_scaled")]))
    generator = generator_for(files[("t2v", "fp8_scaled")], text_encoder_cpu_offload=False,
                              text_encoder_layerwise_offload=True)
    assert np.array_equal(frames(generator), expected)
    text = generator.manager.offloader(generator.model, "text_encoder")
    assert text.stats().stored_narrow and text.model.shared.weight.device.type == "cpu"
    assert text.model.encoder.embed_tokens.weight is text.model.shared.weight


def test_a_mix_of_single_files_and_a_diffusers_folder(folders, files, references):
    """The DiT and VAE from single files, the text encoder (and so the tokenizer) from a Diffusers folder."""
    paths = dict(files[("t2v", "bf16")])
    reference = references[("t2v", "bf16")]
    paths["text_encoder"] = reference
    source, _ = open_files(paths)
    assert isinstance(source.parts["tokenizer"], type(source.parts["text_encoder"]))
    assert np.array_equal(frames(generator_for(paths)), frames(generator_for(reference)))


# ------------------------------------------------------------------------------------------------------ errors


def rewrite(path: Path, target: Path, drop=(), rename=None, extra=None) -> Path:
    tensors = load_file(str(path))
    tensors = {(rename or {}).get(k, k): v for k, v in tensors.items() if k not in drop}
    tensors.update(extra or {})
    save_file(tensors, str(target))
    return target


@pytest.mark.parametrize(
    "argument, use, message",
    [
        ("dit", "vae", r"vae_bf16\.safetensors is not a DiT this pack runs \(it is a Wan VAE \(it belongs in vae\)\)"),
        ("text_encoder", "dit", r"is not the UMT5-XXL text encoder .*it is a Wan DiT \(it belongs in diffusion_models\)"),
        ("vae", "text_encoder", r"is not the Wan2\.1 VAE .*it is a T5-family text encoder"),
        ("image_encoder", "vae", r"is not the CLIP ViT-H/14 vision encoder .*it is a Wan VAE"),
    ],
)
def test_a_file_in_the_wrong_slot_names_the_file_and_what_was_expected(files, argument, use, message):
    paths = dict(files[("i2v", "bf16")])
    paths[argument] = paths[use]
    with pytest.raises(ModelLoadError, match=message):
        open_files(paths)


def test_other_wan_files_are_recognised_and_refused_by_name(files, tmp_path):
    paths = dict(files[("i2v", "bf16")])
    dit = paths["dit"]
    with safe_open(str(dit), "pt") as handle:
        image_keys = [k for k in handle.keys() if ".img_emb." in f".{k}" or "_img." in k or "norm_k_img" in k]
    wan22 = rewrite(dit, tmp_path / "wan2.2_i2v_high_noise_14B.safetensors", drop=image_keys)
    with pytest.raises(ModelLoadError, match=r"wan2\.2_i2v_high_noise_14B\.safetensors is not a DiT this pack runs "
                                             r"\(it is a Wan2\.2 I2V A14B expert .*give it as dit with its low-noise expert as dit_2"):
        open_files({**paths, "dit": wan22})
    flf = rewrite(dit, tmp_path / "flf2v.safetensors", extra={"model.diffusion_model.img_emb.emb_pos": torch.zeros(1, 2, 3)})
    with pytest.raises(ModelLoadError, match=r"FLF2V .*which this pack does not run"):
        open_files({**paths, "dit": flf})
    vae = rewrite(paths["vae"], tmp_path / "wan2.2_vae.safetensors",
                  extra={"decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match=r"wan2\.2_vae\.safetensors is not the Wan2\.1 VAE .*\(it is the Wan2\.2 VAE"):
        open_files({**paths, "vae": vae})


def test_a_t5_that_is_not_umt5_is_refused(files, tmp_path):
    paths = dict(files[("t2v", "bf16")])
    t5 = rewrite(paths["text_encoder"], tmp_path / "t5xxl_fp16.safetensors",
                 drop=["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"])
    with pytest.raises(ModelLoadError, match=r"t5xxl_fp16\.safetensors is not the UMT5-XXL text encoder .*not UMT5"):
        open_files({**paths, "text_encoder": t5})


def test_a_text_encoder_without_its_tokenizer_says_which_file_has_one(files, tmp_path):
    paths = dict(files[("t2v", "bf16")])
    bare = rewrite(paths["text_encoder"], tmp_path / "umt5_no_tokenizer.safetensors", drop=["spiece_model"])
    with pytest.raises(ModelLoadError, match=r"umt5_no_tokenizer\.safetensors has no 'spiece_model' tensor.*Fix: use "
                                             r"Comfy-Org's umt5_xxl_fp8_e4m3fn_scaled\.safetensors"):
        open_files({**paths, "text_encoder": bare})


def test_components_are_required_or_refused_by_the_model_kind(files):
    i2v = dict(files[("i2v", "bf16")])
    del i2v["image_encoder"]
    with pytest.raises(ModelLoadError, match=r"wan2\.1-i2v needs a image encoder: image_encoder is missing.*clip_vision_h"):
        open_files(i2v)
    t2v = dict(files[("t2v", "bf16")], image_encoder=files[("i2v", "bf16")]["image_encoder"])
    with pytest.raises(ModelLoadError, match=r"image_encoder=.* was given, but wan2\.1-t2v models have no image encoder"):
        open_files(t2v)
    with pytest.raises(ModelLoadError, match=r"dit is missing"):
        open_files({"text_encoder": t2v["text_encoder"], "vae": t2v["vae"]})


def test_a_variant_whose_shapes_do_not_fit_fails_when_opened(files, tmp_path):
    paths = dict(files[("t2v", "bf16")])
    broken = rewrite(paths["dit"], tmp_path / "truncated_ffn.safetensors",
                     extra={"model.diffusion_model.blocks.1.ffn.0.weight": torch.zeros(7, 256, dtype=torch.bfloat16)})
    with pytest.raises(ModelLoadError, match=r"truncated_ffn\.safetensors: the weights do not match "
                                             r"WanTransformer3DModel's config \(wrong shape: blocks\.1\.ffn"):
        open_files({**paths, "dit": broken})


def test_pickles_and_truncated_files_are_refused_by_name(files, tmp_path):
    paths = dict(files[("t2v", "bf16")])
    pickle = tmp_path / "wan2.1_t2v_1.3B.pt"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match=r"wan2\.1_t2v_1\.3B\.pt is a pickle checkpoint"):
        open_files({**paths, "dit": pickle})
    truncated = tmp_path / "umt5_truncated.safetensors"
    truncated.write_bytes(paths["text_encoder"].read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"umt5_truncated\.safetensors is truncated"):
        open_files({**paths, "text_encoder": truncated})


# ------------------------------------------------------------------------------------------------------ folders


def test_hugging_face_cache_layout_opens_its_snapshot(folders, tmp_path):
    repo = tmp_path / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(folders["t2v"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert DiffusersFolder.open(repo, "hint").path == snapshot
    generator = VideoGenerator.from_pretrained(repo, manager=OffloadManager("cpu"))
    assert generator.model.source.path == snapshot


def test_the_command_line_takes_a_file_per_component(files, tmp_path):
    from video_offload.offload.pipeline.cli import main

    paths = files[("t2v", "fp8_scaled")]
    out = tmp_path / "video.mp4"
    code = main(["generate", "--dit", str(paths["dit"]), "--text-encoder", str(paths["text_encoder"]), "--vae",
                 str(paths["vae"]), "--height", "64", "--width", "64", "--num-frames", "5", "--num-inference-steps", "1",
                 "--precision", "float32", "--device", "cpu", "--output-path", str(out)])
    assert code == 0 and out.stat().st_size > 0
    assert main(["generate", "--dit", str(paths["dit"]), "--vae", str(paths["vae"]), "--no-save"]) == 2


def test_exported_files_have_comfyui_conventions(files):
    """What the loader is tested against: ComfyUI's scaled-fp8 marker and scales, fp8 Linear weights, the
    tokenizer in the text encoder's file, the original Wan key layout."""
    paths = files[("t2v", "fp8_scaled")]
    with safe_open(str(paths["dit"]), "pt") as handle:
        keys = set(handle.keys())
        assert {"scaled_fp8", "head.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.q.scale_weight",
                "blocks.0.norm3.weight", "time_embedding.0.weight"} <= keys
        assert handle.get_tensor("blocks.0.ffn.0.weight").dtype == FP8
        assert handle.get_tensor("blocks.0.ffn.0.scale_weight").dtype == torch.float32
    with safe_open(str(paths["text_encoder"]), "pt") as handle:
        assert handle.get_tensor("spiece_model").dtype == torch.uint8
    with safe_open(str(files[("t2v", "bf16")]["dit"]), "pt") as handle:
        assert all(k.startswith("model.diffusion_model.") for k in handle.keys())
    with safe_open(str(paths["vae"]), "pt") as handle:
        assert {"decoder.middle.0.residual.0.gamma", "decoder.upsamples.3.resample.1.weight", "conv2.weight"} <= set(handle.keys())


def test_write_safetensors_streams_declared_tensors(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", [
        ("a", (2, 3), torch.bfloat16, lambda: torch.ones(2, 3, dtype=torch.bfloat16)),
        ("s", (), torch.float32, lambda: torch.tensor(0.5)),
    ])
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], torch.ones(2, 3, dtype=torch.bfloat16)) and loaded["s"].item() == 0.5
    with pytest.raises(ValueError, match="declared"):
        write_safetensors(tmp_path / "y.safetensors", [("a", (2,), torch.float32, lambda: torch.ones(3))])


def test_export_component_round_trips_through_the_loader(folders, tmp_path):
    """The inverse key layout written here and diffusers' conversion read back agree on every VAE tensor."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(folders["t2v"] / "vae"), dtype=torch.float32)
    path = export_component(vae, "vae", tmp_path / "vae.safetensors", "bf16")
    source, spec = open_files({"dit": str(folders["t2v"]), "text_encoder": str(folders["t2v"]), "vae": str(path)})
    loaded = source.load(spec.component("vae"), torch.float32)
    for name, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16).float()), name


def test_fsdp_workers_reopen_single_files_and_widen_their_shards(files):
    """Two CPU ranks (gloo) each read their rows of every fp8 weight from the file, widened with the same rule:
    the frames are those of one process."""
    paths = files[("t2v", "fp8_scaled")]
    expected = frames(generator_for(paths))
    generator = generator_for(paths, num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False,
                              dit_cpu_offload=False)
    try:
        got = frames(generator)
        assert np.abs(got - expected).max() <= 1e-5
        group = generator.model.resources.worker_group
        assert group is not None and group.info["plan"].startswith("FSDP over 2 ranks")
    finally:
        generator.shutdown()


def test_a_hostile_file_is_refused_by_the_config_bounds_before_anything_is_built(files, tmp_path):
    """A single file's config comes from its tensors' shapes; the family's bounds apply to it as to a folder's
    config.json, before a model is built from it (a key claiming block 1500 would otherwise build 1501 blocks)."""
    paths = dict(files[("t2v", "bf16")])
    hostile = rewrite(paths["dit"], tmp_path / "many_blocks.safetensors",
                      extra={"model.diffusion_model.blocks.1500.ffn.0.weight": torch.zeros(1, dtype=torch.bfloat16)})
    with pytest.raises(ModelLoadError, match=r"many_blocks\.safetensors: num_layers=1501 must be from 1 to 1000"):
        open_files({**paths, "dit": hostile})
