"""``VideoGenerator``: the Python API, in the shape of FastVideo's, so its examples run with only the import changed.

    from video_offload import VideoGenerator
    generator = VideoGenerator.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", num_gpus=1, dit_layerwise_offload=True)
    video = generator.generate_video("A curious raccoon ...", output_path="out/", save_video=True)
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import OffloadConfig, Precision, SamplingParams, make_offload_config
from ..core.denoise import StepObserver
from ..core.devices import resolve_device
from ..core.manager import OffloadManager
from ..errors import ConfigError, VideoSaveError
from ..core.weight_patches import PatchFile, PatchSet
from .loras import LoraChoice, as_choice, check_patches, read_lora
from .stages import check_job_memory, check_params_for_model, decode_video, encode_prompts, load_model, sample_latents
from .video_io import save_mp4, validate_fps

logger = logging.getLogger(__name__)


class VideoGenerator:
    """A loaded model plus its offload configuration."""

    def __init__(
        self, model_path: str | Path | dict[str, Any], config: OffloadConfig, precision: Precision, manager: OffloadManager
    ):
        self.config = config
        self.manager = manager
        self.model = load_model(manager, model_path, precision)
        self.last_video_path: Path | None = None
        self._lora_files: dict[tuple, PatchFile] = {}
        """The LoRA files the last video used, by (path, DiT, size and mtime): a strength change reads nothing."""
        """The .mp4 the last ``generate_video`` saved (a counter is appended when a name is taken)."""

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        num_gpus: int = 1,
        *,
        precision: str = "auto",
        vae_precision: str = "float32",
        device: str | None = None,
        manager: OffloadManager | None = None,
        **options: Any,
    ) -> VideoGenerator:
        """Check the options and the model folder (fast: no weights are read until the first generation).

        ``options`` are the offload options of ``OffloadConfig`` by name (FastVideo's seven, plus
        ``prefetch_depth``, ``resident_blocks`` and ``auto_offload``); an unknown name is refused.
        """
        config = make_offload_config(num_gpus=num_gpus, **options)
        precision_config = Precision(dit=precision, vae=vae_precision)
        if manager is None:
            manager = OffloadManager(device)
        elif device is not None and resolve_device(device) != manager.device:
            raise ConfigError("device", device, f"differs from the given manager's device ({manager.device})",
                              "pass either device or manager")
        return cls(model_path, config, precision_config, manager)

    @classmethod
    def from_files(
        cls,
        dit: str | Path,
        text_encoder: str | Path,
        vae: str | Path,
        image_encoder: str | Path | None = None,
        num_gpus: int = 1,
        *,
        dit_2: str | Path | None = None,
        precision: str = "auto",
        vae_precision: str = "float32",
        device: str | None = None,
        manager: OffloadManager | None = None,
        **options: Any,
    ) -> VideoGenerator:
        """A model given as the single files ComfyUI users have (``diffusion_models/wan2.1_t2v_14B_fp8_scaled
        .safetensors``, ``text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors``, ``vae/wan_2.1_vae.safetensors``,
        and for image-to-video ``clip_vision/clip_vision_h.safetensors``); any of them may be a Diffusers folder
        instead. The kind of model is recognised from the DiT's keys and shapes. fp8 weights stay fp8 in host
        memory and are widened on the GPU. Options as :meth:`from_pretrained`; no weight is read yet.

        Wan2.2 A14B is two DiT files: ``dit`` the high-noise expert (``wan2.2_i2v_high_noise_14B_fp8_scaled
        .safetensors``), ``dit_2`` the low-noise one (``..._low_noise_...``); no image encoder."""
        files = {"dit": dit, "text_encoder": text_encoder, "vae": vae, "image_encoder": image_encoder}
        if dit_2 not in (None, ""):
            files["dit_2"] = dit_2
        config = make_offload_config(num_gpus=num_gpus, **options)
        return cls(files, config, Precision(dit=precision, vae=vae_precision), manager or OffloadManager(device))

    def generate_video(
        self,
        prompt: str,
        negative_prompt: str = "",
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        flow_shift: float | None = None,
        guidance_scale_2: float | None = None,
        boundary_ratio: float | None = None,
        seed: int = 0,
        sampler: str = "model",
        output_path: str | Path = "outputs/",
        save_video: bool = True,
        fps: int = 16,
        image: Any = None,
        observer: StepObserver | None = None,
        loras: Sequence[Any] = (),
    ) -> np.ndarray:
        """Generate one video; return its frames ``[F, H, W, 3]`` as float32 in 0..1.

        With ``save_video`` an .mp4 is written into ``output_path`` (a folder, or a file path ending in .mp4).
        ``image`` (image-to-video models) is the start frame: a PIL image, a file path or an ``[H, W, 3]`` array.
        ``guidance_scale_2`` and ``boundary_ratio`` apply to two-expert models (Wan2.2 A14B) only. ``sampler``:
        ``"model"`` (its own scheduler) or ``"euler"`` (first-order steps, for 4-step distilled LoRAs).
        ``loras``: LoRA files for this video, each a path, ``(path, strength)`` or ``(path, strength, dit)`` (a DiT
        component name such as ``transformer_2``; default every DiT), or a ``pipeline.loras.LoraChoice``. They are
        added to the DiT's device copies only: the next call with other LoRAs or strengths reloads nothing.
        Every parameter is checked before any weight is read.
        """
        fps = validate_fps(fps)
        target = check_output(output_path, save_video)  # before any work: a bad path must not cost a generation
        params = SamplingParams(
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2,
            boundary_ratio=boundary_ratio,
            flow_shift=flow_shift,
            seed=seed,
            sampler=sampler,
        )
        check_params_for_model(self.model, params)
        check_job_memory(self.manager, self.model, self.config, params)  # before any weight moves or noise is drawn
        patches = check_patches(self.model, self.lora_patches(loras), self.config.distributed)  # before any encode
        started = time.perf_counter()
        conditioning = encode_prompts(self.manager, self.model, self.config, prompt, negative_prompt, image)
        latents = sample_latents(self.manager, self.model, self.config, conditioning, params, observer, patches)
        frames = decode_video(self.manager, self.model, self.config, latents).numpy()
        logger.info("generated %d frames in %.1f s", frames.shape[0], time.perf_counter() - started)
        if target is not None:
            try:
                path = save_mp4(frames, video_path(target, prompt, params.seed), fps=fps)
            except VideoSaveError as e:
                e.frames = frames  # the work is not lost: the caller can save these elsewhere
                raise
            self.last_video_path = path
            logger.info("saved %s", path)
        return frames

    def lora_patches(self, loras: Sequence[Any]) -> dict[str, PatchSet]:
        """The LoRAs of ``loras`` read for this model (see :meth:`generate_video`). A file the previous call used,
        unchanged (same size and modification time), is not read again; files no longer used are let go."""
        if isinstance(loras, (str, Path, LoraChoice)):
            loras = [loras]
        entries: dict[str, list[tuple[PatchFile, float]]] = {}
        used: dict[tuple, PatchFile] = {}
        for choice in map(as_choice, loras):
            stat = choice.path.stat() if choice.path.is_file() else None
            for dit in (self.model.dit_names if choice.dit is None else (choice.dit,)):
                key = (choice.path.resolve(), dit, stat and (stat.st_size, stat.st_mtime_ns))
                if key not in used:
                    used[key] = self._lora_files.get(key) or read_lora(self.model, dit, choice.path)
                entries.setdefault(dit, []).append((used[key], choice.strength))
        self._lora_files = used
        return {dit: PatchSet(tuple(pairs)) for dit, pairs in entries.items()}

    def report(self) -> list[Any]:
        """Where each of this model's components is now (see ``OffloadManager.report``)."""
        return [r for r in self.manager.report() if r.model == self.model.name]

    def shutdown(self) -> None:
        """Drop device copies and unpin host memory."""
        self.manager.release(self.model)


