"""The offload manager: each distinct placement path gives the resident frames, each component runs where its
option says, placements are reported and released, prompts are cached, and running out of memory gives guidance
(or, in auto mode, the next option)."""

import gc
import logging

import numpy as np
import pytest

from video_offload import VideoGenerator
from video_offload.offload import OffloadManager, OffloadOutOfMemoryError
from video_offload.offload.core.placement import Placement
from video_offload.offload.pipeline.stages import encode_prompts

SIZES = dict(height=64, width=96, num_frames=9, num_inference_steps=2)
NOTHING_OFFLOADED = dict(dit_layerwise_offload=False, vae_cpu_offload=False, image_encoder_cpu_offload=False,
                         text_encoder_cpu_offload=False)


def generate(path, manager=None, image=None, **options):
    generator = VideoGenerator.from_pretrained(path, precision="float32", manager=manager, **options)
    return generator.generate_video("a raccoon", negative_prompt="blurry", seed=4, image=image, save_video=False, **SIZES)


@pytest.fixture(scope="module")
def resident_t2v(tiny_t2v):
    return generate(tiny_t2v, **NOTHING_OFFLOADED)


# One case per distinct code path. On one device the DiT is streamed (with or without resident blocks and deeper
# prefetch) or resident; the text encoder computes on the CPU or is placed on the device; the VAE is copied in per
# use or kept; dit_cpu_offload has no effect without FSDP. pin_cpu_memory changes nothing without CUDA (the GPU
# tests cover it).
PATHS = {
    "layerwise": dict(NOTHING_OFFLOADED, dit_layerwise_offload=True),
    "layerwise, 1 resident block, prefetch 2": dict(NOTHING_OFFLOADED, dit_layerwise_offload=True, resident_blocks=1,
                                                    prefetch_depth=2),
    "layerwise, auto residency": dict(NOTHING_OFFLOADED, dit_layerwise_offload=True, resident_blocks="auto"),
    "vae copied in per use": dict(NOTHING_OFFLOADED, vae_cpu_offload=True),
    "text encoder on the CPU": dict(NOTHING_OFFLOADED, text_encoder_cpu_offload=True),
    "dit_cpu_offload without FSDP": dict(NOTHING_OFFLOADED, dit_cpu_offload=True),
    "the seed's defaults": {},
}


@pytest.mark.parametrize("options", list(PATHS.values()), ids=list(PATHS))
def test_each_placement_path_gives_the_resident_frames(tiny_t2v, resident_t2v, options):
    assert np.array_equal(generate(tiny_t2v, **options), resident_t2v)


@pytest.mark.parametrize("layerwise", [False, True], ids=["resident", "layerwise"])
def test_image_to_video_paths_give_the_resident_frames(tiny_i2v, start_image, layerwise):
    names = ("dit_layerwise_offload", "image_encoder_cpu_offload", "vae_cpu_offload")
    resident = generate(tiny_i2v, image=start_image, **{n: False for n in names})
    offloaded = dict(dit_layerwise_offload=layerwise, image_encoder_cpu_offload=True, vae_cpu_offload=True)
    assert np.array_equal(generate(tiny_i2v, image=start_image, **offloaded), resident)


def test_dit_cpu_offload_without_fsdp_says_it_has_no_effect(tiny_t2v, caplog):
    caplog.set_level(logging.INFO, logger="video_offload")
    generate(tiny_t2v, manager=OffloadManager("cpu"), dit_cpu_offload=True)
    assert "dit_cpu_offload=True has no effect without use_fsdp_inference" in caplog.text


