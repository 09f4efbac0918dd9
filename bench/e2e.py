"""End-to-end stage timings and peak VRAM for Wan2.1 14B T2V and I2V under the seed's offload settings.

Real-size configs with random weights (shapes decide speed, not values): UMT5-XXL text encoder, Wan2.1 14B DiT
(T2V and I2V), CLIP ViT-H/14 image encoder, Wan VAE. Models are built in host memory (no 60 GB of files on the
device's disk) and run through the pack's own manager and stages, exactly as the nodes run them.

One JSON object per row on stdout: model, mode (which offload options), stage, seconds, peak VRAM, and for the
offloaded VAE/image encoder the seconds spent placing their weights against bytes / measured H2D bandwidth.

    python bench/e2e.py               # on a GPU: the full run (about 6 minutes on one H100)
    python bench/e2e.py --tiny        # on a CPU: the same code path on tiny configs, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from video_offload.offload.config import OffloadConfig, Precision, SamplingParams  # noqa: E402
from video_offload.offload.core.loaded_model import LoadedModel  # noqa: E402
from video_offload.offload.core.manager import OffloadManager  # noqa: E402
from video_offload.offload.core.tensors import tensor_bytes  # noqa: E402
from video_offload.offload.families.wan.shapes import CLIP_VIT_H, UMT5_XXL, WAN_DIT, WAN_VAE  # noqa: E402
from video_offload.offload.families.wan.spec import WAN21_I2V, WAN21_T2V  # noqa: E402
from video_offload.offload.families.wan.tiny import _build_tokenizer  # noqa: E402
from video_offload.offload.pipeline.stages import decode_video, encode_prompts, prepare_image_condition, sample_latents  # noqa: E402
from video_offload.offload.weights.diffusers_folder import DiffusersFolder  # noqa: E402

MODES = {
    "all_resident": dict(
        dit_layerwise_offload=False, image_encoder_cpu_offload=False, vae_cpu_offload=False, text_encoder_cpu_offload=False
    ),
    "layerwise": dict(
        dit_layerwise_offload=True, image_encoder_cpu_offload=False, vae_cpu_offload=False, text_encoder_cpu_offload=False
    ),
    "layerwise+image_vae_offload": dict(
        dit_layerwise_offload=True, image_encoder_cpu_offload=True, vae_cpu_offload=True, text_encoder_cpu_offload=False
    ),
    "seed_defaults": {},
}
"""The seed's recommended order on one GPU, from nothing offloaded to its defaults (everything offloaded)."""

