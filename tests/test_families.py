"""A model family is a folder plus a spec: a toy family registered from this test (``toy_family.py``, its own DiT,
text encoder, VAE and latent geometry) runs through the manager, layerwise streaming, the FSDP worker group and
``VideoGenerator`` - and nothing in the pack's core, weights or distributed layers names it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import toy_family
from video_offload import VideoGenerator
from video_offload.offload import ConfigError, OffloadManager, families
from video_offload.offload.core.placement import Placement

SIZES = dict(height=32, width=48, num_frames=5, num_inference_steps=3)
RESIDENT = dict(dit_layerwise_offload=False, vae_cpu_offload=False, text_encoder_cpu_offload=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    families.register(toy_family.TOY_T2V)
    path = toy_family.build_toy_folder(tmp_path_factory.mktemp("toy") / "toy-model")
    yield path
    families.unregister(toy_family.TOY_T2V.name)


def generate(path, **options):
    generator = VideoGenerator.from_pretrained(path, precision="float32", manager=OffloadManager("cpu"), **options)
    try:
        return generator.generate_video("a toy", negative_prompt="blur", seed=5, save_video=False, **SIZES), generator
    finally:
        generator.shutdown()


@torch.no_grad()
def toy_reference(path) -> np.ndarray:
    """The toy family's own pipeline, written out by hand from its parts: what the pack must reproduce."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = toy_family.ToyTokenizer.from_pretrained(path / "tokenizer")
    encoder = toy_family.ToyTextEncoder.from_pretrained(path / "text_encoder").eval()
    dit = toy_family.ToyDiT.from_pretrained(path / "transformer").eval()
    vae = toy_family.ToyVAE.from_pretrained(path / "vae").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    cond, uncond = encoder(tokenizer("a toy")), encoder(tokenizer("blur"))
    latents = torch.randn(1, 8, 3, 8, 12, generator=torch.Generator().manual_seed(5))
    scheduler.set_timesteps(SIZES["num_inference_steps"])
    for t in scheduler.timesteps:
        timestep = t.expand(1)
        c, u = dit(latents, timestep, cond), dit(latents, timestep, uncond)
        latents = scheduler.step(u + 5.0 * (c - u), t, latents, return_dict=False)[0]
    video = vae.decode(latents * 2.0 + 0.1)  # the toy's normalisation: mean 0.1, std 2
    return (video[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()


def test_the_toy_family_runs_through_video_generator_in_its_own_geometry(toy):
    frames, generator = generate(toy, **RESIDENT)
    assert generator.model.spec is toy_family.TOY_T2V
    assert frames.shape == (5, 32, 48, 3)  # 3 latent frames x 2 in time, 8x12 latents x 4 in space
    assert np.abs(frames - toy_reference(toy)).max() <= 1e-5
    report = {r.component: r.placement for r in generator.report()}
    assert set(report) == {"text_encoder", "transformer", "vae"}  # placed by role; released by the shutdown
    assert Placement.GPU not in report.values()


def test_the_toy_family_streams_its_blocks_layer_by_layer_bit_for_bit(toy):
    resident, _ = generate(toy, **RESIDENT)
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(
        toy, precision="float32", manager=manager, **{**RESIDENT, "dit_layerwise_offload": True}
    )
    generator.generate_video("warm", save_video=False, **SIZES)  # builds the offloader from the files
    offloader = manager.offloader(generator.model, "transformer")
    assert offloader.blocks is generator.model.components["transformer"].layers  # found from _repeated_blocks
    where = set()
    handles = [block.register_forward_pre_hook(functools.partial(lambda i, *_: where.add(offloader.block_location(i)), i))
               for i, block in enumerate(offloader.blocks)]
    frames = generator.generate_video("a toy", negative_prompt="blur", seed=5, save_video=False, **SIZES)
    for handle in handles:
        handle.remove()
    assert where == {"slot"}
    assert np.array_equal(frames, resident)
    placements = {r.component: r.placement for r in generator.report()}
    assert placements["transformer"] == Placement.LAYERWISE and placements["vae"] == Placement.GPU
    generator.shutdown()


def test_the_toy_familys_geometry_is_checked_before_any_weight(toy):
    generator = VideoGenerator.from_pretrained(toy, precision="float32", manager=OffloadManager("cpu"))
    with pytest.raises(ConfigError, match=r"width=50: must be a multiple of 4\. Fix: use 48 or 52"):
        generator.generate_video("a toy", save_video=False, **{**SIZES, "width": 50})
    with pytest.raises(ConfigError, match=r"num_frames=4: must be of the form 2k\+1\. Fix: use 3 or 5"):
        generator.generate_video("a toy", save_video=False, **{**SIZES, "num_frames": 4})
    assert not generator.model.components  # nothing was loaded


@pytest.mark.slow
def test_the_toy_family_shards_over_a_worker_group(toy):
    expected, _ = generate(toy, **RESIDENT)
    generator = VideoGenerator.from_pretrained(
        toy, num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=True,
        precision="float32", manager=OffloadManager("cpu"),
    )
    try:
        frames = generator.generate_video("a toy", negative_prompt="blur", seed=5, save_video=False, **SIZES)
        group = generator.model.resources.worker_group
        assert group.info["plan"] == "FSDP over 2 ranks; CFG split in 2"
        assert [rank["transformer"]["offload_policy"] for rank in group.info["placement"]] == ["CPUOffloadPolicy"] * 2
        assert group.spec.family_module == "toy_family" and group.spec.family_file.endswith("toy_family.py")
        placements = {r.component: (r.placement, r.device) for r in generator.report()}
        assert placements["transformer"] == (Placement.FSDP, "workers")
    finally:
        generator.shutdown()
    assert np.abs(frames - expected).max() <= 1e-5
