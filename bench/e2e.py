"""End-to-end stage timings and peak VRAM for Wan2.1 T2V and I2V, under a VRAM cap, as a consumer GPU would run them.

Real-size configs with random weights (shapes decide speed, not values): UMT5-XXL text encoder, Wan2.1 14B (T2V,
I2V) and 1.3B DiTs, CLIP ViT-H/14 image encoder, Wan VAE. Models are built in host memory (no 60 GB of files on the
device's disk) and run through the pack's own manager and stages, exactly as the nodes run them.

A scenario is a model, a video size, a set of options and a VRAM cap (``torch.cuda.set_per_process_memory_fraction``,
as a smaller card would impose it). One JSON object per row on stdout: per stage (text encode, start-frame encode,
sampling, decode) the seconds and the peak allocated and reserved bytes; per scenario the whole-run peak and time
(text encode excluded) against the all-resident run of the same model and size. Extra rows: the text encoder
streamed through the GPU against the resident one (time, peak, bit-exactness), the DiT's feed-forward in chunks
against whole (bit-exactness on a real-size block), the VAE decode tiled against untiled (peak, time, max diff).

    python bench/e2e.py                   # on a GPU: the issue-10 plan (see PLANS)
    python bench/e2e.py --plan quick      # 480p only
    python bench/e2e.py --tiny            # on a CPU: the same code path on tiny configs, seconds
    python bench/e2e.py --plan wan22      # Wan2.2 A14B I2V, both experts with a LoRA each, 4 euler steps at cfg 1
"""

from __future__ import annotations

import argparse
import os
import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from video_offload.offload.config import OffloadConfig, Precision, SamplingParams  # noqa: E402
from video_offload.offload.families.wan.lean_block import lean_tokens  # noqa: E402
from video_offload.offload.core.loaded_model import LoadedModel  # noqa: E402
from video_offload.offload.core.manager import OffloadManager  # noqa: E402
from video_offload.offload.core.tensors import tensor_bytes  # noqa: E402
from video_offload.offload.families.wan.shapes import CLIP_VIT_H, UMT5_XXL, WAN_DIT, WAN_VAE  # noqa: E402
from video_offload.offload.families.wan.spec import WAN21_I2V, WAN21_T2V  # noqa: E402
from video_offload.offload.families.wan.wan22 import DEFAULT_BOUNDARY, WAN22_A14B_I2V  # noqa: E402
from video_offload.offload.families.wan.tiny import _build_tokenizer  # noqa: E402
from video_offload.offload.pipeline.stages import decode_video, encode_prompts, prepare_image_condition, sample_latents  # noqa: E402
from video_offload.offload.weights.diffusers_folder import DiffusersFolder  # noqa: E402