def check_output(output_path: Any, save_video: Any) -> Path | None:
    """Where a video will be saved (``~`` expanded), or None when ``save_video`` is False; refuses what would only
    fail after the whole generation: a value that is not a path, a NUL, a name too long for the file system, a
    file where a folder must be, a folder the process cannot write to."""
    if not isinstance(save_video, (bool, np.bool_)):
        raise ConfigError("save_video", save_video, "must be True or False", "pass save_video=True or save_video=False")
    if not save_video:
        return None
    fix = 'pass a folder such as "outputs/" or a file path ending in .mp4'
    if not isinstance(output_path, (str, os.PathLike)) or isinstance(output_path, bytes):
        raise ConfigError("output_path", output_path, "must be a folder or .mp4 path given as text", fix)
    text = os.fspath(output_path)
    if not isinstance(text, str):
        raise ConfigError("output_path", output_path, "must be a folder or .mp4 path given as text", fix)
    if not text.strip():
        raise ConfigError("output_path", text, "is empty", fix)
    if "\0" in text:
        raise ConfigError("output_path", text, "contains a NUL character", fix)
    path = Path(text).expanduser()
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise ConfigError("output_path", text, f"has a name longer than {MAX_NAME_BYTES} bytes", "use shorter names")
    folder = path.parent if path.suffix.lower() == ".mp4" else path
    if path.suffix.lower() == ".mp4" and path.is_dir():
        raise ConfigError("output_path", text, "is a folder, but its name ends in .mp4", fix)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("output_path", text, f"leads through {existing}, which is a file, not a folder",
                          "choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("output_path", text, f"cannot be written: {existing} is not writable by this process",
                          "choose an output folder you can write to")
    return path


MAX_NAME_BYTES = 200
"""Longest file or folder name accepted (file systems allow 255 bytes; the counter and the temporary name need
room)."""


def video_path(output_path: str | Path, prompt: str, seed: int) -> Path:
    """``output_path`` itself if it names an .mp4, else a file in that folder named after the prompt and seed.
    The name is a first choice: ``save_mp4`` appends a counter when it is taken, so no video is overwritten."""
    path = Path(output_path).expanduser()
    if path.suffix.lower() == ".mp4":
        return path
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:60] or "video"
    return path / f"{slug}_seed{seed}.mp4"
