"""The offload manager: the one object that knows, and decides, where every weight is.

Nodes and the Python API never move weights themselves; they ask the manager for a component "in use" for a
stage, and the manager places it according to the ``OffloadConfig`` and releases it afterwards. That keeps the
rules (and the log of every placement decision) in one place, and makes the process's memory story auditable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import loading
from .config import OffloadConfig
from .errors import OffloadOutOfMemoryError
from .model_folder import WanModelFolder, inspect_model_folder
from .placement import ModulePlacer, Placement, tensor_bytes

logger = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 16


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class PlacementRecord:
    """One line of the manager's report."""

    model: str
    component: str
    nbytes: int
    placement: Placement
    device: str


@dataclass
class LoadedWan:
    """A Wan folder's components in host memory, loaded lazily: a node that never encodes never loads UMT5."""

    folder: WanModelFolder
    precision: loading.Precision
    dit_dtype: torch.dtype
    vae_dtype: torch.dtype
    components: dict[str, Any] = field(default_factory=dict)
    placers: dict[str, ModulePlacer] = field(default_factory=dict)
    dit_offloader: Any = None
    """The LayerwiseOffloader while the DiT is in layerwise mode."""
    dit_offloader_key: tuple | None = None
    prompt_cache: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    """Recent prompt embeddings (a few MB each), so re-queueing a workflow does not re-encode."""

    @property
    def name(self) -> str:
        return self.folder.path.name


