"""The offload manager: the one object that knows, and decides, where every weight is.

Nodes and the Python API never move weights themselves; they ask the manager for a component "in use" for a
stage, and the manager places it according to the ``OffloadConfig`` and releases it afterwards. That keeps the
rules (and the log line of every placement decision) in one place.

The manager keeps only weak references to models: whoever holds a ``LoadedWan`` (a ``VideoGenerator``, or
ComfyUI's output cache through a node's output) keeps it alive, and when the last holder lets go its device
copies and pinned memory are freed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import loading
from .auto_offload import config_at_level, describe, levels_for
from .config import OffloadConfig
from .errors import OffloadOutOfMemoryError
from .loaded_model import LoadedWan
from .memory_guard import BudgetExceeded, oom_guard
from .model_folder import inspect_model_folder
from .placement import ModulePlacer, Placement, tensor_bytes

logger = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 16

MakeRoom = Callable[[int, torch.device], None]
"""Asks the host application to free ``bytes`` on ``device`` (ComfyUI: unload its own models)."""


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


class OffloadManager:
    """Loads Wan models into host memory and places their components on the compute device per stage.

    ``make_room`` is called before large weights are placed on the device, so a host application can free what
    it holds there. ``memory_budget`` caps the bytes of weights this manager keeps on the device; placing beyond
    it fails like an out-of-memory error (with the same advice).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        make_room: MakeRoom | None = None,
        memory_budget: int | None = None,
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.make_room = make_room
        self.memory_budget = memory_budget
        self._models: weakref.WeakValueDictionary[tuple, LoadedWan] = weakref.WeakValueDictionary()
        self._lock = threading.RLock()
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ loading

    def load(self, path: str | Path, precision: loading.Precision = loading.Precision()) -> LoadedWan:
        """Check the folder and register it; components are read from disk when first used."""
        folder = inspect_model_folder(path)
        key = (str(folder.path.resolve()), precision)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = LoadedWan(
                    folder=folder,
                    precision=precision,
                    dit_dtype=loading.resolve_dtype(precision.dit, self.device),
                    vae_dtype=loading.DTYPES[precision.vae],
                )
                self._models[key] = model
                logger.info("registered model %s (%s)", folder.path, folder.pipeline_class)
            return model

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
                obj = loaders[name]()
                model.components[name] = obj
                if isinstance(obj, nn.Module):
                    logger.info("loaded %s/%s into host memory (%.2f GiB)", model.name, name, tensor_bytes(obj) / 2**30)
            return model.components[name]

    def tokenizer(self, model: LoadedWan) -> Any:
        return self._component(model, "tokenizer")

    def scheduler_config(self, model: LoadedWan) -> tuple[str, dict]:
        return self._component(model, "scheduler")

    def image_processor(self, model: LoadedWan) -> Any:
        return self._component(model, "image_processor")

    # ------------------------------------------------------------ configuration

    def effective_config(self, model: LoadedWan, config: OffloadConfig) -> OffloadConfig:
        """``config`` itself, or with ``auto_offload`` the options of the level this model has reached."""
        if not config.auto_offload:
            return config
        effective = config_at_level(config, model.auto_level)
        self._log_once(f"{model.name}: auto offload uses {describe(levels_for(config)[model.auto_level])}")
        return effective

    def escalate(self, model: LoadedWan, config: OffloadConfig, error: OffloadOutOfMemoryError) -> bool:
        """After an OOM in auto mode: move to the next level of the recommended order. False when none is left."""
        levels = levels_for(config)
        if not config.auto_offload or model.auto_level + 1 >= len(levels):
            return False
        model.auto_level += 1
        logger.warning(
            "auto offload: out of memory during %s; now using %s and retrying",
            error.stage,
            describe(levels[model.auto_level]),
        )
        self.release(model)
        return True

    # ---------------------------------------------------------------- placement

    def _placer(self, model: LoadedWan, name: str, pin: bool) -> ModulePlacer:
        placers = model.resources.placers
        placer = placers.get(name)
        if placer is None or placer.pin_requested != pin:
            if placer is not None:
                placer.close()
            placer = ModulePlacer(f"{model.name}/{name}", self._component(model, name), pin=pin)
            placers[name] = placer
        return placer

    def _place(self, model: LoadedWan, name: str, placer: ModulePlacer, keep: bool) -> None:
        if placer.device_buffer is not None:
            return
        self._reserve(placer.nbytes)
        placer.to_device(self.device)
        logger.info(
            "%s/%s: %.2f GiB on %s (%s)", model.name, name, placer.nbytes / 2**30, self.device,
            "kept resident" if keep else "released after use",
        )

    @contextlib.contextmanager
    def encoder_in_use(
        self, model: LoadedWan, name: str, cpu_offload: bool, config: OffloadConfig
    ) -> Iterator[tuple[nn.Module, torch.device]]:
        """Yield a text/image encoder or VAE ready to run, and the device it runs on.

        ``text_encoder`` with cpu offload computes on the CPU (FastVideo's meaning). The image encoder and VAE with
        cpu offload are copied to the device for the call and the copy is dropped after - no copy back, the host
        copy never changed. Without offload the module is placed on the device and stays there.
        """
        module = self._component(model, name)
        if name == "text_encoder" and cpu_offload:
            self._log_once(f"{model.name}/text_encoder: weights and compute on CPU (text_encoder_cpu_offload)")
            placer = model.resources.placers.get(name)
            if placer is not None:
                placer.to_host()
            yield module, torch.device("cpu")
            return
        with self._lock, oom_guard(f"{name} on {self.device}", config, self.device):
            placer = self._placer(model, name, pin=config.pin_cpu_memory)
            self._place(model, name, placer, keep=not cpu_offload)
            try:
                yield module, self.device
            finally:
                if cpu_offload:
                    placer.to_host()
                elif name == "text_encoder" and not self._memory_allows_keeping(placer.nbytes):
                    placer.to_host()
                    logger.info(
                        "%s/text_encoder: released after encoding (%.2f GiB), the device is too full to keep it",
                        model.name, placer.nbytes / 2**30,
                    )

    def _memory_allows_keeping(self, nbytes: int) -> bool:
        """Whether an encoder that is not offloaded may stay on the device after its use: yes while at least half
        of the device (or of the budget) is still free, so the DiT and its activations keep their room."""
        if self.memory_budget is not None:
            return self.device_bytes() <= self.memory_budget // 2
        if self.device.type != "cuda":
            return True
        free, total = torch.cuda.mem_get_info(self.device)
        return free >= total // 2

    @contextlib.contextmanager
    def dit_in_use(self, model: LoadedWan, config: OffloadConfig) -> Iterator[nn.Module]:
        """Yield the DiT placed for sampling: streamed layer by layer, or resident on the device."""
        if config.dit_cpu_offload and not config.use_fsdp_inference:
            self._log_once(
                "dit_cpu_offload=True has no effect without use_fsdp_inference; "
                "on one GPU the DiT's placement is chosen by dit_layerwise_offload"
            )
        with self._lock, oom_guard("DiT sampling", config, self.device):
            if config.dit_layerwise_offload:
                transformer = self._place_dit_layerwise(model, config)
            else:
                model.resources.drop_layerwise()
                transformer = self._component(model, "transformer")
                self._place(model, "transformer", self._placer(model, "transformer", config.pin_cpu_memory), keep=True)
            yield transformer

    def _place_dit_layerwise(self, model: LoadedWan, config: OffloadConfig) -> nn.Module:
        from .layerwise import LayerwiseOffloader

        resources = model.resources
        key = (config.pin_cpu_memory, config.prefetch_depth, config.resident_blocks)
        if resources.dit_offloader is not None and resources.dit_offloader_key == key:
            return model.components["transformer"]
        resources.drop_layerwise()
        placer = resources.placers.pop("transformer", None)
        if placer is not None:
            placer.close()
        options = dict(
            pin_cpu_memory=config.pin_cpu_memory,
            prefetch_depth=config.prefetch_depth,
            resident_blocks=config.resident_blocks,
        )
        if "transformer" in model.components:
            transformer = model.components["transformer"]
            offloader = LayerwiseOffloader(transformer, transformer.blocks, self.device, **options)
        else:
            # Straight from safetensors into the pinned host arena: the DiT is never whole in memory twice.
            offloader = LayerwiseOffloader.from_pretrained(
                model.folder.component("transformer"), self.device, dtype=model.dit_dtype, **options
            )
            model.components["transformer"] = offloader.model
        resources.dit_offloader, resources.dit_offloader_key = offloader, key
        try:
            self._reserve(0)  # the offloader's slots and non-block weights now count against the budget
        except BudgetExceeded:
            resources.drop_layerwise()
            raise
        stats = offloader.stats()
        logger.info(
            "%s/transformer: layerwise, %d of %d blocks stream from %s host memory (%.2f GiB), %d resident, "
            "prefetch depth %d",
            model.name, stats.streamed_blocks, stats.num_blocks, "pinned" if stats.pinned_bytes else "pageable",
            stats.host_bytes / 2**30, stats.resident_blocks, stats.prefetch_depth,
        )
        return offloader.model

    # ------------------------------------------------------------- distributed

    def worker_group(self, model: LoadedWan, config: OffloadConfig) -> Any:
        """The FSDP worker group for this model and options: reused while they are unchanged, else restarted."""
        from .distributed.launcher import WorkerGroup

        resources = model.resources
        key = WorkerGroup.key_for(model, config)
        with self._lock:
            if resources.worker_group is not None and (resources.worker_group_key != key or not resources.worker_group.alive):
                resources.stop_workers()
            if resources.worker_group is None:
                resources.worker_group = WorkerGroup.start(model, config)
                resources.worker_group_key = key
            return resources.worker_group

    # ---------------------------------------------------------------- prompts

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

    # ---------------------------------------------------------------- memory

    def models(self) -> list[LoadedWan]:
        with self._lock:
            return list(self._models.values())

    def device_bytes(self) -> int:
        """Bytes of weights this manager holds on the device now (all models)."""
        total = 0
        for model in self.models():
            resources = model.resources
            total += sum(p.nbytes for p in resources.placers.values() if p.device_buffer is not None)
            if resources.dit_offloader is not None:
                stats = resources.dit_offloader.stats()
                total += stats.slot_bytes + stats.resident_bytes + stats.non_block_bytes
        return total

    def _reserve(self, nbytes: int) -> None:
        """Check the budget and let the host make room before ``nbytes`` more are placed on the device."""
        if self.memory_budget is not None:
            used = self.device_bytes()
            if used + nbytes > self.memory_budget:
                raise BudgetExceeded(
                    f"placing {nbytes} bytes would exceed the budget of {self.memory_budget}",
                    max(self.memory_budget - used, 0),
                    self.memory_budget,
                )
        if self.make_room is not None and nbytes > 0 and self.device.type == "cuda":
            self.make_room(nbytes, self.device)

    # ---------------------------------------------------------------- reporting

    def report(self) -> list[PlacementRecord]:
        """Where every loaded component of every live model is now."""
        records = []
        for model in self.models():
            resources = model.resources
            for name, obj in list(model.components.items()):
                if not isinstance(obj, nn.Module):
                    continue
                placer = resources.placers.get(name)
                if name == "transformer" and resources.dit_offloader is not None:
                    placement = Placement.LAYERWISE
                elif placer is not None:
                    placement = placer.placement
                else:
                    placement = Placement.HOST_PAGEABLE
                device = str(self.device) if placement in (Placement.GPU, Placement.LAYERWISE) else "cpu"
                records.append(PlacementRecord(model.name, name, tensor_bytes(obj), placement, device))
            if resources.worker_group is not None:
                # The DiT lives only in the workers, sharded; its size is that of its weight files.
                files = model.folder.component("transformer").glob("*.safetensors")
                nbytes = sum(f.stat().st_size for f in files)
                records.append(PlacementRecord(model.name, "transformer", nbytes, Placement.FSDP, "workers"))
        return records

    def release(self, model: LoadedWan) -> None:
        """Drop every device copy of ``model``, unpin its host memory, stop its workers; host weights stay."""
        with self._lock:
            model.release()

    def release_all(self) -> None:
        """``release`` every live model (what ComfyUI's "free memory" should mean for this pack)."""
        for model in self.models():
            self.release(model)

    # ------------------------------------------------------------------ helpers

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.info(message)