MODES = {
    "all_resident": dict(
        dit_layerwise_offload=False, image_encoder_cpu_offload=False, vae_cpu_offload=False, text_encoder_cpu_offload=False,
        vae_tiling="off", dit_activation_chunking="off",
    ),
    "layerwise": dict(
        dit_layerwise_offload=True, image_encoder_cpu_offload=False, vae_cpu_offload=False, text_encoder_cpu_offload=False
    ),
    "layerwise+image_vae_offload": dict(
        dit_layerwise_offload=True, image_encoder_cpu_offload=True, vae_cpu_offload=True, text_encoder_cpu_offload=False
    ),
    "seed_defaults": {},
    "seed_defaults_second_run": {},  # the same run again in the same process: first-use costs (kernel selection
                                     # for the tiled VAE's shapes) paid already, as the resident runs after warm-up
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


def build_models(sizes: dict, image_to_video: bool, dtype: torch.dtype, seed: int = 0, two_experts: bool = False) -> dict:
    """Instantiate the components on the meta device, then materialise them in host memory with random values.
    ``two_experts``: Wan2.2 A14B - a second DiT (``transformer_2``, other values) and, for image-to-video, the
    36-channel DiT without CLIP image conditioning (no image encoder)."""
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
        if image_to_video and two_experts:
            dit_config.update(in_channels=36)
        elif image_to_video:
            dit_config.update(in_channels=36, image_dim=sizes["clip"]["hidden_size"],
                              added_kv_proj_dim=dit_config["num_attention_heads"] * dit_config["attention_head_dim"])
        transformer = WanTransformer3DModel(**dit_config)
        transformer_2 = WanTransformer3DModel(**dit_config) if two_experts else None
        vae = AutoencoderKLWan(**sizes["vae"])
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**sizes["clip"])) if image_to_video and not two_experts else None
    components = {
        "text_encoder": materialise(text_encoder, dtype),
        "transformer": materialise(transformer, dtype),
        "vae": materialise(vae, torch.float32),
    }
    if two_experts:
        seed += 1
        components["transformer_2"] = materialise(transformer_2, dtype)
    # Non-persistent buffers (rotary tables) must be computed, not random: rebuild them as __init__ does.
    for name in ("transformer", "transformer_2") if two_experts else ("transformer",):
        components[name].rope = type(components[name].rope)(
            dit_config["attention_head_dim"], dit_config["patch_size"], dit_config["rope_max_seq_len"]
        ).eval()
    text = components["text_encoder"]
    text.encoder.embed_tokens.weight = text.shared.weight  # to_empty untied them; UMT5 shares one embedding
    if image_to_video and not two_experts:
        from transformers import CLIPImageProcessor

        components["image_encoder"] = materialise(image_encoder, torch.float32)
        embeddings = components["image_encoder"].get_submodule("embeddings")
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))  # an index, not a weight
        components["image_processor"] = CLIPImageProcessor(
            crop_size=sizes["clip"]["image_size"], size={"shortest_edge": sizes["clip"]["image_size"]}
        )
    return components


def write_config_folder(root: Path, components: dict, image_to_video: bool, spec=None) -> DiffusersFolder:
    """Configs only (no weights): what the stages read (model index, scheduler, transformer and VAE configs)."""
    from diffusers import UniPCMultistepScheduler

    root.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "transformer_2"):
        if name in components:
            components[name].save_config(root / name)
    components["vae"].save_config(root / "vae")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    ).save_config(root / "scheduler")
    spec = spec or (WAN21_I2V if image_to_video else WAN21_T2V)
    index = {"_class_name": spec.pipeline_class}
    index.update({c.name: ["", next(iter(c.classes))] for c in spec.components})
    if "transformer_2" in components:
        index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=DEFAULT_BOUNDARY[image_to_video])
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


