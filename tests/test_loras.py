"""LoRAs as users hold them: our frames equal diffusers' with the same LoRA loaded and fused (the oracle), with the
DiT streamed and resident, a strength change reloads nothing, and the host master copy is never written.

LoRA files are built here from random tensors, with keys written from a hand-made table of Wan's native names
(independent of the loader's mapping, which reuses diffusers' single-file conversion)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from video_offload import VideoGenerator
from video_offload.offload.errors import ConfigError, ModelLoadError

pytest.importorskip("peft")

SIZES = dict(height=32, width=48, num_frames=5, num_inference_steps=2)
PROMPT, NEGATIVE, SEED = "a raccoon in sunflowers", "blurry", 11

NATIVE = {**{f"self_attn.{o}": f"attn1.{c}" for o, c in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])},
          **{f"cross_attn.{o}": f"attn2.{c}" for o, c in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])},
          "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
"""Wan's native block module names -> diffusers' (written out by hand for the tests)."""


def tiny_transformer(folder):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)


def make_lora(transformer, style="native", rank=4, alpha=2.0, seed=0, diff_b=False, up_down=("lora_up", "lora_down")):
    """A LoRA on every Linear of every block: ``native`` keys (``diffusion_model.blocks.0.self_attn.q.lora_up.weight``)
    or ``kohya`` keys (``lora_unet_blocks_0_self_attn_q.lora_up.weight``), each with an alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, block in enumerate(transformer.blocks):
        for native, diffusers_name in NATIVE.items():
            linear = block.get_submodule(diffusers_name)
            key = (f"diffusion_model.blocks.{i}.{native}" if style == "native"
                   else f"lora_unet_blocks_{i}_{native.replace('.', '_')}")
            sd[f"{key}.{up_down[1]}.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.3
            sd[f"{key}.{up_down[0]}.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
            if diff_b:
                sd[f"{key}.diff_b"] = torch.randn(linear.out_features, generator=g) * 0.05
    return sd


def save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def diffusers_frames(folder, lora=None, strength=1.0, edit=None):
    """diffusers' WanPipeline with ``lora`` loaded and fused at ``strength`` (``edit`` changes the transformer
    afterwards, for deltas diffusers does not read)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="test")  # it scales some in place
        pipe.fuse_lora(components=["transformer"], lora_scale=strength)
        pipe.unload_lora_weights()
    if edit is not None:
        with torch.no_grad():
            edit(pipe.transformer)
    return pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
                **{k: v for k, v in SIZES.items()}).frames[0]


def generate(generator, loras=()):
    return generator.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=SEED, guidance_scale=5.0, flow_shift=3.0,
                                    save_video=False, loras=loras, **SIZES)


def host_master(generator, layerwise):
    """The bytes of the DiT's host master copy (the offloader's arena, or the resident placer's)."""
    model = generator.model
    if layerwise:
        return generator.manager.offloader(model, "transformer")._arena.buffer
    return model.resources.placers["transformer"].arena.buffer


@pytest.mark.slow
@pytest.mark.parametrize("layerwise,resident_blocks", [(True, 0), (True, 1), (False, 0)],
                         ids=["layerwise", "layerwise_one_resident_block", "resident"])
def test_native_lora_equals_diffusers_fused_and_strength_changes_reload_nothing(tiny_t2v, tmp_path, layerwise,
                                                                               resident_blocks):
    lora = make_lora(tiny_transformer(tiny_t2v), "native", rank=4, alpha=2.0, diff_b=True)
    path = save(lora, tmp_path / "native.safetensors")
    generator = VideoGenerator.from_pretrained(tiny_t2v, dit_layerwise_offload=layerwise, precision="float32",
                                               resident_blocks=resident_blocks)

    plain = generate(generator)
    master = host_master(generator, layerwise).clone()
    holder = generator.manager.offloader(generator.model, "transformer") if layerwise else \
        generator.model.resources.placers["transformer"]

    for strength in (0.7, -1.3):
        ours = generate(generator, [(path, strength)])
        reference = diffusers_frames(tiny_t2v, lora, strength)
        assert np.abs(ours - reference).max() <= 1e-4
        assert np.abs(ours - plain).max() > 1e-3  # the LoRA does change the video
    again = generate(generator)

    assert np.array_equal(again, plain)  # LoRA off: bit for bit the unpatched model
    assert torch.equal(host_master(generator, layerwise), master)  # the host master copy was never written
    same = generator.manager.offloader(generator.model, "transformer") if layerwise else \
        generator.model.resources.placers["transformer"]
    assert same is holder  # no reload: the same streamed / placed model throughout
    if layerwise:
        assert holder.stats().resident_blocks == resident_blocks and holder.stats().streamed_blocks > 0


@pytest.mark.slow
def test_kohya_lora_with_lora_a_b_spelling_equals_diffusers(tiny_t2v, tmp_path):
    lora = make_lora(tiny_transformer(tiny_t2v), "kohya", rank=3, alpha=6.0, seed=1)
    path = save(lora, tmp_path / "kohya.safetensors")
    generator = VideoGenerator.from_pretrained(tiny_t2v, dit_layerwise_offload=True, precision="float32")
    ours = generate(generator, [(path, 0.8)])
    assert np.abs(ours - diffusers_frames(tiny_t2v, lora, 0.8)).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "resident"])