def _where_each_encoder_runs(path, image, **options):
    """Run a generation; for each encoder and the VAE, record where its weights were while its forward ran: the
    manager's device copy (on a CPU machine a separate buffer, as a GPU copy would be) or the host copy."""
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(path, precision="float32", manager=manager, **options)
    model = generator.model
    seen: dict[str, set] = {}

    def watch(name, component, submodule):
        def record(*_):
            placer = model.resources.placers.get(name)
            on_device_copy = placer is not None and placer.holds_device_copy(next(submodule.parameters()))
            seen.setdefault(name, set()).add("device copy" if on_device_copy else "host copy")

        return submodule.register_forward_pre_hook(record)

    text_encoder, image_encoder, vae = (manager.component(model, n) for n in ("text_encoder", "image_encoder", "vae"))
    handles = [
        watch("text_encoder", text_encoder, text_encoder),
        watch("image_encoder", image_encoder, image_encoder),
        watch("vae", vae, vae.encoder),
        watch("vae", vae, vae.decoder),
    ]
    try:
        generator.generate_video("a raccoon", negative_prompt="blurry", image=image, save_video=False, **SIZES)
    finally:
        for handle in handles:
            handle.remove()
    kept = {name for name, placer in model.resources.placers.items() if placer.device_buffer is not None}
    return seen, kept, manager


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "not offloaded"])
def test_each_encoder_runs_where_its_option_says(tiny_i2v, start_image, offload):
    options = dict(text_encoder_cpu_offload=offload, image_encoder_cpu_offload=offload, vae_cpu_offload=offload)
    seen, kept, manager = _where_each_encoder_runs(tiny_i2v, start_image, **options)
    # text_encoder_cpu_offload: weights *and* compute on the CPU, never a device copy (FastVideo's meaning).
    assert seen["text_encoder"] == ({"host copy"} if offload else {"device copy"})
    # The image encoder and the VAE run from a device copy either way; with offload the copy is dropped after use.
    assert seen["image_encoder"] == {"device copy"} and seen["vae"] == {"device copy"}
    assert kept == (set() if offload else {"text_encoder", "image_encoder", "vae"})
    used = {(r.component, r.placement, r.device) for r in manager.history}
    text_place = (Placement.HOST_PAGEABLE, "cpu") if offload else (Placement.GPU, "cpu")
    assert ("text_encoder", *text_place) in used


def test_report_and_release(tiny_t2v):
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(
        tiny_t2v, precision="float32", manager=manager, dit_layerwise_offload=False, vae_cpu_offload=True,
        text_encoder_cpu_offload=False,
    )
    generator.generate_video("a cat", save_video=False, **SIZES)
    placements = {r.component: r.placement for r in generator.report()}
    assert placements["transformer"] == Placement.GPU  # "device" copy; the device is the CPU here
    assert placements["text_encoder"] == Placement.GPU  # kept: text_encoder_cpu_offload is off
    assert placements["vae"] == Placement.HOST_PAGEABLE  # copied in for the decode, dropped after
    assert manager.device_bytes() > 0
    generator.shutdown()
    assert manager.device_bytes() == 0
    assert all(r.placement != Placement.GPU for r in generator.report())


def test_dropping_the_last_reference_frees_the_model(tiny_t2v):
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32", manager=manager)
    generator.generate_video("a cat", save_video=False, **SIZES)
    resources = generator.model.resources
    assert resources.offloaders
    del generator
    gc.collect()
    assert manager.models() == []
    assert not resources.offloaders and not resources.placers


def test_same_prompt_is_not_encoded_twice(tiny_t2v):
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32", manager=manager)
    generator.generate_video("a cat", negative_prompt="blurry", save_video=False, **SIZES)
    calls = []
    encoder = generator.model.components["text_encoder"]
    handle = encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        generator.generate_video("a cat", negative_prompt="blurry", seed=9, save_video=False, **SIZES)
        assert calls == []
        generator.generate_video("a dog", negative_prompt="blurry", save_video=False, **SIZES)
        assert len(calls) == 1  # only the new prompt
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def deep_t2v(tmp_path_factory):
    """Eight DiT blocks, so streaming two at a time needs much less device memory than keeping all eight."""
    from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("deep") / "tiny-wan-8-blocks", spec=TinyWanSpec(num_layers=8))


@pytest.fixture(scope="module")
def layerwise_budget(deep_t2v):
    """Device bytes a run needs with only the DiT streamed: a budget that fits layerwise but not resident."""
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(
        deep_t2v, precision="float32", manager=manager, **{**NOTHING_OFFLOADED, "dit_layerwise_offload": True}
    )
    generator.generate_video("a raccoon", save_video=False, **SIZES)
    return manager.device_bytes()


