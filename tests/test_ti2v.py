"""Wan2.2 TI2V-5B: text-to-video and image-to-video through the same model give the frames of diffusers'
``WanPipeline`` and ``WanImageToVideoPipeline`` (``expand_timesteps=True``) on a tiny model - from its Diffusers
folder and from Comfy-Org's single files (``wan2.2_ti2v_5B_fp16`` + ``wan2.2_vae``), streamed layer by layer or
resident; the Wan2.2 VAE's file layout reads back as written, its tiled encode/decode stays exact, and a wrong VAE
file is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from single_file_helpers import generator_for

from video_offload import VideoGenerator
from video_offload.offload import ModelLoadError
from video_offload.offload.families import open_files, open_model

SIZES = dict(height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=4.0)
PROMPT, NEGATIVE = "a cat turns its head", "blurry"


@pytest.fixture(scope="module")
def tiny_ti2v(tmp_path_factory):
    """A tiny TI2V folder whose tokenizer is the sentencepiece model its text encoder's file will carry."""
    from video_offload.offload.families.wan.comfy_export import tiny_sentencepiece_model
    from video_offload.offload.families.wan.text import tokenizer_from_sentencepiece
    from video_offload.offload.families.wan.tiny_ti2v import build_tiny_ti2v

    tokenizer = tokenizer_from_sentencepiece(tiny_sentencepiece_model())
    return build_tiny_ti2v(tmp_path_factory.mktemp("models") / "tiny-wan2.2-ti2v", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ti2v_files(tiny_ti2v, tmp_path_factory):
    """``wan2.2_ti2v_5B_fp16``, ``wan2.2_vae`` and ``umt5_xxl_fp16`` (tokenizer inside) of the tiny folder."""
    from video_offload.offload.families.wan.comfy_export import tiny_sentencepiece_model
    from video_offload.offload.families.wan.tiny_ti2v import export_ti2v_single_files

    return export_ti2v_single_files(tiny_ti2v, tmp_path_factory.mktemp("ti2v-files"),
                                    spiece_model=tiny_sentencepiece_model())


@pytest.fixture(scope="module")
def reference(tiny_ti2v):
    """diffusers' own pipelines on the tiny folder, cached per call."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    cache = {}

    def run(seed: int, image=None):
        key = (seed, image is not None)
        if key not in cache:
            if image is None:
                pipe = WanPipeline.from_pretrained(tiny_ti2v, dtype=torch.float32)
                args = ()
            else:
                pipe = WanImageToVideoPipeline.from_pretrained(tiny_ti2v, dtype=torch.float32)
                assert pipe.config.expand_timesteps and pipe.image_encoder is None
                args = (image,)
            pipe.set_progress_bar_config(disable=True)
            cache[key] = pipe(*args, prompt=PROMPT, negative_prompt=NEGATIVE, output_type="np",
                              generator=torch.Generator("cpu").manual_seed(seed), **SIZES).frames[0]
        return cache[key]

    return run


def generate(generator: VideoGenerator, seed: int, image=None) -> np.ndarray:
    return generator.generate_video(PROMPT, NEGATIVE, image=image, seed=seed, save_video=False, **SIZES)


@pytest.mark.parametrize("source", ["folder", "files"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["resident", "layerwise"])
@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_frames_equal_diffusers(tiny_ti2v, ti2v_files, reference, start_image, source, layerwise, mode):
    image = start_image if mode == "i2v" else None
    generator = generator_for(tiny_ti2v if source == "folder" else ti2v_files, dit_layerwise_offload=layerwise)
    assert generator.model.spec.name == "wan2.2-ti2v"
    ours = generate(generator, 5, image)
    expected = reference(5, image)
    assert ours.shape == expected.shape == (9, 64, 64, 3)
    assert np.abs(ours - expected).max() <= 1e-4


def test_image_to_video_keeps_the_start_frame_and_differs_from_text_to_video(tiny_ti2v, start_image):
    """The start image conditions the video: frame 0 decodes from the pasted image latent, not from noise."""
    generator = generator_for(tiny_ti2v)
    t2v, i2v = generate(generator, 5), generate(generator, 5, start_image)
    assert not np.allclose(t2v[0], i2v[0], atol=1e-3)
    latents_a = _sampled_latents(generator, 1, start_image)
    latents_b = _sampled_latents(generator, 2, start_image)
    assert torch.equal(latents_a[:, :, 0], latents_b[:, :, 0])  # the image's latent, whatever the seed
    assert not torch.equal(latents_a[:, :, 1:], latents_b[:, :, 1:])


def _sampled_latents(generator: VideoGenerator, seed: int, image) -> torch.Tensor:
    from video_offload.offload.config import SamplingParams
    from video_offload.offload.pipeline.stages import encode_prompts, sample_latents

    conditioning = encode_prompts(generator.manager, generator.model, generator.config, PROMPT, NEGATIVE, image)
    params = SamplingParams(seed=seed, **SIZES)
    return sample_latents(generator.manager, generator.model, generator.config, conditioning, params)


def test_latent_space_is_the_wan22_vaes(tiny_ti2v, ti2v_files):
    from video_offload.offload.families.wan.vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    for source, spec in (open_model(tiny_ti2v), open_files({k: str(v) for k, v in ti2v_files.items()})):
        space = spec.stages.latent_space(source)
        assert (space.channels, space.temporal_factor, space.spatial_factor, space.patch) == (48, 4, 16, (1, 2, 2))
        assert space.pixel_multiple == 32
        assert space.mean == pytest.approx(WAN22_LATENTS_MEAN) and space.std == pytest.approx(WAN22_LATENTS_STD)


def test_vae_file_is_in_comfyuis_wan22_layout_and_reads_back_exactly(tiny_ti2v, ti2v_files):
    """The file has the key ComfyUI detects the Wan2.2 VAE by, and every tensor loads back to the folder's value."""
    from diffusers import AutoencoderKLWan

    with safe_open(str(ti2v_files["vae"]), "pt") as handle:
        keys = set(handle.keys())
    assert "decoder.upsamples.0.upsamples.0.residual.2.weight" in keys
    assert "decoder.middle.0.residual.0.gamma" in keys and not any("up_blocks" in k or "resnets" in k for k in keys)
    source, spec = open_files({k: str(v) for k, v in ti2v_files.items()})
    loaded = source.load(spec.component("vae"), torch.float32)
    folder = AutoencoderKLWan.from_pretrained(str(tiny_ti2v / "vae"), dtype=torch.float32)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(folder.config)
    theirs = folder.state_dict()
    ours = loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_tiled_vae_encode_and_decode_through_the_pipeline_stay_exact(tiny_ti2v, start_image, caplog):
    """vae_tiling=on runs the start frame's encode and the decode of the Wan2.2 VAE in exact spatial tiles: the video
    is the untiled one within 1e-5 (the bound is 1/255)."""
    import logging

    frames = {}
    sizes = dict(SIZES, width=128)
    for mode in ("off", "on"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="video_offload"):
            generator = generator_for(tiny_ti2v, vae_tiling=mode)
            frames[mode] = generator.generate_video(PROMPT, NEGATIVE, image=start_image, seed=5, save_video=False,
                                                    **sizes)
        tiled = [r.getMessage() for r in caplog.records if "tiles (vae_tiling=" in r.getMessage()]
        assert (mode == "on") == (len(tiled) == 2), tiled  # the start-frame encode and the decode, both tiled
    assert frames["on"].shape == frames["off"].shape == (9, 64, 128, 3)
    assert float(abs(frames["on"] - frames["off"]).max()) <= 1e-5


def test_wrong_vae_file_is_refused(ti2v_files, tmp_path):
    """The Wan2.1 VAE's file does not go with the TI2V DiT: the message says which file it is and which to use."""
    from video_offload.offload.families.wan.comfy_export import export_component
    from video_offload.offload.families.wan.tiny import SINGLE_FILE_TINY, build_tiny_wan
    from diffusers import AutoencoderKLWan

    folder = build_tiny_wan(tmp_path / "wan21", spec=SINGLE_FILE_TINY)
    vae21 = export_component(AutoencoderKLWan.from_pretrained(str(folder / "vae")), "vae", tmp_path / "wan_2.1_vae.safetensors",
                             "bf16")
    with pytest.raises(ModelLoadError, match=r"Wan2.1 VAE .*wan2.2_vae"):
        open_files({**{k: str(v) for k, v in ti2v_files.items()}, "vae": str(vae21)})


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_on_a_gpu_layerwise_equals_resident_bit_for_bit_and_diffusers(tmp_path_factory, start_image, mode):
    """On CUDA, a wider TI2V model (8 blocks of dim 512): streamed equals resident bit for bit in float32 and
    bfloat16, and float32 equals diffusers' pipeline on the same device."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    from video_offload.offload.families.wan.tiny_ti2v import TinyTi2vSpec, build_tiny_ti2v

    folder = build_tiny_ti2v(tmp_path_factory.mktemp("gpu") / "wide-ti2v",
                             spec=TinyTi2vSpec(num_layers=8, num_attention_heads=4, ffn_dim=2048))
    image = start_image if mode == "i2v" else None
    sizes = dict(height=128, width=192, num_frames=17, num_inference_steps=3, guidance_scale=4.0)
    resident = dict(dit_layerwise_offload=False, vae_cpu_offload=False, text_encoder_cpu_offload=False)
    frames = {}
    for precision in ("float32", "bfloat16"):
        for layerwise in (False, True):
            generator = VideoGenerator.from_pretrained(folder, precision=precision,
                                                       **{**resident, "dit_layerwise_offload": layerwise})
            frames[precision, layerwise] = generator.generate_video(PROMPT, NEGATIVE, image=image, seed=3,
                                                                    save_video=False, **sizes)
            generator.shutdown()
        assert np.array_equal(frames[precision, True], frames[precision, False]), precision
    pipe = (WanPipeline if image is None else WanImageToVideoPipeline).from_pretrained(folder, dtype=torch.float32)
    pipe.to("cuda").set_progress_bar_config(disable=True)
    args = () if image is None else (image,)
    expected = pipe(*args, prompt=PROMPT, negative_prompt=NEGATIVE, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(3), **sizes).frames[0]
    assert np.abs(frames["float32", False] - expected).max() <= 1e-4


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_per_token_timesteps_and_latents_equal_diffusers_bit_for_bit(tiny_ti2v, start_image, mode):
    """The DiT gets one timestep per token (the per-token path diffusers takes with expand_timesteps, which differs
    from the scalar path by ~1e-6): all t in text-to-video, 0 on the start frame's tokens in image-to-video; the
    sampled latents (frame 0 pasted back) are diffusers' bit for bit."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    image = start_image if mode == "i2v" else None
    generator = generator_for(tiny_ti2v, dit_layerwise_offload=False)
    seen = []
    dit = generator.manager.component(generator.model, "transformer")
    hook = dit.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"].clone()),
                                         with_kwargs=True)
    try:
        ours = _sampled_latents(generator, 6, image)
    finally:
        hook.remove()
    tokens_per_frame = (64 // 16 // 2) ** 2
    assert len(seen) == 2 * SIZES["num_inference_steps"]  # cfg > 1: two passes per step
    for timestep in seen:
        assert timestep.shape == (1, 3 * tokens_per_frame) and timestep.dtype == torch.float32
        t = timestep[0, -1]
        assert t > 0 and torch.all(timestep[0, tokens_per_frame:] == t)
        assert torch.all(timestep[0, :tokens_per_frame] == (0 if image is not None else t))
    pipe = (WanPipeline if image is None else WanImageToVideoPipeline).from_pretrained(tiny_ti2v, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    args = () if image is None else (image,)
    expected = pipe(*args, prompt=PROMPT, negative_prompt=NEGATIVE, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(6), **SIZES).frames
    assert torch.equal(ours, expected)