class OffloadManager:
    """Loads Wan models into host memory and places their components on the compute device per stage.

    One per process is the intended use (ComfyUI nodes share one; a ``VideoGenerator`` makes its own unless
    given one). Thread-safe for ComfyUI's single worker thread plus API callers.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self._models: dict[tuple, LoadedWan] = {}
        self._lock = threading.RLock()
        self._logged_no_effect: set[str] = set()

    # ------------------------------------------------------------------ loading

    def load(self, path: str | Path, precision: loading.Precision = loading.Precision()) -> LoadedWan:
        """Check the folder and register it; components are read from disk when first used."""
        folder = inspect_model_folder(path)
        key = (str(folder.path.resolve()), precision)
        with self._lock:
            if key not in self._models:
                self._models[key] = LoadedWan(
                    folder=folder,
                    precision=precision,
                    dit_dtype=loading.resolve_dtype(precision.dit, self.device),
                    vae_dtype=loading.DTYPES[precision.vae],
                )
                logger.info("registered model %s (%s)", folder.path, folder.pipeline_class)
            return self._models[key]

    def _component(self, model: LoadedWan, name: str) -> Any:
        with self._lock:
            if name not in model.components:
                folder = model.folder
                loaders = {
                    "transformer": lambda: loading.load_transformer(folder, model.dit_dtype),
                    "text_encoder": lambda: loading.load_text_encoder(folder, model.dit_dtype),
                    "tokenizer": lambda: loading.load_tokenizer(folder),
                    "vae": lambda: loading.load_vae(folder, model.vae_dtype),
                    "image_encoder": lambda: loading.load_image_encoder(folder, model.vae_dtype),
                    "image_processor": lambda: loading.load_image_processor(folder),
                    "scheduler": lambda: loading.load_scheduler_config(folder),
                }
                model.components[name] = loaders[name]()
                obj = model.components[name]
                if isinstance(obj, nn.Module):
                    logger.info("loaded %s/%s into host memory (%.2f GiB)", model.name, name, tensor_bytes(obj) / 2**30)
            return model.components[name]

    def tokenizer(self, model: LoadedWan) -> Any:
        return self._component(model, "tokenizer")

    def scheduler_config(self, model: LoadedWan) -> tuple[str, dict]:
        return self._component(model, "scheduler")

    def image_processor(self, model: LoadedWan) -> Any:
        return self._component(model, "image_processor")

    # ---------------------------------------------------------------- placement

    def _placer(self, model: LoadedWan, name: str, pin: bool) -> ModulePlacer:
        placer = model.placers.get(name)
        if placer is None or placer.pin_requested != pin:
            if placer is not None:
                placer.close()
            placer = ModulePlacer(f"{model.name}/{name}", self._component(model, name), pin=pin)
            model.placers[name] = placer
        return placer

    @contextlib.contextmanager
    def encoder_in_use(
        self, model: LoadedWan, name: str, cpu_offload: bool, config: OffloadConfig
    ) -> Iterator[tuple[nn.Module, torch.device]]:
        """Yield a text/image encoder or VAE ready to run, and the device it runs on.

        ``text_encoder`` with cpu offload computes on the CPU (FastVideo's meaning). The image encoder and VAE with
        cpu offload are copied to the device for the call and the copy is dropped after. Without offload the
        module is placed on the device and stays there.
        """
        module = self._component(model, name)
        if name == "text_encoder" and cpu_offload:
            self._log_once(f"{model.name}/text_encoder: weights and compute on CPU (text_encoder_cpu_offload)")
            placer = model.placers.get(name)
            if placer is not None:
                placer.to_host()
            yield module, torch.device("cpu")
            return
        placer = self._placer(model, name, pin=config.pin_cpu_memory)
        with self._stage(f"{name} on {self.device}", config):
            if placer.device_buffer is None:
                logger.info(
                    "%s/%s: %.2f GiB copied to %s (%s)", model.name, name, placer.nbytes / 2**30, self.device,
                    "released after use" if cpu_offload else "kept resident",
                )
            placer.to_device(self.device)
            try:
                yield module, self.device
            finally:
                if cpu_offload:
                    placer.to_host()

    def text_compute_device(self, config: OffloadConfig) -> torch.device:
        return torch.device("cpu") if config.text_encoder_cpu_offload else self.device

    def cached_prompt(self, model: LoadedWan, config: OffloadConfig, text: str) -> torch.Tensor | None:
        """The embedding of ``text`` if this model encoded it on the same kind of device before."""
        key = (text, self.text_compute_device(config).type)
        with self._lock:
            hit = model.prompt_cache.pop(key, None)
            if hit is not None:
                model.prompt_cache[key] = hit  # most recently used last
                logger.debug("prompt embedding cache hit")
            return hit

    def cache_prompt(self, model: LoadedWan, config: OffloadConfig, text: str, embeds: torch.Tensor) -> None:
        key = (text, self.text_compute_device(config).type)
        with self._lock:
            model.prompt_cache[key] = embeds
            while len(model.prompt_cache) > PROMPT_CACHE_SIZE:
                model.prompt_cache.pop(next(iter(model.prompt_cache)))

    @contextlib.contextmanager
    def dit_in_use(self, model: LoadedWan, config: OffloadConfig) -> Iterator[nn.Module]:
        """Yield the DiT placed for sampling: streamed layer by layer, or resident on the device."""
        transformer = self._component(model, "transformer")
        if config.dit_cpu_offload and not config.use_fsdp_inference:
            self._log_once(
                "dit_cpu_offload=True has no effect without use_fsdp_inference; "
                "on one GPU the DiT's placement is chosen by dit_layerwise_offload"
            )
        with self._stage("DiT sampling", config):
            if config.dit_layerwise_offload:
                self._place_dit_layerwise(model, transformer, config)
            else:
                self._drop_layerwise(model)
                placer = self._placer(model, "transformer", pin=config.pin_cpu_memory)
                if placer.device_buffer is None:
                    logger.info("%s/transformer: resident on %s (%.2f GiB)", model.name, self.device, placer.nbytes / 2**30)
                placer.to_device(self.device)
            yield transformer

    def _place_dit_layerwise(self, model: LoadedWan, transformer: nn.Module, config: OffloadConfig) -> None:
        from .layerwise import LayerwiseOffloader

        key = (config.pin_cpu_memory, config.prefetch_depth, config.resident_blocks)
        if model.dit_offloader is not None and model.dit_offloader_key == key:
            return
        self._drop_layerwise(model)
        placer = model.placers.pop("transformer", None)
        if placer is not None:
            placer.close()
        model.dit_offloader = LayerwiseOffloader(
            transformer,
            transformer.blocks,
            self.device,
            pin_cpu_memory=config.pin_cpu_memory,
            prefetch_depth=config.prefetch_depth,
            resident_blocks=config.resident_blocks,
        )
        model.dit_offloader_key = key

    def _drop_layerwise(self, model: LoadedWan) -> None:
        if model.dit_offloader is not None:
            model.dit_offloader.detach()
            model.dit_offloader = None
            model.dit_offloader_key = None

    # ---------------------------------------------------------------- reporting

    def report(self) -> list[PlacementRecord]:
        """Where every loaded component is now."""
        records = []
        with self._lock:
            for model in self._models.values():
                for name, obj in model.components.items():
                    if not isinstance(obj, nn.Module):
                        continue
                    placer = model.placers.get(name)
                    if name == "transformer" and model.dit_offloader is not None:
                        placement = Placement.LAYERWISE
                    elif placer is not None:
                        placement = placer.placement
                    else:
                        placement = Placement.HOST_PAGEABLE
                    device = str(self.device) if placement in (Placement.GPU, Placement.LAYERWISE) else "cpu"
                    records.append(PlacementRecord(model.name, name, tensor_bytes(obj), placement, device))
        return records

    def release(self, model: LoadedWan) -> None:
        """Drop every device copy of ``model`` and unpin its host memory; the host copy stays loaded."""
        with self._lock:
            self._drop_layerwise(model)
            for placer in model.placers.values():
                placer.close()
            model.placers.clear()
        self._empty_cache()

    def unload_all(self) -> None:
        """Release everything and forget every model (host memory is freed once nothing else refers to it)."""
        with self._lock:
            for model in self._models.values():
                self.release(model)
            self._models.clear()
        self._empty_cache()

    # ------------------------------------------------------------------ helpers

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _log_once(self, message: str) -> None:
        if message not in self._logged_no_effect:
            self._logged_no_effect.add(message)
            logger.info(message)

    @contextlib.contextmanager
    def _stage(self, stage: str, config: OffloadConfig) -> Iterator[None]:
        """Turn a CUDA out-of-memory error into one that names the stage, the free memory and the next option."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            self._empty_cache()
            free = total = None
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
            raise OffloadOutOfMemoryError(stage, free, total, oom_advice(config)) from e


def oom_advice(config: OffloadConfig) -> str:
    """The seed's recommended next step for this configuration."""
    option = config.next_option_to_enable()
    if option is None:
        return (
            "Every offload option is already on. Fix: lower num_frames or the resolution, or use more GPUs "
            "(num_gpus with use_fsdp_inference)."
        )
    if option == "use_fsdp_inference":
        return "Fix: enable use_fsdp_inference (with dit_layerwise_offload=False) to shard the DiT over the GPUs."
    if option in ("image_encoder_cpu_offload", "vae_cpu_offload"):
        return "Fix: enable image_encoder_cpu_offload and vae_cpu_offload (the next step of the recommended order)."
    return f"Fix: enable {option} (the next step of the recommended order)."