def test_full_deltas_and_layers_outside_the_blocks(tiny_t2v, tmp_path, layerwise):
    """``.diff`` on a block weight and a norm (ComfyUI adds them; diffusers ignores them, so the oracle adds them by
    hand), ``lora_A/lora_B`` spelling, and a LoRA on ``head.head`` (outside the streamed blocks: a side path)."""
    transformer = tiny_transformer(tiny_t2v)
    lora = make_lora(transformer, "native", rank=2, alpha=1.0, seed=2, up_down=("lora_B", "lora_A"))
    g = torch.Generator().manual_seed(5)
    q = transformer.blocks[1].attn1.to_q.weight
    diff_q = torch.randn(q.shape, generator=g) * 0.05
    diff_norm = torch.randn(transformer.blocks[0].norm2.weight.shape, generator=g) * 0.1
    head_up = torch.randn(transformer.proj_out.out_features, 2, generator=g) * 0.2
    head_down = torch.randn(2, transformer.proj_out.in_features, generator=g) * 0.2
    lora.update({
        "diffusion_model.blocks.1.self_attn.q.diff": diff_q,
        "diffusion_model.blocks.0.norm3.diff": diff_norm,  # native norm3 is diffusers' norm2
        "diffusion_model.head.head.lora_B.weight": head_up,
        "diffusion_model.head.head.lora_A.weight": head_down,
    })
    path = save(lora, tmp_path / "deltas.safetensors")
    strength = 0.6
    low_rank_only = {k: v for k, v in lora.items() if not k.endswith(".diff") and "head.head" not in k}

    def edit(model):
        model.blocks[1].attn1.to_q.weight += strength * diff_q
        model.blocks[0].norm2.weight += strength * diff_norm
        model.proj_out.weight += strength * head_up @ head_down

    generator = VideoGenerator.from_pretrained(tiny_t2v, dit_layerwise_offload=layerwise, precision="float32")
    ours = generate(generator, [(path, strength)])
    assert np.abs(ours - diffusers_frames(tiny_t2v, low_rank_only, strength, edit)).max() <= 1e-4


