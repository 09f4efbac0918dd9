"""The offload manager: every option combination gives the resident frames, placements are reported and
released, prompts are cached, and running out of memory gives guidance (or, in auto mode, the next option)."""

import gc
import itertools
import logging

import numpy as np
import pytest

from video_offload import VideoGenerator
from video_offload.offload import OffloadManager, OffloadOutOfMemoryError
from video_offload.offload.placement import Placement
from video_offload.offload.wan_steps import encode_prompts

SIZES = dict(height=64, width=96, num_frames=9, num_inference_steps=2)
OPTIONS = ("dit_layerwise_offload", "text_encoder_cpu_offload", "image_encoder_cpu_offload", "vae_cpu_offload",
           "dit_cpu_offload", "pin_cpu_memory")


def generate(path, manager=None, image=None, **options):
    generator = VideoGenerator.from_pretrained(path, precision="float32", manager=manager, **options)
    return generator.generate_video("a raccoon", negative_prompt="blurry", seed=4, image=image, save_video=False, **SIZES)


@pytest.fixture(scope="module")
def resident_t2v(tiny_t2v):
    off = {name: False for name in OPTIONS}
    return generate(tiny_t2v, **off)


@pytest.mark.parametrize("values", list(itertools.product([False, True], repeat=len(OPTIONS))),
                         ids=lambda v: "".join("1" if x else "0" for x in v))
def test_every_single_gpu_combination_gives_the_resident_frames(tiny_t2v, resident_t2v, values):
    frames = generate(tiny_t2v, **dict(zip(OPTIONS, values)))
    assert np.array_equal(frames, resident_t2v)


@pytest.mark.parametrize("values", list(itertools.product([False, True], repeat=3)))
def test_image_to_video_combinations_give_the_resident_frames(tiny_i2v, start_image, values):
    names = ("dit_layerwise_offload", "image_encoder_cpu_offload", "vae_cpu_offload")
    resident = generate(tiny_i2v, image=start_image, **{n: False for n in names})
    assert np.array_equal(generate(tiny_i2v, image=start_image, **dict(zip(names, values))), resident)


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
    assert resources.dit_offloader is not None
    del generator
    gc.collect()
    assert manager.models() == []
    assert resources.dit_offloader is None and not resources.placers


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
    from video_offload.offload.tiny_model import TinyWanSpec, build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("deep") / "tiny-wan-8-blocks", spec=TinyWanSpec(num_layers=8))


NOTHING_OFFLOADED = dict(dit_layerwise_offload=False, vae_cpu_offload=False, image_encoder_cpu_offload=False,
                         text_encoder_cpu_offload=False)


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
    with pytest.raises(OffloadOutOfMemoryError, match="Every offload option is already on"):
        generate(tiny_t2v, manager=manager)


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
