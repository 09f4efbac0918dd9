"""The host-RAM budget: the pack never page-locks more than ``max_pinned_memory_gb`` (by default 45% of RAM), what
does not fit stays pageable and still streams, and the output does not change.

Page-locking needs a CUDA driver; on a CPU machine the registration is simulated (the pack's one registration
function is replaced by a recorder), so the decisions - how much, which blocks - are what is tested here; the GPU
test at the end does it for real."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from video_offload import VideoGenerator
from video_offload.offload import ConfigError, OffloadConfig, OffloadManager
from video_offload.offload.core import host_memory
from video_offload.offload.core.layerwise import LayerwiseOffloader
from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan

SIZES = dict(height=64, width=64, num_frames=5, num_inference_steps=2, seed=3, save_video=False)


class Registrations:
    """Stands in for cudaHostRegister/Unregister: records what is page-locked now and the most ever at once."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.peak = 0

    def register(self, buffer: torch.Tensor) -> bool:
        self.live[buffer.data_ptr()] = buffer.numel()
        self.peak = max(self.peak, self.total)
        return True

    def unregister(self, buffer: torch.Tensor) -> None:
        assert self.live.pop(buffer.data_ptr(), buffer.numel()) == buffer.numel()

    @property
    def total(self) -> int:
        return sum(self.live.values())


@pytest.fixture
def registrations(monkeypatch):
    recorder = Registrations()
    monkeypatch.setattr(host_memory, "register_host_memory", recorder.register)
    monkeypatch.setattr(host_memory, "unregister_host_memory", recorder.unregister)
    return recorder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("budget") / "tiny", seed=2, spec=TinyWanSpec(num_layers=6))


def test_the_default_is_45_percent_of_ram():
    assert OffloadConfig().max_pinned_memory_gb == "auto"
    assert host_memory.PIN_SHARE_OF_RAM == 0.45
    assert host_memory.default_pin_limit() == int(host_memory.physical_memory_bytes() * 0.45) > 0
    # On a 32 GB machine that is 14.4 GB: the 14B fp8 DiT's blocks (~13.6 GiB) fit, and 17.6 GB stay for the OS,
    # ComfyUI and everything the pack keeps pageable.


def test_the_option_is_checked_like_the_others():
    with pytest.raises(ConfigError, match=r"max_pinned_memory_gb=-1: must be from 0 to 4096"):
        OffloadConfig(max_pinned_memory_gb=-1)
    with pytest.raises(ConfigError, match=r"max_pinned_memory_gb='lots'"):
        OffloadConfig(max_pinned_memory_gb="lots")


@pytest.mark.parametrize("blocks_allowed", [0, 1, 2.5, 6, 99])
def test_the_offloader_pins_whole_blocks_up_to_its_budget(model_dir, registrations, blocks_allowed):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(model_dir / "transformer")
    reference = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False)
    block = reference.stats().block_bytes
    reference.close()
    model = WanTransformer3DModel.from_pretrained(model_dir / "transformer")
    budget = int(blocks_allowed * block)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=True, max_pinned_bytes=budget)
    stats = off.stats()
    assert stats.pinned_bytes == min(int(blocks_allowed), 6) * block <= budget
    assert registrations.total == stats.pinned_bytes
    off.close()
    assert registrations.total == 0


def manager_run(model_dir, budget_bytes, monkeypatch, **options):
    from video_offload.offload.core import manager as manager_module

    monkeypatch.setattr(manager_module, "default_pin_limit", lambda: budget_bytes)  # "auto" = this many bytes
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(model_dir, manager=manager, precision="float32",
                                               text_encoder_cpu_offload=False, **options)
    frames = generator.generate_video("a lion", **SIZES)
    return generator, frames


def test_everything_the_manager_pins_stays_under_the_budget_and_the_output_does_not_change(
    model_dir, registrations, monkeypatch
):
    unlimited, expected = manager_run(model_dir, 2**40, monkeypatch)
    everything = unlimited.manager.pinned_bytes()
    assert everything > 0 and registrations.peak == everything
    dit_block = unlimited.manager.offloader(unlimited.model, "transformer").stats().block_bytes
    unlimited.shutdown()
    assert registrations.total == 0
    registrations.peak = 0
    # A budget of 2.5 DiT blocks: two blocks pinned, the rest of the DiT, the text encoder and the VAE pageable.
    budget = int(2.5 * dit_block)
    limited, frames = manager_run(model_dir, budget, monkeypatch)
    assert np.array_equal(frames, expected)
    stats = limited.manager.offloader(limited.model, "transformer").stats()
    assert stats.pinned_bytes == 2 * dit_block
    assert 0 < limited.manager.pinned_bytes() <= budget and registrations.peak <= budget
    limited.shutdown()


def test_zero_pins_nothing_and_still_streams(model_dir, registrations, monkeypatch):
    generator, frames = manager_run(model_dir, 2**40, monkeypatch, max_pinned_memory_gb=0)
    assert registrations.peak == 0 and generator.manager.pinned_bytes() == 0
    assert generator.manager.offloader(generator.model, "transformer").stats().streamed_blocks == 6
    generator.shutdown()


def test_changing_the_budget_rebuilds_the_offloader(model_dir, registrations, monkeypatch):
    generator, _ = manager_run(model_dir, 2**40, monkeypatch)
    first = generator.manager.offloader(generator.model, "transformer")
    generator.config = OffloadConfig(max_pinned_memory_gb=0, text_encoder_cpu_offload=False)
    generator.generate_video("a lion", **SIZES)
    second = generator.manager.offloader(generator.model, "transformer")
    assert second is not first and second.stats().pinned_bytes == 0 and first.closed
    generator.shutdown()


@pytest.mark.gpu
def test_gpu_budgeted_streaming_is_bit_exact_and_pins_within_the_budget(model_dir):
    """Real page-locking: half the blocks pinned, the other half pageable; same output as everything pinned."""
    from diffusers import WanTransformer3DModel

    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, 3, 8, 8, generator=gen).cuda(), torch.tensor([500.0]).cuda(),
              torch.randn(1, 7, 32, generator=gen).cuda())
    outputs, pinned = [], []
    for fraction in (1.0, 0.5):
        model = WanTransformer3DModel.from_pretrained(model_dir / "transformer")
        probe = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False)
        block = probe.stats().block_bytes
        probe.close()
        model = WanTransformer3DModel.from_pretrained(model_dir / "transformer")
        off = LayerwiseOffloader(model, model.blocks, "cuda", pin_cpu_memory=True,
                                 max_pinned_bytes=int(fraction * 6 * block))
        with torch.inference_mode():
            outputs.append(model(*inputs, return_dict=False)[0].cpu())
        pinned.append(off.stats().pinned_bytes)
        off.close()
    assert pinned == [6 * block, 3 * block]
    assert torch.equal(outputs[0], outputs[1])
