"""Bounded activation memory without changing a number: the DiT's token-wise layers over chunks of the sequence,
and the text encoder streamed through the device instead of resident or on the CPU."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers.models.attention import FeedForward

from video_offload import VideoGenerator
from video_offload.offload import OffloadManager
from video_offload.offload.config import OffloadConfig, Precision
from video_offload.offload.core.chunking import (
    ChunkingConfig,
    apply_sequence_chunking,
    chunking_of,
    plan_chunking,
    remove_sequence_chunking,
)
from video_offload.offload.core.placement import Placement
from video_offload.offload.families.wan.lean_block import lean_tokens
from video_offload.offload.pipeline.stages import encode_prompts, load_model

NOTHING_OFFLOADED = dict(dit_layerwise_offload=False, vae_cpu_offload=False, image_encoder_cpu_offload=False,
                         text_encoder_cpu_offload=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunked_feed_forward_equals_the_whole_one_bit_for_bit(dtype):
    torch.manual_seed(0)
    ff = FeedForward(64, inner_dim=160, activation_fn="gelu-approximate").to(dtype).eval()
    x = torch.randn(1, 1000, 64, dtype=dtype)
    with torch.no_grad():
        whole = ff(x)
        apply_sequence_chunking(ff, ChunkingConfig(max_tokens=300))
        apply_sequence_chunking(ff, ChunkingConfig(max_tokens=256))  # idempotent: only the size changes
        assert chunking_of(ff).max_tokens == 256
        chunked = ff(x)
        hook = ff._diffusers_hook.get_hook("video_offload.sequence_chunking")
        assert hook.chunked_calls == 1
        remove_sequence_chunking(ff)
        remove_sequence_chunking(ff)
        assert chunking_of(ff) is None
        again = ff(x)
    assert torch.equal(chunked, whole) and torch.equal(again, whole)


def test_chunking_is_planned_from_free_memory():
    gib = 2**30
    per_token = 80_000  # Wan 14B's feed-forward, conservatively
    assert plan_chunking("off", 32760, per_token, 1 * gib) is None
    assert plan_chunking("auto", 32760, per_token, None) is None  # unknown free memory (CPU): run whole
    assert plan_chunking("auto", 32760, per_token, 100 * gib) is None  # plenty: run whole, full speed
    size = plan_chunking("auto", 32760, per_token, 3 * gib)  # a 6 GiB card during sampling
    assert size is not None and 1024 <= size < 32760 and size * per_token <= 3 * gib // 20 + per_token * 1024
    # A family's floor: Wan's lean block takes at least 8,192 tokens a slice (smaller slices cost time, not memory)
    assert plan_chunking("auto", 32760, per_token, 3 * gib, floor=8190) == 8190
    forced = plan_chunking("on", 32760, per_token, 100 * gib)
    assert forced is not None and forced * per_token <= 256 * 2**20 + per_token


@pytest.fixture(scope="module")
def tall_t2v(tmp_path_factory):
    from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tall") / "tiny-wan", spec=TinyWanSpec(num_layers=3))


def test_auto_chunking_engages_when_memory_is_short_and_changes_no_frame(tall_t2v):
    sizes = dict(height=256, width=256, num_frames=17, num_inference_steps=2)  # 5x16x16 = 1280 tokens
    whole = VideoGenerator.from_pretrained(tall_t2v, precision="float32", manager=OffloadManager("cpu"),
                                           dit_activation_chunking="off", vae_tiling="off", **NOTHING_OFFLOADED)
    expected = whole.generate_video("a cat", save_video=False, **sizes)
    # A device whose free memory (as the manager reads it) is less than five times the token-wise layers'
    # whole-sequence activations: 2 MiB.
    tight = OffloadManager("cpu")
    tight.available_bytes = lambda: 2 * 2**20
    generator = VideoGenerator.from_pretrained(tall_t2v, precision="float32", manager=tight, vae_tiling="off",
                                               **NOTHING_OFFLOADED)
    calls = []
    model = generator.model
    tight.component(model, "transformer")
    blocks = model.components["transformer"].blocks
    for block in blocks:
        block.ffn.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[1]))
        block.attn1.to_q.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[1]))
    frames = generator.generate_video("a cat", save_video=False, **sizes)
    # Every feed-forward and every projection saw a slice of the 1280 tokens: the blocks ran their sliced forward.
    assert calls and max(calls) < 1280 and all(lean_tokens(b) is not None for b in blocks)
    assert np.array_equal(frames, expected)


def test_the_streamed_text_encoder_equals_the_resident_one_and_gives_its_memory_back(tiny_t2v):
    resident_manager = OffloadManager("cpu")
    resident = load_model(resident_manager, tiny_t2v, Precision(dit="float32"))
    expected = encode_prompts(resident_manager, resident, OffloadConfig(**NOTHING_OFFLOADED), "a raccoon", "blurry")

    manager = OffloadManager("cpu")
    model = load_model(manager, tiny_t2v, Precision(dit="float32"))
    config = OffloadConfig(**{**NOTHING_OFFLOADED, "text_encoder_layerwise_offload": True})
    encode_prompts(manager, model, config, "warm up")  # builds the offloader (its hooks come before the test's)
    encoder = manager.component(model, "text_encoder")
    embedding = encoder.shared.weight
    where: list[str] = []
    seen_embedding: list[bool] = []

    def record(index, *_):
        where.append(manager.offloader(model, "text_encoder").block_location(index))

    hooks = [block.register_forward_pre_hook(functools.partial(record, i)) for i, block in enumerate(encoder.encoder.block)]
    hooks.append(encoder.encoder.embed_tokens.register_forward_pre_hook(
        lambda m, args: seen_embedding.append(m.weight is embedding and args[0].device.type == "cpu")))
    conditioning = encode_prompts(manager, model, config, "a raccoon", "blurry")
    for hook in hooks:
        hook.remove()
    assert torch.equal(conditioning.prompt_embeds, expected.prompt_embeds)
    assert torch.equal(conditioning.negative_prompt_embeds, expected.negative_prompt_embeds)
    assert set(where) == {"slot"}  # every block ran from a streaming slot
    assert seen_embedding and all(seen_embedding)  # the embedding table stayed in host memory and ran there
    offloader = manager.offloader(model, "text_encoder")
    assert offloader.released and offloader.stats().slot_bytes == 0 and manager.device_bytes() == 0
    assert ("text_encoder", Placement.LAYERWISE) in {(r.component, r.placement) for r in manager.history}


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, chunk", [(32760, 4096), (32760, 2520), (75600, 8192)])
def test_gpu_chunked_feed_forward_of_a_14b_block_is_bit_exact(tokens, chunk):
    """Wan 14B's feed-forward (5120 -> 13824 -> 5120, bf16) at 480p81 and 720p81 sequence lengths on CUDA."""
    torch.manual_seed(0)
    ff = FeedForward(5120, inner_dim=13824, activation_fn="gelu-approximate").to("cuda", torch.bfloat16).eval()
    x = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        whole = ff(x)
        apply_sequence_chunking(ff, ChunkingConfig(max_tokens=chunk))
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        chunked = ff(x)
        peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(chunked, whole)
    assert peak < 2 * chunk * 13824 * 2 + tokens * 5120 * 2 * 1.1  # a chunk's intermediates plus the output


@pytest.mark.gpu
def test_gpu_streamed_text_encoder_equals_the_resident_one(tiny_t2v):
    resident_manager = OffloadManager("cuda")
    resident = load_model(resident_manager, tiny_t2v, Precision(dit="bfloat16"))
    expected = encode_prompts(resident_manager, resident, OffloadConfig(**NOTHING_OFFLOADED), "a raccoon", "blurry")
    manager = OffloadManager("cuda")
    model = load_model(manager, tiny_t2v, Precision(dit="bfloat16"))
    config = OffloadConfig(**{**NOTHING_OFFLOADED, "text_encoder_layerwise_offload": True})
    conditioning = encode_prompts(manager, model, config, "a raccoon", "blurry")
    assert torch.equal(conditioning.prompt_embeds, expected.prompt_embeds)
    assert torch.equal(conditioning.negative_prompt_embeds, expected.negative_prompt_embeds)
    assert manager.offloader(model, "text_encoder").released and manager.device_bytes() == 0