def test_out_of_memory_names_stage_memory_and_next_option_then_next_run_works(deep_t2v, layerwise_budget):
    manager = OffloadManager("cpu", memory_budget=layerwise_budget)
    with pytest.raises(OffloadOutOfMemoryError) as info:
        generate(deep_t2v, manager=manager, **NOTHING_OFFLOADED)
    message = str(info.value)
    assert "Out of memory during DiT sampling" in message
    assert f"free of {layerwise_budget / 2**10:.2f} KiB" in message
    assert "Fix: enable dit_layerwise_offload" in message
    assert manager.device_bytes() <= layerwise_budget
    # The process keeps working: the next workflow, with the advised option on, runs.
    frames = generate(deep_t2v, manager=manager, **{**NOTHING_OFFLOADED, "dit_layerwise_offload": True})
    assert frames.shape == (9, 64, 96, 3)


def test_oom_advice_follows_the_recommended_order(tiny_t2v):
    manager = OffloadManager("cpu", memory_budget=1)
    with pytest.raises(OffloadOutOfMemoryError, match="Fix: enable image_encoder_cpu_offload and vae_cpu_offload"):
        generate(tiny_t2v, manager=manager, dit_layerwise_offload=True, vae_cpu_offload=False,
                 image_encoder_cpu_offload=False, text_encoder_cpu_offload=True)
    with pytest.raises(OffloadOutOfMemoryError, match="Fix: enable vae_tiling=on and dit_activation_chunking=on"):
        generate(tiny_t2v, manager=manager)
    with pytest.raises(OffloadOutOfMemoryError, match="Every offload option is already on"):
        generate(tiny_t2v, manager=manager, vae_tiling="on", dit_activation_chunking="on")


def test_auto_offload_walks_the_order_and_remembers(deep_t2v, layerwise_budget, caplog):
    reference = generate(deep_t2v, **NOTHING_OFFLOADED)
    manager = OffloadManager("cpu", memory_budget=layerwise_budget)
    caplog.set_level(logging.INFO, logger="video_offload")
    generator = VideoGenerator.from_pretrained(deep_t2v, precision="float32", manager=manager, auto_offload=True)
    frames = generator.generate_video("a raccoon", negative_prompt="blurry", seed=4, save_video=False, **SIZES)
    assert np.array_equal(frames, reference)
    assert "auto offload: out of memory during DiT sampling; now using dit_layerwise_offload" in caplog.text
    assert generator.model.auto_level >= 1
    caplog.clear()
    generator.generate_video("a raccoon", seed=4, save_video=False, **SIZES)
    assert "auto offload: out of memory" not in caplog.text


def test_text_encoder_on_the_device_is_released_when_memory_does_not_allow_keeping_it(tiny_t2v):
    roomy = OffloadManager("cpu")
    tight = OffloadManager("cpu", memory_budget=200_000)  # the text encoder (~150 kB) is over half of it
    placements = {}
    for name, manager in (("roomy", roomy), ("tight", tight)):
        generator = VideoGenerator.from_pretrained(
            tiny_t2v, precision="float32", manager=manager, text_encoder_cpu_offload=False
        )
        encode_prompts(manager, generator.model, generator.config, "a cat")
        placements[name] = {r.component: r.placement for r in generator.report()}["text_encoder"]
    assert placements == {"roomy": Placement.GPU, "tight": Placement.HOST_PAGEABLE}


class CompactionCountingManager(OffloadManager):
    """A manager that counts its compactions (on a CPU one is a no-op, so the count is what can be checked)."""

    compactions = 0

    def compact_device_memory(self) -> None:
        self.compactions += 1
        super().compact_device_memory()


@pytest.mark.parametrize("vae_tiling, expected", [("on", 1), ("off", 0)])
def test_a_planned_vae_pass_hands_the_allocators_cache_back_first(tiny_t2v, vae_tiling, expected):
    """The decode compacts device memory only when its tiling is planned from free memory (vae_tiling not off):
    once per decode, not per tile, and never for diffusers' untiled decode."""
    manager = CompactionCountingManager("cpu")
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32", manager=manager, vae_tiling=vae_tiling,
                                               **NOTHING_OFFLOADED)
    generator.generate_video("a cat", save_video=False, **SIZES)
    assert manager.compactions == expected


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA; run on the device machine")
def test_gpu_compacting_hands_the_allocators_cache_back_before_a_planned_pass():
    """What the DiT stage left cached (freed but reserved) goes back to the device, so a tiled VAE pass planned
    from free memory finds it usable instead of failing and retrying under a card's limit."""
    import torch

    manager = OffloadManager("cuda")
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    del block
    torch.cuda.synchronize()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert cached >= 512 * 2**20
    manager.compact_device_memory()
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < cached - 256 * 2**20
