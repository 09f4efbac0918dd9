"""The decode's tiles planned while the DiT samples (``pipeline.stages._decode_planning``, ``core.background``).

Choosing a tiled decode's grid replays the VAE on the meta device; planned ahead, in a background thread, from the
VAE's config alone, the decode finds every replay it asks for already done. Checked through the real pipeline on
the tiny model: where the planning ran (not the caller's thread), that the decode replays nothing, and that the
frames are those of a decode that planned for itself.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from video_offload import VideoGenerator
from video_offload.offload.config import OffloadConfig, SamplingParams
from video_offload.offload.core.manager import OffloadManager
from video_offload.offload.families.wan import tiling_policy
from video_offload.offload.families.wan import vae_tiling as tv
from video_offload.offload.pipeline.stages import decode_video, encode_prompts, load_model, sample_latents

PARAMS = dict(height=64, width=96, num_frames=9, num_inference_steps=2)


def _clear_planner_caches() -> None:
    for cached in (tv._replay_decode, tv._estimate_decode, tv._count_flops):
        cached.cache_clear()


def test_the_decode_is_planned_while_sampling_and_replays_nothing(tiny_t2v, monkeypatch):
    threads = []
    plan = tiling_policy._decode_tiling

    def recorded(*args):
        threads.append(threading.current_thread().name)
        return plan(*args)

    monkeypatch.setattr(tiling_policy, "_decode_tiling", recorded)
    _clear_planner_caches()
    manager = OffloadManager("cpu")
    model = load_model(manager, tiny_t2v)
    config = OffloadConfig(vae_tiling="on")
    conditioning = encode_prompts(manager, model, config, "a heron", "", None)
    latents = sample_latents(manager, model, config, conditioning, SamplingParams(seed=3, **PARAMS))

    key = ("vae decode tiles", model.source.identity, (1, *latents.shape[1:]), "on")
    assert manager.background.started(key)
    manager.background.wait(key)
    assert key in manager.background.seconds  # it ran to the end
    assert threads == ["video-offload VAE decode tiles " + str(key)]  # in the background, not here
    replays = tv._replay_decode.cache_info().misses
    assert replays > 0

    frames = decode_video(manager, model, config, latents)
    assert tv._replay_decode.cache_info().misses == replays  # the decode found every replay it asked for
    assert threads[1:] == [threading.current_thread().name]  # its own choice, answered from the caches

    _clear_planner_caches()  # a decode that plans everything itself gives the same frames
    assert torch.equal(decode_video(manager, model, config, latents), frames)
    assert tv._replay_decode.cache_info().misses > 0


def test_nothing_is_planned_ahead_for_an_untiled_decode(tiny_t2v):
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32", manager=manager, vae_tiling="off")
    frames = generator.generate_video("a heron", seed=3, save_video=False, **PARAMS)
    assert isinstance(frames, np.ndarray)
    assert not any(key[0] == "vae decode tiles" for key in manager.background._threads)


def test_a_planning_that_fails_ahead_leaves_the_decode_to_plan(tiny_t2v, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("planner broke")

    monkeypatch.setattr(tiling_policy, "decode_planner", lambda *args: broken)
    manager = OffloadManager("cpu")
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32", manager=manager, vae_tiling="on")
    frames = generator.generate_video("a heron", seed=3, save_video=False, **PARAMS)
    assert frames.shape == (9, 64, 96, 3)
    assert "planner broke" in caplog.text and "done when needed" in caplog.text


def test_the_weightless_vae_is_the_loaded_one_for_the_planner(tiny_t2v, single_files):
    """Planning ahead builds the VAE from its config (nothing is read); the planner's answers are keyed by the VAE's
    class, config and dtype, so a weightless VAE built from a Diffusers folder's or a ComfyUI single file's config
    must key as the VAE that source loads does, or the decode would find nothing planned."""
    from video_offload.offload.core.spec import Role

    for path in (tiny_t2v, dict(single_files[("t2v", "bf16")])):
        manager = OffloadManager("cpu")
        model = load_model(manager, path)
        vae = model.spec.first(Role.VAE).name
        loaded = manager.component(model, vae)
        cls = model.spec.component(vae).resolve(model.source.class_name(vae))
        weightless = tv.weightless_vae(cls, model.source.config(vae), model.dtypes[vae])
        assert tv._vae_key(weightless) == tv._vae_key(loaded)
        assert all(p.device.type == "meta" for p in weightless.parameters())
        # built once: the sampler asks for it before every run's steps, on the run's path
        assert tv.weightless_vae(cls, model.source.config(vae), model.dtypes[vae]) is weightless
