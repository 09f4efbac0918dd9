"""``python -m video_offload generate ...``: the engine from a shell, with the seed's options as hyphenated flags."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..config import PRECISIONS, SAMPLERS, SamplingParams, option_specs
from ..core.devices import resolve_device
from ..errors import VideoOffloadError
from .loras import LoraChoice

DEMO_SETTINGS = dict(height=256, width=256, num_frames=17, num_inference_steps=8)
"""The demo's size: a tiny random model renders this in seconds on two CPU cores."""
DEMO_MODEL = "tiny-wan2.1-t2v-v1"
"""The demo model's folder in the cache (the version changes when the tiny builder's output does)."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_or_auto(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _help(spec) -> str:
    return f"{spec.doc} (default {spec.default})".replace("%", "%%")  # argparse formats help with %


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m video_offload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="render a video from a text prompt")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", help="a Diffusers-format Wan2.1 folder (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    source.add_argument("--dit", help="single files instead of a folder: the DiT (ComfyUI's diffusion_models/, e.g. "
                                      "wan2.1_t2v_14B_fp8_scaled.safetensors); needs --text-encoder and --vae")
    source.add_argument(
        "--demo", action="store_true", help="build a tiny random-weight model locally and render from it (seconds, CPU)"
    )
    gen.add_argument("--text-encoder", help="with --dit: the text encoder file (umt5_xxl_fp8_e4m3fn_scaled.safetensors)"
                                            " or a Diffusers folder")
    gen.add_argument("--vae", help="with --dit: the VAE file (wan_2.1_vae.safetensors) or a Diffusers folder")
    gen.add_argument("--image-encoder", help="with --dit, image-to-video: the CLIP vision file (clip_vision_h.safetensors)")
    gen.add_argument("--dit-2", help="with --dit, Wan2.2 A14B: the low-noise expert's file (--dit is the high-noise "
                                     "one, e.g. wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors)")
    gen.add_argument("--prompt", default="A curious raccoon peers through a vibrant field of yellow sunflowers.")
    gen.add_argument("--negative-prompt", default="")
    defaults = SamplingParams()
    for name in ("height", "width", "num_frames", "num_inference_steps", "seed"):
        gen.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {getattr(defaults, name)}")
    gen.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    gen.add_argument("--flow-shift", type=float, default=None, help="default: the model folder's")
    gen.add_argument("--sampler", choices=SAMPLERS, default="model",
                     help="model: its own scheduler (UniPC); euler: first-order steps, for 4-step distilled LoRAs")
    gen.add_argument("--guidance-scale-2", type=float, default=None,
                     help="two-expert models (Wan2.2 A14B): the low-noise expert's guidance (default: --guidance-scale)")
    gen.add_argument("--boundary-ratio", type=float, default=None,
                     help="two-expert models: the high-noise expert runs while t >= ratio*1000 (default: the model's)")
    gen.add_argument("--output-path", default="outputs/", help="a folder, or a file name ending in .mp4")
    gen.add_argument("--fps", type=int, default=16)
    gen.add_argument("--no-save", action="store_true", help="do not write the .mp4")
    gen.add_argument("--lora", action="append", default=[], metavar="[DIT=]FILE[:STRENGTH]",
                     help="a LoRA .safetensors file (ComfyUI's loras/, e.g. a lightx2v 4-step LoRA) at STRENGTH "
                          "(default 1.0), for every DiT or only DIT (transformer; Wan2.2 A14B's low-noise expert: "
                          "transformer_2); repeat for several. Added on the GPU: the weights in RAM stay as they are")
    offload = gen.add_argument_group("offload options (FastVideo's names and defaults)")
    for spec in option_specs():  # one declaration: OffloadConfig's fields
        if spec.kind == "bool":
            offload.add_argument(spec.flag, type=_bool, nargs="?", const=True, default=spec.default, metavar="BOOL",
                                 help=_help(spec))
        elif spec.kind == "choice":
            offload.add_argument(spec.flag, choices=spec.choices, default=spec.default, help=_help(spec))
        else:
            offload.add_argument(spec.flag, type=_int_or_auto if spec.auto else int, default=spec.default,
                                 metavar='N|auto' if spec.auto else "N", help=_help(spec))
    offload.add_argument("--precision", default="auto", choices=PRECISIONS)
    offload.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .generator import VideoGenerator

    sizes = {k: getattr(args, k) for k in ("height", "width", "num_frames", "num_inference_steps", "seed")}
    try:
        resolve_device(args.device)  # a bad --device fails before anything is built or read
        if args.demo:
            model_path = demo_model()
            sizes = {k: (DEMO_SETTINGS.get(k) if v is None else v) for k, v in sizes.items()}
        elif args.dit:
            missing = [flag for flag, value in (("--text-encoder", args.text_encoder), ("--vae", args.vae)) if not value]
            if missing:
                print(f"error: --dit needs {' and '.join(missing)} (the model's other single files)", file=sys.stderr)
                return 2
            model_path = {"dit": args.dit, "text_encoder": args.text_encoder, "vae": args.vae,
                          "image_encoder": args.image_encoder, "dit_2": args.dit_2}
        else:
            model_path = Path(args.model_path)
        sizes = {k: v for k, v in sizes.items() if v is not None}
        options = {spec.name: getattr(args, spec.name) for spec in option_specs()}
        generator = VideoGenerator.from_pretrained(model_path, precision=args.precision, device=args.device, **options)
        frames = generator.generate_video(
            args.prompt,
            negative_prompt=args.negative_prompt,
            guidance_scale=args.guidance_scale,
            guidance_scale_2=args.guidance_scale_2,
            boundary_ratio=args.boundary_ratio,
            flow_shift=args.flow_shift,
            sampler=args.sampler,
            output_path=args.output_path,
            save_video=not args.no_save,
            fps=args.fps,
            observer=ProgressBarObserver(),
            loras=[LoraChoice.parse(text) for text in args.lora],
            **sizes,
        )
    except (VideoOffloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"rendered {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}", file=sys.stderr)
    return 0


def demo_cache() -> Path:
    """Where ``--demo`` keeps its tiny model: the pack's cache folder (``~/.cache/video-offload``)."""
    from ..core.plan_cache import cache_home

    return cache_home()


def demo_model() -> Path:
    """The demo's tiny model, built once into the cache and reused (the builder is deterministic), so runs leave
    no temporary folders behind. Two demos starting at once each build into a private folder; the first rename
    wins and the other's copy is removed."""
    from ..families import open_model
    from ..families.wan.tiny import build_tiny_wan

    target = demo_cache() / DEMO_MODEL
    if target.is_dir():
        try:
            open_model(target)
            return target
        except VideoOffloadError:
            shutil.rmtree(target, ignore_errors=True)  # a damaged cache: build it again
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_tiny_wan(building / "model")
        try:
            os.rename(building / "model", target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


class ProgressBarObserver:
    """A terminal progress bar over denoising steps."""

    def __init__(self) -> None:
        self.bar = None

    def before_step(self, index: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step")

    def after_step(self, index: int, total: int) -> None:
        self.bar.update(1)
        if index + 1 == total:
            self.bar.close()