class _PlanSeconds(logging.Handler):
    """Collects the VAE tiling plans' own time on the run's path (``tiling_policy`` logs it with each plan)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "plan_seconds"):
            self.seconds.append(record.plan_seconds)


@contextlib.contextmanager
def measured(device: torch.device, out: dict):
    counters = ("num_alloc_retries", "num_device_alloc", "num_device_free")
    plans = _PlanSeconds()
    policy_log = logging.getLogger("video_offload.offload.families.wan.tiling_policy")
    level = policy_log.level
    policy_log.setLevel(logging.INFO)
    policy_log.addHandler(plans)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = {k: torch.cuda.memory_stats(device).get(k, 0) for k in counters}
    started = time.perf_counter()
    try:
        yield
    finally:
        policy_log.removeHandler(plans)
        policy_log.setLevel(level)
    if plans.seconds:  # planning a tiled VAE pass, on the run's path (included in "seconds")
        out["vae_plan_seconds"] = round(sum(plans.seconds), 4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        out["peak_vram_gib"] = round(out["peak_allocated_bytes"] / 2**30, 3)
        # A cap reached makes the caching allocator free its cache and retry (a device-wide synchronisation that
        # stalls the copy/compute overlap); cudaMalloc/cudaFree calls synchronise as well.
        stats = torch.cuda.memory_stats(device)
        out.update({f"{k}_delta": stats.get(k, 0) - before[k] for k in counters})
    out["seconds"] = round(time.perf_counter() - started, 4)


def set_vram_cap(device: torch.device, cap_gib: float | None) -> None:
    """Cap what this process may allocate on the GPU, the way a smaller card would (None: the whole GPU)."""
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * 2**30 / total), index)


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
    for name in model.dit_names:
        with manager.in_use(model, name, config):
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


PLANS = {
    # (kind, dit, height, width, frames, mode, VRAM cap in GiB or None for the whole GPU)
    "full": [
        ("t2v", "14B", 480, 832, 81, "all_resident", None),
        ("t2v", "14B", 480, 832, 81, "seed_defaults", 6.0),
        ("t2v", "14B", 720, 1280, 81, "all_resident", None),
        ("t2v", "14B", 720, 1280, 81, "seed_defaults", 8.0),
        ("i2v", "14B", 480, 832, 81, "all_resident", None),
        ("i2v", "14B", 480, 832, 81, "seed_defaults", 6.0),
        ("t2v", "1.3B", 480, 832, 81, "seed_defaults", 4.0),
    ],
}
PLANS["quick"] = [row for row in PLANS["full"] if row[2] == 480 and row[1] == "14B"]
PLANS["recheck"] = [  # issue 10's 480p rows that changed, each capped run twice (the smallest model first)
    ("t2v", "1.3B", 480, 832, 81, "seed_defaults", 4.0),
    ("t2v", "1.3B", 480, 832, 81, "seed_defaults_second_run", 4.0),
    ("t2v", "14B", 480, 832, 81, "all_resident", None),
    ("t2v", "14B", 480, 832, 81, "seed_defaults", 6.0),
    ("t2v", "14B", 480, 832, 81, "seed_defaults_second_run", 6.0),
]
PLANS["capped480"] = [  # issue 10's capped 480p runs alone: a process that fills the machine's caches (Triton's
    ("t2v", "14B", 480, 832, 81, "seed_defaults", 6.0),  # kernels, the VAE plans) before a later one is measured
    ("i2v", "14B", 480, 832, 81, "seed_defaults", 6.0),
]
PLANS["i2v480"] = [  # the image-to-video 480p runs alone: on a fresh machine, every first-use cost falls on them
    row for row in PLANS["quick"] if row[0] == "i2v"]
PLANS["wan22"] = [
    # Wan2.2 A14B image-to-video as ComfyUI's template runs it: two experts, a rank-64 LoRA on each (the lightx2v
    # 4-step LoRAs' rank), 4 euler steps at cfg 1 and shift 5 (issue 13).
    ("i2v-a14b", "14B", 480, 832, 81, "all_resident", None),
    ("i2v-a14b", "14B", 480, 832, 81, "seed_defaults", 6.0),
]
PLANS["wan22_capped"] = PLANS["wan22"][1:]  # the capped run alone: fills a machine's caches before a later process
A14B_SAMPLING = dict(num_inference_steps=4, guidance_scale=1.0, flow_shift=5.0, sampler="euler")
A14B_LORA_RANK = 64
PEAK_TARGET_GIB = {("14B", 480): 5.0, ("14B", 720): 7.5, ("1.3B", 480): 3.0}
"""Issue 10's whole-run peak allocated targets (text encode, start-frame encode, sampling and decode)."""


