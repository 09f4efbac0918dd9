"""Peak host RAM of a whole generation from the files ComfyUI users have, at the pack's defaults (issue 11).

Writes random-weight Comfy-Org-style single files once - the 14B DiT in scaled fp8 (``wan2.1_t2v_14B_fp8_scaled``
or, with ``--i2v``, the I2V 480p one), UMT5-XXL in scaled fp8 with its tokenizer inside
(``umt5_xxl_fp8_e4m3fn_scaled``), the Wan2.1 VAE (bf16) and, with ``--i2v``, CLIP ViT-H (fp16) - then runs one
generation in a fresh process with ``VideoGenerator.from_files`` and every option at its default (layerwise DiT,
text encoder on the CPU from its fp8 form, image encoder and VAE offloaded, pinned memory under the default
``max_pinned_memory_gb="auto"`` budget) and reports its peak RSS (``VmHWM``: loading included) and the RSS after
each stage. Target: peak <= 24 GiB, so a 32 GB machine keeps room for ComfyUI and the OS.

``--ram-gb 32`` computes the "auto" limits as on a 32 GB machine, whatever this machine has: the pin budget (45% of
32 GB) and the host-memory limit (60%), short of which the CPU text encoder is read from its file block by block and
the image encoder is let go after its encode.
One JSON object per row, as the other benches.

    python bench/host_ram.py                       # 14B T2V on the GPU, 480x832, 17 frames, 2 steps
    python bench/host_ram.py --i2v --ram-gb 32     # 14B I2V (+ CLIP ViT-H), pin budget of a 32 GB machine
    python bench/host_ram.py --tiny                # seconds, on CPU: smoke test of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

GiB = 2**30
TARGET_PEAK_RSS = 24 * GiB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/video-offload-bench/host-ram")
    p.add_argument("--i2v", action="store_true", help="image-to-video: the I2V DiT and CLIP ViT-H as well")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ram-gb", type=float, default=None, help="compute the default pin budget as on a machine with this RAM")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 64x64, 5 frames: a CPU smoke test")
    p.add_argument("--out", default=None, help="also write the rows here (default: $OUT/host_ram.jsonl)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.frames, args.height, args.width, args.steps = 5, 64, 64, 1
        args.workdir = str(Path(args.workdir).with_name(Path(args.workdir).name + "-tiny"))
    return args


# ------------------------------------------------------------------------------------------------------ files


def shapes(tiny: bool, i2v: bool) -> dict[str, tuple[type, dict]]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    from video_offload.offload.families.wan.shapes import CLIP_VIT_H, UMT5_XXL, WAN_DIT, WAN_DIT_COMMON, WAN_VAE

    if tiny:
        dit = dict(WAN_DIT_COMMON, num_attention_heads=2, text_dim=32, ffn_dim=64, num_layers=4)
        text = dict(UMT5_XXL, vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        clip = dict(CLIP_VIT_H, hidden_size=80, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                    image_size=32, patch_size=8, projection_dim=32)
        vae = dict(WAN_VAE, base_dim=4)
    else:
        dit, text, clip, vae = dict(WAN_DIT["14B"]), dict(UMT5_XXL), dict(CLIP_VIT_H), dict(WAN_VAE)
    if i2v:
        dit.update(in_channels=36, image_dim=clip["hidden_size"], added_kv_proj_dim=dit["num_attention_heads"] * 128)
    out = {
        "dit": (lambda: WanTransformer3DModel.from_config(dit), dit),
        "text_encoder": (lambda: UMT5EncoderModel(UMT5Config(**text)), text),
        "vae": (lambda: AutoencoderKLWan.from_config(vae), vae),
    }
    if i2v:
        out["image_encoder"] = (lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**clip)), clip)
    return out


FILE_NAMES = {
    ("dit", False): "wan2.1_t2v_14B_fp8_scaled.safetensors",
    ("dit", True): "wan2.1_i2v_480p_14B_fp8_scaled.safetensors",
    ("text_encoder", False): "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    ("vae", False): "wan_2.1_vae.safetensors",
    ("image_encoder", False): "clip_vision_h.safetensors",
}
LAYOUT = {"dit": "fp8_scaled", "text_encoder": "fp8_scaled", "vae": "bf16", "image_encoder": "fp16"}
COMPONENT = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae", "image_encoder": "image_encoder"}


def random_values(shape, seed: int, pool: torch.Tensor) -> torch.Tensor:
    """N(0, 0.02) tiled from a seeded pool (a memcpy per tensor, not an RNG call per element)."""
    numel = 1
    for size in shape:
        numel *= size
    out = torch.empty(numel, dtype=pool.dtype)
    offset, pos = (seed * 7919) % 4099, 0
    while pos < numel:
        n = min(numel - pos, pool.numel() - offset)
        out[pos : pos + n].copy_(pool[offset : offset + n])
        pos += n
        offset = 0
    return out.view(*shape) if shape else out.view(())


def write_files(workdir: Path, tiny: bool, i2v: bool) -> dict[str, Path]:
    from video_offload.offload.families.wan.comfy_export import (
        KEY_LAYOUTS,
        layout_items,
        linear_weight_names,
        tiny_sentencepiece_model,
        write_safetensors,
    )

    workdir.mkdir(parents=True, exist_ok=True)
    pool = torch.randn(2**24 + 4099, generator=torch.Generator().manual_seed(0)) * 0.02
    paths = {}
    for argument, (build, config) in shapes(tiny, i2v).items():
        path = workdir / FILE_NAMES[(argument, i2v and argument == "dit")]
        stamp = path.with_suffix(".json")
        if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(config)):
            paths[argument] = path
            continue
        start = time.perf_counter()
        with torch.device("meta"):
            model = build()
        names = [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n != "encoder.embed_tokens.weight"]
        named = [(n, s, lambda s=s, i=i: random_values(s, i, pool)) for i, (n, s) in enumerate(names)]
        component = COMPONENT[argument]
        items = layout_items(named, KEY_LAYOUTS[component], LAYOUT[argument], linear_weight_names(model)
                             if argument in ("dit", "text_encoder") else set())
        if argument == "text_encoder":
            data = torch.frombuffer(bytearray(tiny_sentencepiece_model()), dtype=torch.uint8)
            items.append(("spiece_model", tuple(data.shape), torch.uint8, lambda: data))
        write_safetensors(path, items)
        stamp.write_text(json.dumps(config))
        print(f"# wrote {path.name}: {path.stat().st_size / GiB:.2f} GiB in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        paths[argument] = path
    return paths


# ------------------------------------------------------------------------------------------------------ child


def status(*keys: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0]) * 1024
    return out


def stage_peak(peaks: dict, stage: str) -> None:
    """Record the peak RSS since the last stage (``VmHWM``) under ``stage``, then restart the count (Linux:
    writing 5 to ``/proc/self/clear_refs`` resets the high-water mark), so a transient peak is pinned to its stage."""
    peaks[stage] = status("VmHWM")["VmHWM"]
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_child(spec: dict) -> dict:
    """One generation at the defaults; RSS after each stage and the peak."""
    import PIL.Image

    from video_offload import VideoGenerator
    from video_offload.offload.core import host_memory
    from video_offload.offload.pipeline.stages import decode_video, encode_prompts, sample_latents
    from video_offload.offload.config import SamplingParams

    physical = host_memory.physical_memory_bytes()
    if spec["ram_gb"]:
        # Every "auto" limit (pinned: 45% of RAM, held: 60%) as on a machine with that much RAM.
        host_memory.physical_memory_bytes = lambda: int(spec["ram_gb"] * 1e9)
    rss = {"start": status("VmRSS")["VmRSS"]}
    peaks: dict[str, int] = {}
    started = time.perf_counter()
    generator = VideoGenerator.from_files(**spec["files"], device=spec["device"])
    params = SamplingParams(height=spec["height"], width=spec["width"], num_frames=spec["frames"],
                            num_inference_steps=spec["steps"], guidance_scale=5.0, seed=0)
    manager, model, config = generator.manager, generator.model, generator.config
    image = PIL.Image.new("RGB", (spec["width"], spec["height"]), (90, 120, 200)) if spec["i2v"] else None
    conditioning = encode_prompts(manager, model, config, "A lion strides across the savanna.", "blurry", image)
    rss["after_encode"] = status("VmRSS")["VmRSS"]
    stage_peak(peaks, "load_and_encode")
    latents = sample_latents(manager, model, config, conditioning, params)
    rss["after_sample"] = status("VmRSS")["VmRSS"]
    stage_peak(peaks, "sample")
    frames = decode_video(manager, model, config, latents)
    rss["after_decode"] = status("VmRSS")["VmRSS"]
    stage_peak(peaks, "decode")
    # A user's next run: a new prompt (and image), encoded with the DiT already in host memory.
    image = PIL.Image.new("RGB", (spec["width"], spec["height"]), (200, 90, 60)) if spec["i2v"] else None
    encode_prompts(manager, model, config, "A heron lands on a misty lake.", "blurry", image)
    rss["after_second_encode"] = status("VmRSS")["VmRSS"]
    stage_peak(peaks, "second_encode")
    overall = max(peaks.values())
    report = {r.component: {"bytes": r.nbytes, "placement": r.placement.value, "device": r.device} for r in generator.report()}
    return {
        "peak_rss_bytes": overall,
        "peak_rss_gib": round(overall / GiB, 2),
        "peak_rss_gib_by_stage": {k: round(v / GiB, 2) for k, v in peaks.items()},
        "rss_bytes": rss,
        "pinned_bytes": manager.pinned_bytes(),
        "pin_limit_bytes": manager.pin_allowance(config) + manager.pinned_bytes(),
        "physical_memory_bytes": physical,
        "host_limit_bytes": manager.host_limit(config),
        "host_short": manager.host_short(model, config),
        "components": report,
        "frames_shape": list(frames.shape),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("CHILD " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    files = write_files(Path(args.workdir), args.tiny, args.i2v)
    spec = {"files": {k: str(v) for k, v in files.items()}, "device": device, "i2v": args.i2v, "frames": args.frames,
            "height": args.height, "width": args.width, "steps": args.steps, "ram_gb": args.ram_gb}
    # A fresh process: its peak RSS is this generation's alone (the files' writing is not counted).
    child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    result = next((json.loads(line[6:]) for line in child.stdout.splitlines() if line.startswith("CHILD ")), None)
    row = {"row": "host_ram", "mode": "i2v" if args.i2v else "t2v", "tiny": args.tiny, "device": device,
           "file_bytes": {k: Path(v).stat().st_size for k, v in files.items()}, **spec, **(result or {})}
    if result is None:
        row["error"] = child.stderr[-4000:]
    else:
        row["targets"] = {"peak_rss_le_24GiB": result["peak_rss_bytes"] <= TARGET_PEAK_RSS,
                          "pinned_le_budget": result["pinned_bytes"] <= result["pin_limit_bytes"]}
    line = json.dumps(row, default=str)
    print(line, flush=True)
    out = args.out or (str(Path(os.environ["OUT"]) / "host_ram.jsonl") if os.environ.get("OUT") else None)
    if out:
        with open(out, "a") as handle:
            handle.write(line + "\n")
    return 0 if result is not None and all(row["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
