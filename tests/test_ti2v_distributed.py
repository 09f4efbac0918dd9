"""TI2V-5B through the worker group on the CPU (gloo): FSDP with CFG parallel, and Ulysses sequence parallel, which
splits the per-token timesteps with the tokens, give the single process's result."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

SIZES = dict(height=64, width=64, num_frames=9, num_inference_steps=2)


@pytest.fixture(scope="module")
def tiny_ti2v(tmp_path_factory):
    from video_offload.offload.families.wan.tiny_ti2v import build_tiny_ti2v

    return build_tiny_ti2v(tmp_path_factory.mktemp("models") / "tiny-wan2.2-ti2v")


def test_image_to_video_through_a_two_rank_group_matches_single_process(tiny_ti2v, start_image):
    from video_offload import VideoGenerator

    single = VideoGenerator.from_pretrained(tiny_ti2v, precision="float32", dit_layerwise_offload=False)
    expected = single.generate_video("a cat", negative_prompt="blurry", image=start_image, seed=4, save_video=False,
                                     **SIZES)
    multi = VideoGenerator.from_pretrained(tiny_ti2v, num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False,
                                           dit_cpu_offload=False, precision="float32")
    try:
        frames = multi.generate_video("a cat", negative_prompt="blurry", image=start_image, seed=4, save_video=False,
                                      **SIZES)
        placements = {r.component: (r.placement.name, r.device) for r in multi.report()}
    finally:
        multi.shutdown()
    assert placements["transformer"] == ("FSDP", "workers")
    assert np.abs(frames - expected).max() <= 1e-5


def test_ulysses_splits_the_per_token_timesteps_with_the_tokens(tiny_ti2v, start_image):
    """Two sequence-parallel ranks, image-to-video (frame-0 tokens at timestep 0, the others at t): the group's
    denoising loop gives the single process's latents."""
    from video_offload.offload.config import OffloadConfig, Precision, SamplingParams
    from video_offload.offload.core.denoise import denoise, guided_prediction, initial_noise, make_scheduler
    from video_offload.offload.core.manager import OffloadManager
    from video_offload.offload.distributed.launcher import WorkerGroup, spec_for
    from video_offload.offload.distributed.sampling import sample_payload
    from video_offload.offload.pipeline.stages import encode_prompts, latent_space, load_model, prepare_image_condition

    manager = OffloadManager("cpu")
    model = load_model(manager, tiny_ti2v, Precision(dit="float32"))
    config = OffloadConfig(dit_layerwise_offload=False)
    params = SamplingParams(seed=9, **SIZES)
    conditioning = encode_prompts(manager, model, config, "a cat", "blurry", start_image)
    conditioning = prepare_image_condition(manager, model, config, conditioning, params)
    assert conditioning.image_condition.shape == (1, 48, 1, 4, 4)
    scheduler = manager.component(model, "scheduler")
    resolve = model.spec.component("scheduler").resolve
    noise = initial_noise(params, latent_space(model))
    predictor = model.spec.stages.noise_predictor(manager.component(model, "transformer"), conditioning,
                                                  torch.device("cpu"), torch.float32)
    expected = denoise(lambda i, x, t: guided_prediction(predictor, x, t, params.guidance_scale),
                       make_scheduler(resolve, *scheduler, params.flow_shift), params, noise, torch.device("cpu"))

    group_config = OffloadConfig(num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False, dit_cpu_offload=False)
    spec = dataclasses.replace(spec_for(model, group_config, parallel="ulysses"), device="cpu")
    group = WorkerGroup.launch(spec, heads=model.spec.stages.sequence_parallel_heads(model.source.config("transformer")))
    try:
        assert group.info["plan"] == "FSDP over 2 ranks; Ulysses sequence parallel over 2"
        payload = sample_payload(conditioning, params, scheduler, noise)
        latents = group.call("sample", payload, None, total_steps=params.num_inference_steps)["latents"]
    finally:
        group.shutdown()
    assert (latents - expected).abs().max() <= 1e-5
