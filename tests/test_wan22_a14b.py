"""Wan2.2 A14B, text-to-video and image-to-video: two experts, the high-noise one until the boundary timestep and the
low-noise one after, step for step as diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` with ``transformer_2``
and ``boundary_ratio`` run them - resident and streamed, from Diffusers folders and from Comfy-Org single files -
with both experts streaming through one set of slots and the next expert's first blocks copied in during the last
step of the current one."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from single_file_helpers import generator_for

from video_offload import VideoGenerator
from video_offload.offload import ConfigError, ModelLoadError, OffloadManager
from video_offload.offload.families import open_files
from video_offload.offload.families.wan.tiny import SINGLE_FILE_TINY, TinyWanSpec
from video_offload.offload.families.wan.tiny_a14b import build_tiny_wan22_a14b, comfy_org_name, export_a14b_files

PROMPT, NEGATIVE = "a cat in a field", "blurred"
SPEC = TinyWanSpec(num_layers=3)
# 4 UniPC steps: T2V at shift 3 gives timesteps [999, 900, 750, 500] (boundary 875: 2 high, 2 low); I2V at shift 5
# gives [999, 937, 833, 625] (boundary 900: 2 high, 2 low).
SIZES = {
    "t2v": dict(height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0,
                flow_shift=3.0, seed=3),
    "i2v": dict(height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=3.5, flow_shift=5.0, seed=3),
}
HIGH_STEPS = 2


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    root = tmp_path_factory.mktemp("a14b")
    return {kind: build_tiny_wan22_a14b(root / f"tiny-wan2.2-{kind}-a14b", image_to_video=kind == "i2v", seed=2, spec=SPEC)
            for kind in ("t2v", "i2v")}


@contextlib.contextmanager
def dit_calls(monkeypatch):
    """Every ``WanTransformer3DModel`` forward as ``(module, timestep)``, in order."""
    calls = []
    forward = WanTransformer3DModel.forward

    def spy(self, *args, **kwargs):
        calls.append((self, int(kwargs["timestep"].flatten()[0])))
        return forward(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(WanTransformer3DModel, "forward", spy)
        yield calls


def diffusers_run(folder, kind, image, monkeypatch, boundary_ratio=None, **sizes):
    """diffusers' pipeline on ``folder``: frames, and the (expert, timestep) of every DiT call."""
    sizes = dict(sizes)
    shift, seed = sizes.pop("flow_shift"), sizes.pop("seed")
    sizes.pop("boundary_ratio", None)
    cls = WanImageToVideoPipeline if kind == "i2v" else WanPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
    if boundary_ratio is not None:
        pipe.register_to_config(boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    names = {id(pipe.transformer): "transformer", id(pipe.transformer_2): "transformer_2"}
    args = (image, PROMPT) if kind == "i2v" else (PROMPT,)
    with dit_calls(monkeypatch) as calls:
        frames = pipe(*args, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np", **sizes).frames[0]
    return frames, [(names[id(m)], t) for m, t in calls]


def dit_modules(generator: VideoGenerator) -> dict[int, str]:
    model = generator.model
    found = {}
    for name in model.dit_names:
        offloader = generator.manager.offloader(model, name)
        module = offloader.model if offloader is not None else model.components[name]
        found[id(module)] = name
    return found


def our_run(generator, kind, image, monkeypatch, observer=None, **sizes):
    with dit_calls(monkeypatch) as calls:
        frames = generator.generate_video(PROMPT, NEGATIVE, image=image if kind == "i2v" else None, save_video=False,
                                          observer=observer, **sizes)
    names = dit_modules(generator)
    return frames, [(names[id(m)], t) for m, t in calls]


# ------------------------------------------------------------------------------------------------------ folders


def test_a14b_folders_are_read_as_two_expert_models(a14b, tiny_t2v):
    t2v, i2v = generator_for(a14b["t2v"]), generator_for(a14b["i2v"])
    assert (t2v.model.spec.name, t2v.model.dit_names) == ("wan2.2-a14b-t2v", ("transformer", "transformer_2"))
    assert (i2v.model.spec.name, i2v.model.dit_names) == ("wan2.2-a14b-i2v", ("transformer", "transformer_2"))
    assert i2v.model.spec.image_to_video
    assert not any(c.name == "image_encoder" for c in i2v.model.spec.components)  # no CLIP in Wan2.2 I2V
    assert generator_for(tiny_t2v).model.spec.name == "wan2.1-t2v"  # a Wan2.1 folder stays Wan2.1


@pytest.mark.parametrize("layerwise", [False, True], ids=["resident", "layerwise"])
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_frames_equal_diffusers_with_both_experts(a14b, kind, layerwise, start_image, monkeypatch):
    expected, expected_calls = diffusers_run(a14b[kind], kind, start_image, monkeypatch, **SIZES[kind])
    generator = generator_for(a14b[kind], dit_layerwise_offload=layerwise)
    got, calls = our_run(generator, kind, start_image, monkeypatch, **SIZES[kind])
    assert np.abs(got - expected).max() <= 1e-4
    assert calls == expected_calls  # the same expert at the same timestep, call for call
    per_expert = [name for name, _ in calls]
    assert per_expert == ["transformer"] * 2 * HIGH_STEPS + ["transformer_2"] * 2 * (4 - HIGH_STEPS)  # CFG: 2 a step


def test_streamed_experts_equal_resident_bit_for_bit(a14b, monkeypatch):
    resident, _ = our_run(generator_for(a14b["t2v"], dit_layerwise_offload=False), "t2v", None, monkeypatch, **SIZES["t2v"])
    streamed, _ = our_run(generator_for(a14b["t2v"], dit_layerwise_offload=True), "t2v", None, monkeypatch, **SIZES["t2v"])
    assert np.array_equal(streamed, resident)


def test_guidance_runs_by_guidance_scale_alone_as_in_diffusers(a14b, monkeypatch):
    """diffusers' quirk: with guidance_scale 1 no step runs the negative prompt, whatever guidance_scale_2 says."""
    sizes = dict(SIZES["t2v"], guidance_scale=1.0, guidance_scale_2=3.0)
    expected, expected_calls = diffusers_run(a14b["t2v"], "t2v", None, monkeypatch, **sizes)
    got, calls = our_run(generator_for(a14b["t2v"]), "t2v", None, monkeypatch, **sizes)
    assert len(calls) == 4 and calls == expected_calls  # one pass per step
    assert np.abs(got - expected).max() <= 1e-4


def test_guidance_scale_2_defaults_to_guidance_scale(a14b, monkeypatch):
    sizes = dict(SIZES["t2v"], guidance_scale_2=None)
    expected, _ = diffusers_run(a14b["t2v"], "t2v", None, monkeypatch, **sizes)
    got, _ = our_run(generator_for(a14b["t2v"]), "t2v", None, monkeypatch, **sizes)
    assert np.abs(got - expected).max() <= 1e-4


def test_boundary_ratio_can_be_set_per_video(a14b, monkeypatch):
    sizes = dict(SIZES["t2v"], boundary_ratio=0.7)  # [999, 900, 750] high, [500] low
    expected, expected_calls = diffusers_run(a14b["t2v"], "t2v", None, monkeypatch, **sizes)
    got, calls = our_run(generator_for(a14b["t2v"]), "t2v", None, monkeypatch, **sizes)
    assert calls == expected_calls and [n for n, _ in calls].count("transformer_2") == 2
    assert np.abs(got - expected).max() <= 1e-4


def test_two_expert_options_are_refused_for_a_one_dit_model(tiny_t2v):
    generator = generator_for(tiny_t2v)
    for name, value in (("guidance_scale_2", 3.0), ("boundary_ratio", 0.9)):
        with pytest.raises(ConfigError, match=rf"{name}={value}: applies to models with two experts .* Fix: leave "
                                              rf"{name} empty"):
            generator.generate_video(PROMPT, save_video=False, height=32, width=32, num_frames=5, num_inference_steps=1,
                                     **{name: value})
    with pytest.raises(ConfigError, match=r"boundary_ratio=1\.5: must be from 0\.0 to 1\.0"):
        generator.generate_video(PROMPT, save_video=False, boundary_ratio=1.5)


def test_experts_that_differ_in_shape_are_refused(a14b, tmp_path):
    import shutil

    folder = shutil.copytree(a14b["t2v"], tmp_path / "mixed")
    other = build_tiny_wan22_a14b(tmp_path / "other", image_to_video=True, spec=SPEC)
    shutil.rmtree(folder / "transformer_2")
    shutil.copytree(other / "transformer_2", folder / "transformer_2")
    with pytest.raises(ModelLoadError, match=r"the experts differ in in_channels \(transformer 16, transformer_2 36\)"):
        generator_for(folder)


# ------------------------------------------------------------------------------------------------------ one set of slots


class AtSteps:
    """Calls ``check(index)`` after each step."""

    def __init__(self, check):
        self.check = check

    def before_step(self, index, total):
        pass

    def after_step(self, index, total):
        self.check(index)


def test_both_experts_stream_through_one_set_of_slots_and_the_switch_is_prefetched(a14b):
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(a14b["t2v"], precision="float32", manager=manager,
                                               dit_layerwise_offload=True)
    model = generator.model
    seen = {}

    def check(index):
        high, low = manager.offloader(model, "transformer"), manager.offloader(model, "transformer_2")
        transfers = low.stats().transfers
        if index == HIGH_STEPS - 1:  # the last high-noise step just ended
            seen["queued"] = (high.queued_blocks(), low.queued_blocks())
            seen["same slots"] = high.slot_set is low.slot_set and high.slot_set is not None
            stats = high.stats(), low.stats()
            seen["device"] = (manager.device_bytes(), stats[0].slot_bytes + stats[0].non_block_bytes + stats[1].non_block_bytes)
            seen["slot bytes"] = (stats[0].slot_bytes, 2 * stats[0].device_block_bytes)  # prefetch depth 1: 2 slots
        if index == HIGH_STEPS:  # the first low-noise step: two forwards (CFG)
            seen["first low step transfers"] = transfers - seen["low transfers"]
        seen["low transfers"] = transfers

    generator.generate_video(PROMPT, NEGATIVE, save_video=False, observer=AtSteps(check), **SIZES["t2v"])
    # Both slots hold the low-noise expert's first blocks before its first step; the high one queued nothing more.
    assert seen["queued"] == ((), (0, 1))
    assert seen["same slots"]
    device, expected = seen["device"]
    assert device == expected  # the shared slots count once, beside each expert's weights outside the blocks
    assert seen["slot bytes"][0] == seen["slot bytes"][1]
    # Its first forward found blocks 0 and 1 in place: every block copied exactly once per forward in that step.
    assert seen["first low step transfers"] == 2 * SPEC.num_layers


def test_a_second_run_starts_with_the_high_noise_expert_again(a14b, monkeypatch):
    """After the low-noise expert's turn, the high-noise one takes the slots back (the queued copies of the other
    expert are dropped) and the frames are the same."""
    generator = generator_for(a14b["t2v"], dit_layerwise_offload=True)
    first, _ = our_run(generator, "t2v", None, monkeypatch, **SIZES["t2v"])
    second, calls = our_run(generator, "t2v", None, monkeypatch, **SIZES["t2v"])
    assert np.array_equal(first, second) and calls[0][0] == "transformer"


# ------------------------------------------------------------------------------------------------------ single files


@pytest.fixture(scope="module")
def a14b_files(tmp_path_factory, spiece_model):
    """Per kind: a tiny A14B folder shaped like the real one where files cannot say otherwise, and its Comfy-Org
    files in fp16 and fp8_scaled."""
    from video_offload.offload.families.wan.text import tokenizer_from_sentencepiece

    root = tmp_path_factory.mktemp("a14b_files")
    tokenizer = tokenizer_from_sentencepiece(spiece_model)
    spec = dataclasses.replace(SINGLE_FILE_TINY, num_layers=2)
    out = {}
    for kind in ("t2v", "i2v"):
        folder = build_tiny_wan22_a14b(root / f"folder-{kind}", image_to_video=kind == "i2v", seed=4, spec=spec,
                                       tokenizer=tokenizer)
        out[kind] = (folder, {layout: export_a14b_files(folder, root / f"{kind}-{layout}", layout,
                                                        spiece_model=spiece_model)
                              for layout in ("fp16", "fp8_scaled")})
    return out


@pytest.mark.parametrize("layerwise", [False, True], ids=["resident", "layerwise"])
@pytest.mark.parametrize("layout", ["fp16", "fp8_scaled"])
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_frames_from_comfy_org_files_equal_diffusers(a14b_files, kind, layout, layerwise, start_image, monkeypatch,
                                                     tmp_path):
    from single_file_helpers import reference_folder

    folder, files = a14b_files[kind]
    paths = files[layout]
    assert paths["dit"].name == comfy_org_name(kind == "i2v", "high", layout)
    # diffusers on a folder holding the numbers the files hold (ComfyUI's widening of fp16 / scaled fp8).
    reference = reference_folder(folder, {k: v for k, v in paths.items()}, tmp_path / "reference")
    sizes = dict(SIZES[kind], height=64, width=64)
    expected, expected_calls = diffusers_run(reference, kind, start_image, monkeypatch, **sizes)
    generator = generator_for(paths, dit_layerwise_offload=layerwise)
    assert generator.model.spec.name == f"wan2.2-a14b-{kind}"
    got, calls = our_run(generator, kind, start_image, monkeypatch, **sizes)
    assert np.abs(got - expected).max() <= 1e-4
    assert calls == expected_calls and {n for n, _ in calls} == {"transformer", "transformer_2"}
    if layerwise:  # host memory holds both experts as stored: fp8 blocks stay fp8 (1 byte per weight)
        for name in ("transformer", "transformer_2"):
            stats = generator.manager.offloader(generator.model, name).stats()
            assert stats.stored_narrow == (layout == "fp8_scaled")


def test_boundary_defaults_by_model_type_for_single_files(a14b_files):
    for kind, ratio in (("t2v", 0.875), ("i2v", 0.9)):
        generator = generator_for(a14b_files[kind][1]["fp16"])
        stages, source = generator.model.spec.stages, generator.model.source
        assert source.pipeline_config() == {} and stages.boundary_ratio(source, None) == ratio


def test_a_diffusers_a14b_folder_as_the_dit_gives_both_experts(a14b_files, start_image, monkeypatch):
    folder, _ = a14b_files["i2v"]
    mixed = {"dit": folder, "text_encoder": folder, "vae": folder}  # no dit_2: the folder's transformer_2
    generator = generator_for(mixed)
    assert generator.model.dit_names == ("transformer", "transformer_2")
    sizes = dict(SIZES["i2v"], height=64, width=64)
    got, _ = our_run(generator, "i2v", start_image, monkeypatch, **sizes)
    expected, _ = our_run(generator_for(folder), "i2v", start_image, monkeypatch, **sizes)
    assert np.array_equal(got, expected)


def test_single_file_misuse_is_refused_by_name(a14b_files):
    t2v, i2v = a14b_files["t2v"][1]["fp16"], a14b_files["i2v"][1]["fp16"]
    # One T2V expert alone looks exactly like a Wan2.1 T2V 14B file (ComfyUI cannot tell them apart either).
    single = {k: v for k, v in t2v.items() if k != "dit_2"}
    assert open_files(single)[1].name == "wan2.1-t2v"
    with pytest.raises(ModelLoadError, match=r"it is a Wan2\.2 I2V A14B expert .*low-noise expert as dit_2"):
        open_files({k: v for k, v in i2v.items() if k != "dit_2"})
    with pytest.raises(ModelLoadError, match=r"is not the low-noise expert of Wan2\.2 I2V A14B .*16 input channels"):
        open_files({**i2v, "dit_2": t2v["dit_2"]})
    with pytest.raises(ModelLoadError, match=r"dit_2=.* was given, but wan2\.1-t2v models have one DiT"):
        from video_offload.offload.families import spec_for_dit_file
        from video_offload.offload.families.wan import WAN21_T2V
        from video_offload.offload.weights.single_files import SingleFiles

        assert spec_for_dit_file(t2v["dit"]).name == "wan2.1-t2v"
        SingleFiles.open(WAN21_T2V, t2v)


# ------------------------------------------------------------------------------------------------------ FSDP


@pytest.mark.slow
def test_fsdp_shards_both_experts_and_equals_the_single_process(a14b, start_image):
    sizes = SIZES["i2v"]
    expected = generator_for(a14b["i2v"], dit_layerwise_offload=False).generate_video(
        PROMPT, NEGATIVE, image=start_image, save_video=False, **sizes)
    multi = VideoGenerator.from_pretrained(
        a14b["i2v"], num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=False,
        precision="float32", manager=OffloadManager("cpu"),
    )
    try:
        frames = multi.generate_video(PROMPT, NEGATIVE, image=start_image, save_video=False, **sizes)
        placements = {r.component: (r.placement.name, r.device) for r in multi.report()}
        group = multi.model.resources.worker_group
        sharded = [sorted(rank) for rank in (r for r in group.info["placement"])]
    finally:
        multi.shutdown()
    assert placements["transformer"] == placements["transformer_2"] == ("FSDP", "workers")
    assert sharded == [["transformer", "transformer_2"]] * 2
    assert np.abs(frames - expected).max() <= 1e-5


# ------------------------------------------------------------------------------------------------------ on a GPU


@pytest.fixture(scope="module")
def wide_a14b(tmp_path_factory):
    """Experts large enough that their slots show in device memory (8 blocks of dim 512 each, ~130 MB in float32)."""
    spec = TinyWanSpec(num_layers=8, num_attention_heads=8, attention_head_dim=64, ffn_dim=2048)
    return build_tiny_wan22_a14b(tmp_path_factory.mktemp("gpu-a14b") / "wide-a14b", spec=spec)


@pytest.mark.gpu
def test_on_cuda_the_experts_stream_bit_exact_through_one_set_of_slots(wide_a14b):
    sizes = dict(height=128, width=192, num_frames=17, num_inference_steps=4, guidance_scale=4.0, flow_shift=3.0)
    resident_options = dict(vae_cpu_offload=False, text_encoder_cpu_offload=False)
    for precision in ("float32", "bfloat16"):
        frames = {}
        for layerwise in (False, True):
            manager = OffloadManager("cuda")
            generator = VideoGenerator.from_pretrained(wide_a14b, precision=precision, manager=manager,
                                                       dit_layerwise_offload=layerwise, **resident_options)
            seen = {}

            def check(index, generator=generator, manager=manager, seen=seen):
                high = manager.offloader(generator.model, "transformer")
                low = manager.offloader(generator.model, "transformer_2")
                if high is None or index != HIGH_STEPS - 1:
                    return
                torch.cuda.synchronize()
                stats = high.stats(), low.stats()
                seen["queued"] = low.queued_blocks()
                seen["one slot set"] = high.slot_set is low.slot_set
                seen["dit device bytes"] = stats[0].slot_bytes + stats[0].non_block_bytes + stats[1].non_block_bytes
                seen["slot bytes"] = (stats[0].slot_bytes, 2 * stats[0].device_block_bytes)

            frames[layerwise] = generator.generate_video("a cat", "blurred", seed=3, save_video=False,
                                                         observer=AtSteps(check), **sizes)
            if layerwise:
                assert seen["queued"] == (0, 1) and seen["one slot set"]
                assert seen["slot bytes"][0] == seen["slot bytes"][1]  # two slots of one block: not two sets
            generator.shutdown()
        assert np.array_equal(frames[True], frames[False]), precision


# ------------------------------------------------------------------------------------------------------ nodes


def test_nodes_take_the_low_noise_expert_and_the_two_expert_sampling_options(a14b_files, tmp_path, monkeypatch):
    """Wan Model from Files with dit_2 (two Load Wan DiT nodes), Sample with cfg_2 and boundary_ratio, run as
    ComfyUI runs an API prompt: the LATENT equals diffusers' latents (in ComfyUI's raw VAE space)."""
    import shutil

    from comfy_executor import REPO_ROOT, execute, load_pack, make_folder_paths
    from single_file_helpers import reference_folder

    folder, files = a14b_files["t2v"]
    paths = files["fp16"]
    models = tmp_path / "models"
    for argument, sub in (("dit", "diffusion_models"), ("dit_2", "diffusion_models"), ("text_encoder", "text_encoders"),
                          ("vae", "vae")):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[argument], models / sub / paths[argument].name)
    pack = load_pack(REPO_ROOT, make_folder_paths(models / "diffusers", tmp_path / "output"), {})
    sample = dict(width=64, height=64, num_frames=9, steps=4, cfg=4.0, flow_shift=3.0, seed=3, cfg_2=2.0,
                  boundary_ratio=0.7)
    prompt = {
        "1": {"class_type": "VideoOffloadLoadDiT", "inputs": {"dit_name": paths["dit"].name}},
        "2": {"class_type": "VideoOffloadLoadDiT", "inputs": {"dit_name": paths["dit_2"].name}},
        "3": {"class_type": "VideoOffloadLoadTextEncoder", "inputs": {"text_encoder_name": paths["text_encoder"].name}},
        "4": {"class_type": "VideoOffloadLoadVAE", "inputs": {"vae_name": paths["vae"].name}},
        "5": {"class_type": "VideoOffloadWanModel", "inputs": {"dit": ["1", 0], "dit_2": ["2", 0], "text_encoder": ["3", 0],
                                                                "vae": ["4", 0], "precision": "float32",
                                                                "vae_precision": "float32"}},
        "6": {"class_type": "VideoOffloadEncodePrompt", "inputs": {"model": ["5", 0], "prompt": PROMPT,
                                                                    "negative_prompt": NEGATIVE}},
        "7": {"class_type": "VideoOffloadSample", "inputs": {"model": ["5", 0], "conditioning": ["6", 0], **sample}},
    }
    results = execute(prompt, pack.NODE_CLASS_MAPPINGS)
    handle = results["5"][0]
    assert handle.model.spec.name == "wan2.2-a14b-t2v"
    latent = results["7"][0]["samples"]

    reference = reference_folder(folder, dict(paths), tmp_path / "reference")
    pipe = WanPipeline.from_pretrained(reference, dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    pipe.register_to_config(boundary_ratio=0.7)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_frames=9, num_inference_steps=4,
                    guidance_scale=4.0, guidance_scale_2=2.0, generator=torch.Generator("cpu").manual_seed(3),
                    output_type="latent").frames
    from video_offload.offload.pipeline.stages import latent_space

    assert (latent - latent_space(handle.model).to_raw(expected)).abs().max() <= 1e-4


def test_the_command_line_takes_both_experts(a14b_files, tmp_path):
    from video_offload.offload.pipeline.cli import main

    paths = a14b_files["t2v"][1]["fp8_scaled"]
    out = tmp_path / "video.mp4"
    code = main(["generate", "--dit", str(paths["dit"]), "--dit-2", str(paths["dit_2"]), "--text-encoder",
                 str(paths["text_encoder"]), "--vae", str(paths["vae"]), "--height", "64", "--width", "64",
                 "--num-frames", "5", "--num-inference-steps", "2", "--guidance-scale-2", "2.5", "--boundary-ratio",
                 "0.8", "--precision", "float32", "--device", "cpu", "--output-path", str(out)])
    assert code == 0 and out.stat().st_size > 0


# ------------------------------------------------------------------------------------------------------ sampler


def test_the_euler_sampler_takes_first_order_steps_on_the_models_timesteps():
    """``sampler="euler"``: the folder's flow-matching UniPC scheduler at order 1 with no corrector takes exactly
    Euler's step ``x + (sigma_next - sigma) * v`` on the same timesteps as the model's own (ComfyUI's ``simple``
    schedule at the same shift: 4 steps at shift 5 are 1000, 937.5, 833.3, 625)."""
    from video_offload.offload.core.denoise import make_scheduler
    from video_offload.offload.families.wan.shapes import WAN_SCHEDULER

    def resolve(name):
        return UniPCMultistepScheduler

    euler = make_scheduler(resolve, "UniPCMultistepScheduler", dict(WAN_SCHEDULER), 5.0, "euler")
    own = make_scheduler(resolve, "UniPCMultistepScheduler", dict(WAN_SCHEDULER), 5.0, "model")
    euler.set_timesteps(4)
    own.set_timesteps(4)
    assert torch.equal(euler.timesteps, own.timesteps) and euler.timesteps.tolist() == [999, 937, 833, 625]
    torch.manual_seed(0)
    x = torch.randn(1, 16, 256)
    reference, second_order = x.clone(), x.clone()
    for i, t in enumerate(euler.timesteps):
        v = torch.randn(1, 16, 256)
        x = euler.step(v, t, x).prev_sample
        reference = reference + (euler.sigmas[i + 1] - euler.sigmas[i]) * v
        second_order = own.step(v, t, second_order).prev_sample
    assert torch.allclose(x, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(second_order, reference, atol=1e-3, rtol=0)  # the model's own is not Euler


def test_euler_sampler_frames_equal_diffusers_with_the_same_scheduler(a14b, start_image, monkeypatch):
    """The lightx2v 4-step recipe on A14B I2V (4 steps, cfg 1, shift 5, euler) equals diffusers' pipeline given the
    first-order scheduler, streamed; and differs from the model's own sampler."""
    sizes = dict(SIZES["i2v"], guidance_scale=1.0)
    pipe = WanImageToVideoPipeline.from_pretrained(a14b["i2v"], dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0, solver_order=1,
                                                         disable_corrector=list(range(1001)))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(start_image, PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(3),
                    output_type="np", **{k: v for k, v in sizes.items() if k not in ("flow_shift", "seed")}).frames[0]
    generator = generator_for(a14b["i2v"], dit_layerwise_offload=True)
    got, calls = our_run(generator, "i2v", start_image, monkeypatch, sampler="euler", **sizes)
    own, _ = our_run(generator, "i2v", start_image, monkeypatch, **sizes)
    assert np.abs(got - expected).max() <= 1e-4
    assert [name for name, _ in calls] == ["transformer"] * 2 + ["transformer_2"] * 2  # cfg 1: one forward a step
    assert np.abs(own - got).max() > 1e-3


def test_an_unknown_sampler_is_refused_by_name():
    from video_offload.offload.config import SamplingParams

    with pytest.raises(ConfigError, match="sampler.*'dpm'.*euler"):
        SamplingParams(sampler="dpm")