class StepTimer:
    """A denoising observer that marks the start and the end of each step (after a device sync): what sampling
    spends before its first step (placing the DiT, its slots and LoRAs) and each step's own time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started = time.perf_counter()
        self.marks: list[float] = []

    def _mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def before_step(self, index: int, total: int) -> None:
        if index == 0:
            self._mark()

    def after_step(self, index: int, total: int) -> None:
        self._mark()


def run_scenario(manager, model, mode, params, image, device, emit, label: dict) -> dict:
    config = OffloadConfig(**MODES[mode])
    emit(dict(**label, stage="setup", seconds=round(prepare(manager, model, config), 2)))
    # The prompt cache is kept only while the text encoder's placement is the same as in the last scenario: the
    # same encode on the same device would measure nothing new (on the CPU, under the defaults, it takes seconds).
    text_mode = (config.text_encoder_cpu_offload, config.text_encoder_layerwise_offload)
    if getattr(model, "bench_text_mode", None) != text_mode:
        model.prompt_cache.clear()
        model.bench_text_mode = text_mode
    cached = len(model.prompt_cache) > 0
    rows = {}
    out = {}
    with measured(device, out):
        conditioning = encode_prompts(manager, model, config, "A majestic lion strides across the golden savanna.",
                                      "blurry, low quality", image)
    out["prompt_cache_hit"] = cached
    rows["encode"] = out
    if image is not None:  # the VAE encode of the start frame, so "sample" is the DiT alone
        out = {}
        with measured(device, out):
            conditioning = prepare_image_condition(manager, model, config, conditioning, params)
        rows["encode_image_condition"] = out
    out = {}
    timer = StepTimer(device)
    with measured(device, out):
        latents = sample_latents(manager, model, config, conditioning, params, observer=timer,
                                 loras=getattr(model, "bench_loras", None))
    out["before_first_step_s"] = round(timer.marks[0] - timer.started, 4)
    out["step_seconds"] = [round(b - a, 4) for a, b in zip(timer.marks, timer.marks[1:])]
    out["s_per_step"] = round(out["seconds"] / params.num_inference_steps, 4)
    # The slice size dit_activation_chunking chose for the lean block (None: blocks ran whole).
    out["dit_slice_tokens"] = lean_tokens(model.components["transformer"].blocks[0])
    rows["sample"] = out
    out = {}
    with measured(device, out):
        frames = decode_video(manager, model, config, latents)
    out["frames_shape"] = list(frames.shape)
    # the decode's tiles planned in the background while sampling: how long that took, and how long the decode
    # still waited for it
    for key, seconds in manager.background.seconds.items():
        if key[0] == "vae decode tiles" and key[2] == (1, *latents.shape[1:]):
            out["planned_ahead_seconds"] = round(seconds, 4)
            out["waited_for_plan_seconds"] = round(manager.background.waited.get(key, 0.0), 4)
    rows["decode"] = out
    for stage, row in rows.items():
        emit(dict(**label, stage=stage, **row))
    return rows


def text_encoder_streaming_rows(manager, model, device, emit) -> None:
    """UMT5 with its blocks streamed through the GPU against the same encoder resident: time, peak, equality."""
    prompt = "A majestic lion strides across the golden savanna, slow motion, golden hour. " * 8
    results = {}
    model.bench_text_mode = None
    for mode, options in (("resident", dict(text_encoder_cpu_offload=False)),
                          ("streamed", dict(text_encoder_cpu_offload=False, text_encoder_layerwise_offload=True))):
        config = OffloadConfig(**{**MODES["seed_defaults"], **options})
        model.prompt_cache.clear()
        encode_prompts(manager, model, config, "warm up")  # one-time placement (pinning the host copy) untimed
        model.prompt_cache.clear()
        out = {}
        with measured(device, out):
            conditioning = encode_prompts(manager, model, config, prompt)
        results[mode] = conditioning.prompt_embeds
        manager.release(model)
        emit(dict(model="umt5-xxl", mode=mode, stage="text_encode_512_tokens", **out))
    emit(dict(model="umt5-xxl", stage="text_encode_streamed_vs_resident",
              bit_exact=bool(torch.equal(results["resident"], results["streamed"]))))


def chunked_ffn_rows(transformer, device, emit, tokens: int) -> None:
    """A real-size DiT block's feed-forward over sequence chunks against whole: bit-exactness and peak."""
    from video_offload.offload.core.chunking import ChunkingConfig, apply_sequence_chunking, remove_sequence_chunking

    import copy

    ffn = copy.deepcopy(transformer.blocks[0].ffn).to(device)  # a device copy: the shared model stays untouched
    placer_dtype = next(ffn.parameters()).dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(1, tokens, ffn.net[0].proj.in_features, generator=generator) * 0.5).to(device, placer_dtype)
    results = {}
    for mode, size in (("whole", None), ("chunked_8192", 8192), ("chunked_4096", 4096)):
        if size is None:
            remove_sequence_chunking(ffn)
        else:
            apply_sequence_chunking(ffn, ChunkingConfig(size))
        out = {}
        with torch.no_grad(), measured(device, out):
            results[mode] = ffn(x)
        emit(dict(model="dit-ffn", mode=mode, tokens=tokens, stage="ffn_forward", **out,
                  bit_exact_vs_whole=bool(torch.equal(results[mode], results["whole"]))))


