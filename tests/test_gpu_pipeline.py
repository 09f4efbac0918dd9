"""The whole pipeline on a CUDA device: offloaded equals resident bit for bit, memory comes back, a real
out-of-memory gives the guided error and the next run works, and twenty runs do not grow memory.

Marked ``gpu``: skipped without CUDA, run on the device machine (see docs/benchmarks.md for the last run).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from helpers import StopAt, rss_bytes
from video_offload import VideoGenerator
from video_offload.offload import OffloadManager, OffloadOutOfMemoryError
from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan

pytestmark = pytest.mark.gpu

SIZES = dict(height=128, width=192, num_frames=17, num_inference_steps=3)
NOTHING_OFFLOADED = dict(
    dit_layerwise_offload=False, vae_cpu_offload=False, image_encoder_cpu_offload=False, text_encoder_cpu_offload=False
)


@pytest.fixture(scope="module")
def wide_t2v(tmp_path_factory):
    """A model whose DiT (8 blocks of dim 512, about 130 MB in float32) is large enough to run out of a capped GPU."""
    spec = TinyWanSpec(num_layers=8, num_attention_heads=8, attention_head_dim=64, ffn_dim=2048)
    return build_tiny_wan(tmp_path_factory.mktemp("gpu") / "wide-wan", spec=spec)


def allocated() -> int:
    torch.cuda.synchronize()
    gc.collect()
    return torch.cuda.memory_allocated()


def test_layerwise_frames_equal_resident_frames_bit_for_bit(wide_t2v):
    for precision in ("float32", "bfloat16"):
        frames = {}
        for layerwise in (False, True):
            generator = VideoGenerator.from_pretrained(
                wide_t2v, precision=precision, **{**NOTHING_OFFLOADED, "dit_layerwise_offload": layerwise}
            )
            frames[layerwise] = generator.generate_video("a cat", seed=3, save_video=False, **SIZES)
            generator.shutdown()
        assert np.array_equal(frames[True], frames[False]), precision


def test_device_memory_comes_back_after_release(wide_t2v):
    warm_up = VideoGenerator.from_pretrained(wide_t2v, precision="float32", **NOTHING_OFFLOADED)
    warm_up.generate_video("a cat", save_video=False, **SIZES)  # cuBLAS workspaces etc. are allocated once
    warm_up.shutdown()
    del warm_up
    baseline = allocated()
    for options in (NOTHING_OFFLOADED, {}):
        generator = VideoGenerator.from_pretrained(wide_t2v, precision="float32", **options)
        generator.generate_video("a cat", save_video=False, **SIZES)
        assert allocated() > baseline or options == {}
        generator.shutdown()
        assert allocated() == baseline, options
        del generator
    assert allocated() == baseline


def test_make_room_is_asked_before_large_placements(wide_t2v):
    asked = []
    manager = OffloadManager(make_room=lambda nbytes, device: asked.append((nbytes, device.type)))
    generator = VideoGenerator.from_pretrained(wide_t2v, precision="float32", manager=manager, **NOTHING_OFFLOADED)
    generator.generate_video("a cat", save_video=False, **SIZES)
    dit_bytes = sum(t.numel() * t.element_size() for t in generator.model.components["transformer"].parameters())
    assert any(n >= dit_bytes and kind == "cuda" for n, kind in asked), asked


def test_real_out_of_memory_gives_guidance_and_the_next_run_works(wide_t2v):
    allocated()
    torch.cuda.empty_cache()
    # Allow the text encoder and VAE but not the whole DiT (137 MB) beside them; layerwise streaming (about 45 MB)
    # fits. The cap counts what the allocator has reserved, so start from that.
    cap = torch.cuda.memory_reserved() + 110 * 2**20
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        manager = OffloadManager()
        with pytest.raises(OffloadOutOfMemoryError) as info:
            VideoGenerator.from_pretrained(wide_t2v, precision="float32", manager=manager, **NOTHING_OFFLOADED
                                           ).generate_video("a cat", save_video=False, **SIZES)
        message = str(info.value)
        assert "Out of memory during" in message and "GiB free of" in message
        assert "Fix: enable dit_layerwise_offload" in message
        frames = VideoGenerator.from_pretrained(
            wide_t2v, precision="float32", manager=manager, **{**NOTHING_OFFLOADED, "dit_layerwise_offload": True}
        ).generate_video("a cat", save_video=False, **SIZES)
        assert frames.shape == (17, 128, 192, 3)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_soak_twenty_layerwise_runs_and_interrupted_runs_keep_vram_and_rss_flat(wide_t2v):
    generator = VideoGenerator.from_pretrained(wide_t2v, precision="bfloat16")
    vram, host = [], []
    for i in range(20):
        generator.generate_video(f"a cat {i}", seed=i, save_video=False, **SIZES)
        vram.append(allocated())
        host.append(rss_bytes())
    assert vram[19] <= vram[1] * 1.02, vram
    assert host[19] <= host[1] * 1.02, host
    for i in range(5):
        with pytest.raises(KeyboardInterrupt):
            generator.generate_video(f"stopped {i}", seed=i, save_video=False, observer=StopAt(1 + i % 2), **SIZES)
    generator.generate_video("after the interrupts", save_video=False, **SIZES)
    after_vram, after_rss = allocated(), rss_bytes()
    assert after_vram <= vram[1] * 1.02 and after_rss <= host[1] * 1.02, (after_vram, after_rss)
    print({"vram_run2": vram[1], "vram_run20": vram[19], "vram_after_interrupts": after_vram,
           "rss_run2": host[1], "rss_run20": host[19], "rss_after_interrupts": after_rss})