WAN_14B = WAN_DIT["14B"]
TINY = dict(
    umt5=dict(UMT5_XXL, vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    dit=dict(WAN_14B, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=4, text_dim=32,
             rope_max_seq_len=64),
    clip=dict(CLIP_VIT_H, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=32),
    vae=dict(WAN_VAE, base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
)


def fill_random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every floating tensor values ~N(0, 0.02) quickly: one random block reused (speed depends on shapes)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=generator) * 0.02
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.numel():
                flat = tensor.view(-1)
                for start in range(0, flat.numel(), pool.numel()):
                    chunk = flat[start : start + pool.numel()]
                    chunk.copy_(pool[: chunk.numel()])
    return module


def build_models(sizes: dict, image_to_video: bool, dtype: torch.dtype, seed: int = 0) -> dict:
    """Instantiate the components on the meta device, then materialise them in host memory with random values."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    def materialise(module, dtype_):
        module = module.to_empty(device="cpu")
        for param in module.parameters():  # cast per tensor: Module.to(dtype) warns about fp32-kept modules
            param.data = param.data.to(dtype_)
        module = fill_random_(module, seed)
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
        for name, param in module.named_parameters():
            if keep.intersection(name.split(".")):
                param.data = param.data.float()  # as from_pretrained(dtype=...) keeps them
        return module.eval().requires_grad_(False)

    with torch.device("meta"):
        text_encoder = UMT5EncoderModel(UMT5Config(**sizes["umt5"]))
        dit_config = dict(sizes["dit"])
        if image_to_video:
            dit_config.update(in_channels=36, image_dim=sizes["clip"]["hidden_size"],
                              added_kv_proj_dim=dit_config["num_attention_heads"] * dit_config["attention_head_dim"])
        transformer = WanTransformer3DModel(**dit_config)
        vae = AutoencoderKLWan(**sizes["vae"])
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**sizes["clip"])) if image_to_video else None
    components = {
        "text_encoder": materialise(text_encoder, dtype),
        "transformer": materialise(transformer, dtype),
        "vae": materialise(vae, torch.float32),
    }
    # Non-persistent buffers (rotary tables) must be computed, not random: rebuild them as __init__ does.
    rope = type(components["transformer"].rope)(
        dit_config["attention_head_dim"], dit_config["patch_size"], dit_config["rope_max_seq_len"]
    )
    components["transformer"].rope = rope.eval()
    text = components["text_encoder"]
    text.encoder.embed_tokens.weight = text.shared.weight  # to_empty untied them; UMT5 shares one embedding
    if image_to_video:
        from transformers import CLIPImageProcessor

        components["image_encoder"] = materialise(image_encoder, torch.float32)
        embeddings = components["image_encoder"].get_submodule("embeddings")
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))  # an index, not a weight
        components["image_processor"] = CLIPImageProcessor(
            crop_size=sizes["clip"]["image_size"], size={"shortest_edge": sizes["clip"]["image_size"]}
        )
    return components


def write_config_folder(root: Path, components: dict, image_to_video: bool) -> DiffusersFolder:
    """Configs only (no weights): what the stages read (model index, scheduler, transformer and VAE configs)."""
    from diffusers import UniPCMultistepScheduler

    root.mkdir(parents=True, exist_ok=True)
    components["transformer"].save_config(root / "transformer")
    components["vae"].save_config(root / "vae")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    ).save_config(root / "scheduler")
    spec = WAN21_I2V if image_to_video else WAN21_T2V
    index = {"_class_name": spec.pipeline_class}
    index.update({c.name: ["", next(iter(c.classes))] for c in spec.components})
    (root / "model_index.json").write_text(json.dumps(index))
    return DiffusersFolder(root, index)


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Pinned host-to-device GB/s, median of 5 copies of 1 GiB."""
    if device.type != "cuda":
        return float("nan")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9


@contextlib.contextmanager
def measured(device: torch.device, out: dict):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    out["seconds"] = round(time.perf_counter() - started, 4)


def placement_seconds(manager: OffloadManager, model: LoadedModel, name: str, config: OffloadConfig, device,
                      repeats: int = 3) -> float:
    """One use's cost of an offloaded module: the copy of its pinned host copy to the device (median)."""
    return copy_seconds(manager._placer(model, name, pin=config.pin_cpu_memory), device, repeats)


def copy_seconds(placer, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        placer.to_host()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        placer.to_device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    placer.to_host()
    return sorted(times)[len(times) // 2]


def offload_cost_only(sizes: dict, device, bandwidth: float, emit, repeats: int = 21) -> None:
    """Just the per-use cost of VAE and image-encoder offload, with many repeats (a 9 ms copy needs them)."""
    from video_offload.offload.core.placement import ModulePlacer

    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel

    components = {"vae": AutoencoderKLWan(**sizes["vae"]).eval(),
                  "image_encoder": CLIPVisionModel(CLIPVisionConfig(**sizes["clip"])).eval()}
    for name in ("vae", "image_encoder"):
        placer = ModulePlacer(name, components[name], pin=True)
        seconds = copy_seconds(placer, device, repeats)
        ideal = placer.nbytes / (bandwidth * 1e9)
        emit(dict(stage=f"offload_cost_per_use_{name}", repeats=repeats, seconds=round(seconds, 5),
                  bytes=placer.nbytes, bytes_over_h2d_s=round(ideal, 5), ratio=round(seconds / ideal, 3)))
        placer.close()


def prepare(manager: OffloadManager, model: LoadedModel, config: OffloadConfig) -> float:
    """One-time setup for a mode, kept out of the stage timings: host arenas built and pinned, resident weights
    uploaded, the layerwise offloader constructed. What an offloaded component costs *per use* stays in the stages.
    Device copies left over from the previous mode are dropped first (host arenas are kept)."""
    started = time.perf_counter()
    for placer in model.resources.placers.values():
        placer.to_host()
    if not config.dit_layerwise_offload:
        model.resources.drop_layerwise()
    if manager.device.type == "cuda":
        torch.cuda.empty_cache()
    with manager.in_use(model, "transformer", config):
        pass
    for name, offloaded in (("text_encoder", config.text_encoder_cpu_offload), ("vae", config.vae_cpu_offload),
                            ("image_encoder", config.image_encoder_cpu_offload)):
        if name not in model.components or (name == "text_encoder" and offloaded):
            continue
        manager._placer(model, name, pin=config.pin_cpu_memory)  # host arena (pinned) built once
        if not offloaded:
            with manager.in_use(model, name, config):
                pass
    if manager.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run_mode(manager, model, mode, options, params, image, device, bandwidth, emit) -> dict:
    config = OffloadConfig(**options)
    name = "i2v" if model.spec.image_to_video else "t2v"
    emit(dict(model=name, mode=mode, stage="setup", seconds=round(prepare(manager, model, config), 2)))
    model.prompt_cache.clear()  # every mode really encodes
    rows = {}
    out = {}
    with measured(device, out):
        conditioning = encode_prompts(manager, model, config, "A majestic lion strides across the golden savanna.",
                                      "blurry, low quality", image)
    rows["encode"] = out
    if image is not None:  # the VAE encode of the start frame, so "sample" is the DiT alone
        out = {}
        with measured(device, out):
            conditioning = prepare_image_condition(manager, model, config, conditioning, params)
        rows["encode_image_condition"] = out
    out = {}
    with measured(device, out):
        latents = sample_latents(manager, model, config, conditioning, params)
    out["s_per_step"] = round(out["seconds"] / params.num_inference_steps, 4)
    rows["sample"] = out
    out = {}
    with measured(device, out):
        decode_video(manager, model, config, latents)
    rows["decode"] = out
    for stage, row in rows.items():
        emit(dict(model=name, mode=mode, stage=stage, **row))
    offloaded = [c for c, on in (("vae", config.vae_cpu_offload), ("image_encoder", config.image_encoder_cpu_offload))
                 if on and c in model.components]
    for comp in offloaded:
        seconds = placement_seconds(manager, model, comp, config, device)
        nbytes = manager._placer(model, comp, pin=config.pin_cpu_memory).nbytes
        ideal = nbytes / (bandwidth * 1e9) if bandwidth == bandwidth else None
        emit(dict(
            model=name, mode=mode, stage=f"offload_cost_per_use_{comp}", seconds=round(seconds, 4), bytes=nbytes,
            bytes_over_h2d_s=None if ideal is None else round(ideal, 4),
            ratio=None if ideal is None else round(seconds / ideal, 3),
        ))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a smoke test of this script")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--out", default=None, help="also append the JSON rows to this file")
    parser.add_argument("--offload-cost-only", action="store_true",
                        help="only the per-use copy cost of the offloaded VAE and image encoder (21 repeats)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    sizes = TINY if args.tiny else dict(umt5=UMT5_XXL, dit=WAN_14B, clip=CLIP_VIT_H, vae=WAN_VAE)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    height, width = (64, 96) if args.tiny else (480, 832)
    frames = 9 if args.tiny else args.frames
    params = SamplingParams(height=height, width=width, num_frames=frames, num_inference_steps=args.steps)
    out_file = open(args.out, "a") if args.out else None
    summary = {}

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out_file:
            out_file.write(line + "\n")
            out_file.flush()

    bandwidth = h2d_bandwidth(device)
    emit(dict(stage="h2d_bandwidth", gb_per_s=round(bandwidth, 2), device=torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", torch=torch.__version__))
    if args.offload_cost_only:
        offload_cost_only(sizes, device, bandwidth, emit)
        return 0
    import numpy as np
    import PIL.Image

    image = PIL.Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype("uint8"))
    plan = [("t2v", list(MODES)), ("i2v", ["all_resident", "seed_defaults"])]
    with tempfile.TemporaryDirectory() as tmp:
        for kind, modes in plan:
            i2v = kind == "i2v"
            started = time.perf_counter()
            components = build_models(sizes, i2v, dtype)
            components["tokenizer"] = _build_tokenizer()
            folder = write_config_folder(Path(tmp) / kind, components, i2v)
            dtypes = {"transformer": dtype, "text_encoder": dtype, "vae": torch.float32, "image_encoder": torch.float32}
            model = LoadedModel(source=folder, spec=WAN21_I2V if i2v else WAN21_T2V,
                                precision=Precision(dit=str(dtype).removeprefix("torch.")), dtypes=dtypes)
            model.components.update(components)
            emit(dict(model=kind, stage="build_random_models", seconds=round(time.perf_counter() - started, 1),
                      bytes={k: tensor_bytes(v) for k, v in components.items() if isinstance(v, torch.nn.Module)}))
            manager = OffloadManager(device)
            if kind == "t2v":  # kernel selection and allocator warm-up, untimed
                warm = OffloadConfig(**MODES["all_resident"])
                prepare(manager, model, warm)
                conditioning = encode_prompts(manager, model, warm, "warm up", "", None)
                sample_latents(manager, model, warm, conditioning, dataclasses.replace(params, num_inference_steps=1))
            for mode in modes:
                rows = run_mode(manager, model, mode, MODES[mode], params, image if i2v else None, device,
                                bandwidth, emit)
                summary[(kind, mode)] = rows
            model.release()
            del model, components
    for kind in ("t2v", "i2v"):
        resident = summary.get((kind, "all_resident"))
        defaults = summary.get((kind, "seed_defaults"))
        if resident and defaults:
            no_text = lambda rows: sum(r["seconds"] for k, r in rows.items() if k != "encode")  # noqa: E731
            emit(dict(model=kind, stage="summary", defaults_over_resident_excluding_text=round(
                no_text(defaults) / no_text(resident), 4),
                sampling_peak_vram_gib_defaults=defaults["sample"].get("peak_vram_gib")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