def summarize(label: dict, rows: dict, resident: dict | None, emit) -> dict:
    stages = [k for k in rows if k != "encode"]
    peaks = [r.get("peak_allocated_bytes", 0) for r in rows.values()]
    summary = dict(**label, stage="run", whole_run_peak_allocated_gib=round(max(peaks) / 2**30, 3),
                   whole_run_peak_reserved_gib=round(max(r.get("peak_reserved_bytes", 0) for r in rows.values()) / 2**30, 3),
                   seconds_excluding_text_encode=round(sum(rows[k]["seconds"] for k in stages), 3))
    target = PEAK_TARGET_GIB.get((label["dit"], label["height"]))
    if target is not None and label.get("vram_cap_gib") is not None:
        summary["peak_target_gib"] = target
        summary["peak_within_target"] = summary["whole_run_peak_allocated_gib"] <= target
    if resident is not None:
        base = sum(resident[k]["seconds"] for k in resident if k != "encode")
        summary["time_ratio_vs_all_resident"] = round(summary["seconds_excluding_text_encode"] / base, 4)
        summary["dit_step_ratio_vs_all_resident"] = round(rows["sample"]["s_per_step"] / resident["sample"]["s_per_step"], 4)
        summary["time_within_1.05x"] = summary["time_ratio_vs_all_resident"] <= 1.05
        summary["step_within_1.02x"] = summary["dit_step_ratio_vs_all_resident"] <= 1.02
        # Steady state: the median step, without what sampling spends before its first step.
        steady, steady_ref = (statistics.median(r["sample"]["step_seconds"]) for r in (rows, resident))
        summary["steady_step_ratio_vs_all_resident"] = round(steady / steady_ref, 4)
        # The same run at the seed's 50 steps, from these measured stage times (a projection, not a measurement):
        # the stages besides sampling, sampling's start, and 50 median steps.
        def at_50(r):
            other = sum(r[k]["seconds"] for k in r if k not in ("encode", "sample"))
            return other + r["sample"]["before_first_step_s"] + 50 * statistics.median(r["sample"]["step_seconds"])

        if label["model"] != "i2v-a14b":  # the 4-step LoRA run is measured at its own step count
            summary["projected_50_step_time_ratio"] = round(at_50(rows) / at_50(resident), 4)
    emit(summary)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a smoke test of this script")
    parser.add_argument("--plan", default="full", choices=sorted(PLANS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="also append the JSON rows to this file")
    parser.add_argument("--no-extras", action="store_true", help="skip the text-encoder and feed-forward rows")
    parser.add_argument("--offload-cost-only", action="store_true",
                        help="only the per-use copy cost of the offloaded VAE and image encoder (21 repeats)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115 - closed at exit

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out_file:
            out_file.write(line + "\n")
            out_file.flush()

    bandwidth = h2d_bandwidth(device)
    emit(dict(stage="environment", h2d_gb_per_s=round(bandwidth, 2), torch=torch.__version__,
              pytorch_cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              total_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
              if device.type == "cuda" else None))
    sizes_14b = TINY if args.tiny else dict(umt5=UMT5_XXL, dit=WAN_14B, clip=CLIP_VIT_H, vae=WAN_VAE)
    if args.offload_cost_only:
        offload_cost_only(sizes_14b, device, bandwidth, emit)
        return 0
    import numpy as np
    import PIL.Image

    plan = PLANS[args.plan]
    results: dict[tuple, dict] = {}
    built: dict[tuple, tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, dit, height, width, frames, mode, cap in plan:
            key = (kind, dit)
            if key not in built:
                for old in built.values():  # one model family in host memory at a time beyond the current
                    old[1].release()
                built.clear()
                started = time.perf_counter()
                sizes = dict(sizes_14b, dit=TINY["dit"] if args.tiny else WAN_DIT[dit])
                a14b = kind == "i2v-a14b"
                components = build_models(sizes, kind.startswith("i2v"), dtype, two_experts=a14b)
                components["tokenizer"] = _build_tokenizer()
                spec = WAN22_A14B_I2V if a14b else WAN21_I2V if kind == "i2v" else WAN21_T2V
                folder = write_config_folder(Path(tmp) / f"{kind}-{dit}", components, kind.startswith("i2v"), spec)
                dtypes = {"transformer": dtype, "transformer_2": dtype, "text_encoder": dtype, "vae": torch.float32,
                          "image_encoder": torch.float32}
                model = LoadedModel(source=folder, spec=spec, precision=Precision(dit=str(dtype).removeprefix("torch.")),
                                    dtypes=dtypes)
                model.components.update(components)
                if a14b:
                    from layerwise import random_lora  # bench/ is the script's folder, on sys.path

                    model.bench_loras = {name: random_lora(components[name], A14B_LORA_RANK, dtype)
                                         for name in ("transformer", "transformer_2")}
                manager = OffloadManager(device)
                built[key] = (manager, model)
                emit(dict(model=kind, dit=dit, stage="build_random_models", seconds=round(time.perf_counter() - started, 1),
                          bytes={k: tensor_bytes(v) for k, v in components.items() if isinstance(v, torch.nn.Module)}))
                if not args.no_extras and kind == "t2v" and dit == "14B":
                    set_vram_cap(device, None)
                    text_encoder_streaming_rows(manager, model, device, emit)
                    chunked_ffn_rows(model.components["transformer"], device, emit,
                                     tokens=64 if args.tiny else 21 * 30 * 52)
                if device.type == "cuda":  # kernel selection and allocator warm-up, untimed
                    warm = OffloadConfig(**MODES["all_resident"])
                    prepare(manager, model, warm)
                    warm_image = PIL.Image.new("RGB", (832, 480)) if kind.startswith("i2v") else None
                    conditioning = encode_prompts(manager, model, warm, "warm up", "", warm_image)
                    params = SamplingParams(height=480, width=832, num_frames=17, num_inference_steps=1)
                    sample_latents(manager, model, warm, conditioning, params)
            manager, model = built[key]
            if args.tiny:
                height, width, frames = 64, 96, 9
            sampling = A14B_SAMPLING if kind == "i2v-a14b" else dict(num_inference_steps=args.steps)
            params = SamplingParams(height=height, width=width, num_frames=frames, **sampling)
            image = None
            if kind.startswith("i2v"):
                image = PIL.Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype("uint8"))
            manager.release(model)  # each scenario starts with nothing on the device
            set_vram_cap(device, cap)
            # What a card of that size would report as its memory (the cap itself is invisible to the process).
            manager.memory_limit = None if cap is None or device.type != "cuda" else int(cap * 2**30)
            label = dict(model=kind, dit=dit, height=height, width=width, frames=frames, mode=mode, vram_cap_gib=cap)
            try:
                rows = run_scenario(manager, model, mode, params, image, device, emit, label)
            except Exception as e:  # noqa: BLE001 - a failed scenario is a row, the plan goes on
                emit(dict(**label, stage="error", error=f"{type(e).__name__}: {e}"[:2000]))
                manager.release(model)
                continue
            finally:
                set_vram_cap(device, None)
            resident = results.get((kind, dit, height, width, frames, "all_resident"))
            summarize(label, rows, resident if mode != "all_resident" else None, emit)
            results[(kind, dit, height, width, frames, mode)] = rows
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