def test_unknown_keys_warn_and_a_file_for_another_model_is_refused(tiny_t2v, tmp_path, caplog):
    transformer = tiny_transformer(tiny_t2v)
    lora = make_lora(transformer, "native", rank=2)
    lora["diffusion_model.blocks.0.diff_m"] = torch.zeros(6, 24)  # lightx2v's modulation delta: ComfyUI skips it too
    lora["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(24, 2)  # a block this model lacks
    lora["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(2, 24)
    path = save(lora, tmp_path / "extra.safetensors")
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    with caplog.at_level(logging.WARNING):
        patches = generator.lora_patches([(path, 1.0)])
    assert len(patches["transformer"].entries[0][0].targets) == 2 * len(NATIVE)
    assert "extra.safetensors: 3 keys not loaded" in caplog.text and "blocks.7.self_attn.q.lora_up" in caplog.text

    other = save({"lora_unet_input_blocks_1_0_proj.lora_up.weight": torch.zeros(4, 2),
                  "lora_unet_input_blocks_1_0_proj.lora_down.weight": torch.zeros(2, 4)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(ModelLoadError, match=r"LoRA sdxl.safetensors does not fit .*transformer: none of its 2 keys"):
        generator.lora_patches([other])

    wide = make_lora(transformer, "native", rank=2)
    wide["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] = torch.zeros(48, 2)  # a wider model's LoRA
    with pytest.raises(ModelLoadError, match=r"wide.safetensors does not fit this model: .*self_attn.q.lora_up"):
        generator.lora_patches([save(wide, tmp_path / "wide.safetensors")])
    with pytest.raises(ModelLoadError, match=r"only .safetensors LoRA files"):
        generator.lora_patches([tmp_path / "lora.pt"])
    with pytest.raises(ConfigError, match=r"strength=inf: must be a number"):
        generator.lora_patches([(path, float("inf"))])
    with pytest.raises(ConfigError, match=r"dit='transformer_2': .* has the DiT\(s\) transformer"):
        generator.lora_patches([(path, 1.0, "transformer_2")])


def test_loras_under_fsdp_are_refused_before_any_work(tiny_t2v, tmp_path):
    path = save(make_lora(tiny_transformer(tiny_t2v), "native", rank=2), tmp_path / "l.safetensors")
    generator = VideoGenerator.from_pretrained(tiny_t2v, num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False,
                                               precision="float32")
    with pytest.raises(ConfigError, match=r"use_fsdp_inference=True: LoRAs are not applied to DiTs sharded over GPUs"):
        generate(generator, [path])
    assert "text_encoder" not in generator.model.components  # refused before the prompt was encoded


def test_lora_flag_parses_file_and_strength():
    from video_offload.offload.pipeline.loras import LoraChoice

    assert LoraChoice.parse("a/b.safetensors:0.5") == LoraChoice("a/b.safetensors", 0.5)
    assert LoraChoice.parse("C:\\loras\\x.safetensors") == LoraChoice("C:\\loras\\x.safetensors", 1.0)
    assert LoraChoice.parse("x.safetensors:-2").strength == -2.0
    assert LoraChoice.parse("transformer_2=/l/low.safetensors:0.5") == LoraChoice("/l/low.safetensors", 0.5, "transformer_2")
    with pytest.raises(ConfigError, match=r"strength=nan: must be a number"):
        LoraChoice.parse("x.safetensors:nan")


def test_cli_lora_flag_reaches_the_sampler(tiny_t2v, tmp_path, caplog, capsys):
    from video_offload.offload.pipeline.cli import main

    lora = make_lora(tiny_transformer(tiny_t2v), "native", rank=2)
    path = save(lora, tmp_path / "l.safetensors")
    common = ["generate", "--model-path", str(tiny_t2v), "--precision", "float32", "--height", "32", "--width", "48",
              "--num-frames", "5", "--num-inference-steps", "1", "--no-save", "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert main(common + ["--lora", f"{path}:0.5"]) == 0
    assert "weight patches: l.safetensors x0.5" in caplog.text
    assert main(common + ["--lora", f"transformer_2={path}"]) == 2  # a Wan2.1 model has no second expert
    assert "dit='transformer_2'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "resident"])
def test_lora_on_fp8_scaled_single_files_equals_diffusers_on_the_same_numbers(single_files, single_file_references,
                                                                                tmp_path, layerwise):
    """The fp8 blocks are widened in the slot, then patched: the frames equal diffusers' with the LoRA fused into a
    folder holding the file's numbers dequantised by ComfyUI's rule."""
    from video_offload.offload.core.manager import OffloadManager

    paths = single_files[("t2v", "fp8_scaled")]
    reference_folder = single_file_references[("t2v", "fp8_scaled")]
    lora = make_lora(tiny_transformer(reference_folder), "native", rank=4, alpha=8.0, seed=3, diff_b=True)
    path = save(lora, tmp_path / "fp8.safetensors")
    generator = VideoGenerator.from_files(**{k: str(v) for k, v in paths.items()}, precision="float32",
                                          manager=OffloadManager("cpu"), dit_layerwise_offload=layerwise)
    ours = generate(generator, [(path, 0.9)])
    if layerwise:
        offloader = generator.manager.offloader(generator.model, "transformer")
        assert offloader.stats().stored_narrow  # fp8 in host memory, widened then patched in the slot
    assert np.abs(ours - diffusers_frames(reference_folder, lora, 0.9)).max() <= 1e-4


def test_load_lora_node_in_a_workflow_equals_diffusers_and_leaves_its_input_alone(tiny_t2v, tmp_path):
    """Load Model -> Load LoRA (a file from ComfyUI's loras folder) -> Sample, run by the test executor as ComfyUI
    runs it; a second run at another strength reuses the loaded model."""
    import shutil

    from comfy_executor import REPO_ROOT, core_nodes, execute, load_pack, make_folder_paths

    models = tmp_path / "models" / "diffusers"
    shutil.copytree(tiny_t2v, models / "tiny")
    lora = make_lora(tiny_transformer(tiny_t2v), "kohya", rank=4, alpha=4.0, seed=9)
    (tmp_path / "models" / "loras" / "wan").mkdir(parents=True)
    save(lora, tmp_path / "models" / "loras" / "wan" / "style.safetensors")
    pack = load_pack(REPO_ROOT, make_folder_paths(models, tmp_path / "output"), {})
    assert "wan/style.safetensors" in pack.NODE_CLASS_MAPPINGS["VideoOffloadLoadLoRA"].INPUT_TYPES()["required"]["lora_name"][0]
    mappings = {**core_nodes(tmp_path), **pack.NODE_CLASS_MAPPINGS}

    def prompt(strength):
        return {
            "1": {"class_type": "VideoOffloadLoadModel",
                  "inputs": {"model_name": "tiny", "precision": "float32", "vae_precision": "float32"}},
            "2": {"class_type": "VideoOffloadLoadLoRA",
                  "inputs": {"model": ["1", 0], "lora_name": "wan/style.safetensors", "strength": strength,
                             "expert": "all"}},
            "3": {"class_type": "VideoOffloadEncodePrompt",
                  "inputs": {"model": ["1", 0], "prompt": PROMPT, "negative_prompt": NEGATIVE}},
            "4": {"class_type": "VideoOffloadSample",
                  "inputs": {"model": ["2", 0], "conditioning": ["3", 0], "width": SIZES["width"],
                             "height": SIZES["height"], "num_frames": SIZES["num_frames"],
                             "steps": SIZES["num_inference_steps"], "cfg": 5.0, "flow_shift": 3.0, "seed": SEED}},
            "5": {"class_type": "VideoOffloadDecodeVAE", "inputs": {"model": ["1", 0], "latent": ["4", 0]}},
        }

    first = execute(prompt(0.7), mappings)
    assert first["1"][0].loras == ()  # the handle that flowed in is unchanged
    assert [(dit, s) for dit, _, s in first["2"][0].loras] == [("transformer", 0.7)]
    assert np.abs(first["5"][0].numpy() - diffusers_frames(tiny_t2v, lora, 0.7)).max() <= 1e-4
    handle = first["1"][0]
    offloader = handle.manager.offloader(handle.model, "transformer")

    second = execute(prompt(-0.4), mappings)
    assert second["1"][0].model is handle.model  # the same loaded model
    assert handle.manager.offloader(handle.model, "transformer") is offloader  # not reloaded
    assert np.abs(second["5"][0].numpy() - diffusers_frames(tiny_t2v, lora, -0.4)).max() <= 1e-4


@pytest.fixture
def two_expert_folder(tiny_t2v, tmp_path):
    """A Wan2.2-A14B-like folder built by hand: the tiny T2V model plus a second expert (``transformer_2``, other
    weights) and ``boundary_ratio`` 0.875, which the Wan2.2 A14B spec reads."""
    import json
    import shutil

    from video_offload.offload.families.wan.tiny import build_tiny_wan

    folder = tmp_path / "two-experts"
    shutil.copytree(tiny_t2v, folder)
    other = build_tiny_wan(tmp_path / "other", seed=77)
    shutil.copytree(other / "transformer", folder / "transformer_2")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "resident"])
def test_one_lora_per_expert_equals_diffusers_with_both_fused(two_expert_folder, tmp_path, layerwise):
    """One LoRA per DiT, keyed by component name, each with its strength (ComfyUI's Wan2.2 templates: one
    LoraLoaderModelOnly per expert), against diffusers' WanPipeline with ``transformer_2`` and both LoRAs fused."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    high = make_lora(tiny_transformer(two_expert_folder), "native", rank=4, alpha=2.0, seed=20)
    low = make_lora(tiny_transformer(two_expert_folder), "kohya", rank=2, alpha=2.0, seed=21)
    high_path, low_path = save(high, tmp_path / "high.safetensors"), save(low, tmp_path / "low.safetensors")
    generator = VideoGenerator.from_pretrained(two_expert_folder, dit_layerwise_offload=layerwise, precision="float32")
    assert generator.model.dit_names == ("transformer", "transformer_2")
    ours = generate(generator, [(high_path, 0.8, "transformer"), (low_path, 1.5, "transformer_2")])

    pipe = WanPipeline.from_pretrained(two_expert_folder, dtype=torch.float32)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights({k: v.clone() for k, v in high.items()}, adapter_name="high")
    pipe.load_lora_weights({k: v.clone() for k, v in low.items()}, adapter_name="low", load_into_transformer_2=True)
    pipe.set_adapters(["high", "low"], adapter_weights=[0.8, 1.5])
    pipe.fuse_lora(components=["transformer", "transformer_2"], lora_scale=1.0)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(SEED),
                     output_type="np", **SIZES).frames[0]
    assert np.abs(ours - reference).max() <= 1e-4
    # Both experts ran (2 steps at shift 3: t = 999 high, 750 low), each with its own LoRA.
    plain_low = generate(generator, [(high_path, 0.8, "transformer")])
    assert np.abs(plain_low - ours).max() > 1e-3


def test_the_load_lora_nodes_expert_picks_dits_by_name(two_expert_folder, tiny_t2v):
    from video_offload.nodes.handles import ModelHandle
    from video_offload.nodes.loras import dits_for
    from video_offload.offload.config import OffloadConfig

    two = VideoGenerator.from_pretrained(two_expert_folder, precision="float32")
    handle = ModelHandle(two.manager, two.model, OffloadConfig())
    assert dits_for(handle, "all") == ("transformer", "transformer_2")
    assert dits_for(handle, "high_noise") == ("transformer",)
    assert dits_for(handle, "low_noise") == ("transformer_2",)
    one = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    single = ModelHandle(one.manager, one.model, OffloadConfig())
    assert dits_for(single, "all") == dits_for(single, "high_noise") == ("transformer",)
    with pytest.raises(ConfigError, match=r"expert='low_noise': .* has one DiT, no low-noise expert"):
        dits_for(single, "low_noise")


def test_the_same_lora_in_native_kohya_and_diffusers_keys_patches_the_same_tensors(tiny_t2v, tmp_path):
    transformer = tiny_transformer(tiny_t2v)
    native = make_lora(transformer, "native", rank=2, alpha=1.0, seed=4)
    kohya = {}  # the same tensors under kohya and diffusers keys
    diffusers_keys = {}
    for key, value in native.items():
        module, _, suffix = key.removeprefix("diffusion_model.").partition(".lora_")
        if not suffix:
            module, _, suffix = key.removeprefix("diffusion_model.").rpartition(".")
            suffix = "." + suffix
        else:
            suffix = ".lora_" + suffix
        kohya["lora_unet_" + module.replace(".", "_") + suffix] = value
        block, index, native_name = module.split(".", 2)
        name = f"transformer.{block}.{index}.{NATIVE[native_name]}"
        if suffix != ".alpha":  # diffusers' own files carry no alpha (scale folded in: alpha/rank = 0.5 here)
            spelled = suffix.replace("lora_up", "lora_B").replace("lora_down", "lora_A")
            diffusers_keys[name + spelled] = value * (0.5 if "lora_down" in suffix else 1.0)
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    read = [generator.lora_patches([save(sd, tmp_path / f"{n}.safetensors")])["transformer"].targets()
            for n, sd in (("native", native), ("kohya", kohya), ("diffusers", diffusers_keys))]
    assert set(read[0]) == set(read[1]) == set(read[2]) and len(read[0]) == 2 * len(NATIVE)
    for name in read[0]:
        products = [t.scale * (t.up @ t.down) for t in (r[name][0][0] for r in read)]
        assert torch.allclose(products[0], products[1]) and torch.allclose(products[0], products[2], atol=1e-7)


def test_a_strength_change_reads_no_file_and_a_changed_file_is_read_again(tiny_t2v, tmp_path):
    path = save(make_lora(tiny_transformer(tiny_t2v), "native", rank=2), tmp_path / "l.safetensors")
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    first = generator.lora_patches([(path, 1.0)])["transformer"]
    second = generator.lora_patches([(path, 0.25)])["transformer"]
    assert second.entries[0][0] is first.entries[0][0] and second != first  # same file object, new strength
    save(make_lora(tiny_transformer(tiny_t2v), "native", rank=3), path)  # rewritten: another size
    third = generator.lora_patches([(path, 0.25)])["transformer"]
    assert third.entries[0][0] is not first.entries[0][0]
