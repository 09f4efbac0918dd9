"""The offload manager: the one object that knows, and decides, where every weight is.

Nodes and the Python API never move weights themselves; they ask the manager for a component "in use" for a
stage, and the manager places it by its role (text encoder, image encoder, VAE, DiT) according to the
``OffloadConfig``, and releases it afterwards. That keeps the rules (and the log line of every placement decision)
in one place.

The manager keeps only weak references to models: whoever holds a ``LoadedModel`` (a ``VideoGenerator``, or
ComfyUI's output cache through a node's output) keeps it alive, and when the last holder lets go its device copies
and pinned memory are freed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import OffloadConfig, Precision
from ..dtypes import resolve_precision
from ..errors import ModelLoadError, OffloadOutOfMemoryError
from .auto_offload import config_at_level, describe, levels_for
from .devices import default_device, resolve_device  # noqa: F401 - default_device stays importable from here
from . import host_memory
from .host_memory import default_pin_limit
from .background import BackgroundWork
from .layerwise import LayerwiseOffloader
from .loaded_model import LoadedModel
from .memory_guard import BudgetExceeded, available_device_bytes, oom_guard
from .placement import ModulePlacer, Placement
from .private_memory import detach_from_files
from .spec import ModelSource, ModelSpec, Role, find_block_list
from .tensors import materialize, tensor_bytes
from .weight_patches import PatchSet

logger = logging.getLogger(__name__)

MakeRoom = Callable[[int, torch.device], None]
"""Asks the host application to free ``bytes`` on ``device`` (ComfyUI: unload its own models)."""

OFFLOAD_OPTION_OF_ROLE = {
    Role.TEXT_ENCODER: "text_encoder_cpu_offload",
    Role.IMAGE_ENCODER: "image_encoder_cpu_offload",
    Role.VAE: "vae_cpu_offload",
}


@dataclass(frozen=True)
class PlacementRecord:
    """One line of the manager's report."""

    model: str
    component: str
    nbytes: int
    placement: Placement
    device: str


@dataclass(frozen=True)
class UseRecord:
    """Where a component was when a stage used it (``OffloadManager.history``: what tests and logs check)."""

    model: str
    component: str
    placement: Placement
    device: str


class OffloadManager:
    """Registers models and places their components on the compute device per stage.

    ``make_room`` is called before large weights are placed on the device, so a host application can free what
    it holds there. ``memory_budget`` caps the bytes of weights this manager keeps on the device; placing beyond
    it fails like an out-of-memory error (with the same advice).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        make_room: MakeRoom | None = None,
        memory_budget: int | None = None,
        memory_limit: int | None = None,
    ):
        self.device = resolve_device(device)  # a bad name or a missing GPU is a ConfigError here
        self.make_room = make_room
        self.memory_budget = memory_budget
        self.memory_limit = memory_limit
        """Device bytes this process should treat as the device's size for memory decisions (tiling, chunking): to
        leave the rest to other programs, or to behave as on a smaller card. None: the device's own."""
        self._models: weakref.WeakValueDictionary[tuple, LoadedModel] = weakref.WeakValueDictionary()
        self._lock = threading.RLock()
        self._logged: set[str] = set()
        self.history: list[UseRecord] = []
        """The last uses of components (bounded), newest last."""
        self.background = BackgroundWork()
        """Work started ahead of the stage that needs it: the DiTs' GPU kernels, compiled from the moment a DiT is
        about to be placed; a decode's tiles, planned while the DiT samples (``pipeline.stages``)."""

    # ------------------------------------------------------------------ loading

    def register(self, source: ModelSource, spec: ModelSpec, precision: Precision = Precision()) -> LoadedModel:
        """Register a checked model; components are read from disk when first used."""
        key = (source.identity, spec.name, precision)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                dtypes = {}
                for component in spec.components:
                    if component.precision == "dit":
                        dtypes[component.name] = resolve_precision(precision.dit, self.device)
                    elif component.precision == "vae":
                        dtypes[component.name] = resolve_precision(precision.vae, self.device)
                model = LoadedModel(source=source, spec=spec, precision=precision, dtypes=dtypes)
                self._models[key] = model
                logger.info("registered model %s (%s)", source.name, spec.name)
            return model

    def component(self, model: LoadedModel, name: str) -> Any:
        """Component ``name`` in host memory, loaded on first use (the whole module; DiTs that stream or shard are
        loaded by their offloader or workers instead)."""
        with self._lock:
            if name not in model.components:
                obj = model.source.load(model.spec.component(name), model.dtypes.get(name))
                detach_from_files(obj)  # never depend on the file staying unchanged (core.private_memory)
                model.components[name] = obj
                if isinstance(obj, nn.Module):
                    logger.info("loaded %s/%s into host memory (%.2f GiB)", model.name, name, tensor_bytes(obj) / 2**30)
            return model.components[name]

    # ------------------------------------------------------------ configuration

    def effective_config(self, model: LoadedModel, config: OffloadConfig) -> OffloadConfig:
        """``config`` itself, or with ``auto_offload`` the options of the level this model has reached."""
        if not config.auto_offload:
            return config
        effective = config_at_level(config, model.auto_level)
        self._log_once(f"{model.name}: auto offload uses {describe(levels_for(config)[model.auto_level])}")
        return effective

    def escalate(self, model: LoadedModel, config: OffloadConfig, error: OffloadOutOfMemoryError) -> bool:
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

    def _placer(self, model: LoadedModel, name: str, pin: bool, config: OffloadConfig | None = None) -> ModulePlacer:
        placers = model.resources.placers
        placer = placers.get(name)
        if placer is None or placer.pin_requested != pin:
            if placer is not None:
                placer.close()
            allowance = self.pin_allowance(config) if config is not None and pin else None
            placer = ModulePlacer(f"{model.name}/{name}", self.component(model, name), pin=pin,
                                  max_pinned_bytes=allowance)
            placers[name] = placer
        return placer

    def pinned_bytes(self) -> int:
        """Host memory this manager's models have page-locked now (arenas of whole components and of streamed
        blocks; worker processes pin their own)."""
        total = 0
        for model in self.models():
            resources = model.resources
            total += sum(placer.arena.pinned_bytes for placer in resources.placers.values())
            total += sum(offloader.stats().pinned_bytes for offloader in resources.offloaders.values())
        return total

    def pin_allowance(self, config: OffloadConfig) -> int:
        """How much more may be pinned under ``max_pinned_memory_gb`` (``auto``: ``host_memory.PIN_SHARE_OF_RAM`` of
        RAM), counting what this manager has pinned already."""
        limit = default_pin_limit() if config.max_pinned_memory_gb == "auto" else config.max_pinned_memory_gb * 2**30
        return max(0, limit - self.pinned_bytes())

    def _place(self, model: LoadedModel, name: str, placer: ModulePlacer, keep: bool) -> None:
        if placer.device_buffer is not None:
            return
        self._reserve(placer.nbytes)
        placer.to_device(self.device)
        logger.info(
            "%s/%s: %.2f GiB on %s (%s)", model.name, name, placer.nbytes / 2**30, self.device,
            "kept resident" if keep else "released after use",
        )

    def _record(self, model: LoadedModel, name: str, placement: Placement, device: torch.device | str) -> None:
        self.history.append(UseRecord(model.name, name, placement, str(device)))
        del self.history[:-64]

    @contextlib.contextmanager
    def in_use(
        self, model: LoadedModel, name: str, config: OffloadConfig, patches: PatchSet | None = None
    ) -> Iterator[tuple[nn.Module, torch.device]]:
        """Yield component ``name`` ready to run, and the device it runs on, placed by its role.

        - text encoder with ``text_encoder_cpu_offload``: weights and compute on the CPU (FastVideo's meaning);
          with ``text_encoder_layerwise_offload`` instead: weights in host memory, blocks streamed through the device,
          whose memory is given back after the encode;
        - image encoder / VAE with their cpu offload: copied to the device for the call and the copy dropped after -
          no copy back, the host copy never changed;
        - without offload: placed on the device and kept there (a text encoder only while the device has room);
        - a DiT: streamed layer by layer (``dit_layerwise_offload``) or resident, carrying ``patches`` (LoRAs with
          their strengths; None: none) in its device copies only (``core.weight_patches``).
        """
        role = model.spec.component(name).role
        if patches and role is not Role.DIT:
            raise ValueError(f"{model.name}/{name} is a {role.value}: weight patches (LoRAs) apply to DiTs only")
        if role is Role.DIT:
            with self._dit_in_use(model, name, config, patches) as dit:
                yield dit, self.device
            return
        cpu_offload = getattr(config, OFFLOAD_OPTION_OF_ROLE[role])
        if role is Role.TEXT_ENCODER and cpu_offload:
            self._log_once(f"{model.name}/{name}: weights and compute on CPU (text_encoder_cpu_offload)")
            placer = model.resources.placers.get(name)
            if placer is not None:
                placer.to_host()
            short = self.host_short(model, config) and self._stored_bytes(model, name) > 0
            if model.source.narrow_weights(name) or short:
                module = self._streamed_on_cpu(model, name, host_copy=not short)
            else:
                model.resources.drop_layerwise(name)  # streamed (through the device, or from its file) before
                module = self.component(model, name)
            self._record(model, name, Placement.HOST_PAGEABLE, "cpu")
            yield module, torch.device("cpu")
            return
        if role is Role.TEXT_ENCODER and config.text_encoder_layerwise_offload:
            with self._lock, oom_guard(f"{name} streamed on {self.device}", config, self.device):
                module = self._place_layerwise(model, name, config, resident_blocks=0)
                self._record(model, name, Placement.LAYERWISE, self.device)
                try:
                    yield module, self.device
                finally:
                    model.resources.offloaders[name].release_device()
            return
        if (role is Role.IMAGE_ENCODER and cpu_offload and name not in model.components
                and self.host_short(model, config)):
            with self._lock, oom_guard(f"{name} on {self.device}", config, self.device):
                module = self._read_to_device(model, name)
                self._record(model, name, Placement.GPU, self.device)
                try:
                    yield module, self.device
                finally:
                    module.to("meta")  # its device memory goes now, whoever still holds the module
            return
        module = self.component(model, name)
        model.resources.drop_layerwise(name)
        with self._lock, oom_guard(f"{name} on {self.device}", config, self.device):
            placer = self._placer(model, name, pin=config.pin_cpu_memory, config=config)
            self._place(model, name, placer, keep=not cpu_offload)
            self._record(model, name, Placement.GPU, self.device)
            try:
                yield module, self.device
            finally:
                if cpu_offload:
                    placer.to_host()
                    if role is Role.IMAGE_ENCODER and self.host_short(model, config):
                        self._let_go(model, name, "until the next start image")
                elif role is Role.TEXT_ENCODER and not self._memory_allows_keeping(placer.nbytes):
                    placer.to_host()
                    logger.info(
                        "%s/%s: released after encoding (%.2f GiB), the device is too full to keep it",
                        model.name, name, placer.nbytes / 2**30,
                    )

    def on_device(self, model: LoadedModel, name: str) -> bool:
        """Whether component ``name``'s weights are on the device now, whole (placed and kept, or placed for a
        call that has not ended)."""
        placer = model.resources.placers.get(name)
        return placer is not None and placer.device_buffer is not None

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
    def _dit_in_use(self, model: LoadedModel, name: str, config: OffloadConfig, patches: PatchSet | None) -> Iterator[nn.Module]:
        if config.dit_cpu_offload and not config.use_fsdp_inference:
            self._log_once(
                "dit_cpu_offload=True has no effect without use_fsdp_inference; "
                "on one GPU the DiT's placement is chosen by dit_layerwise_offload"
            )
        self._warm_up_kernels(model, name, config)
        with self._lock, oom_guard("DiT sampling", config, self.device):
            if not config.dit_layerwise_offload:
                model.resources.drop_layerwise(name)
                dit = self.component(model, name)
                placer = self._placer(model, name, config.pin_cpu_memory, config)
                self._place(model, name, placer, keep=True)
                placer.set_weight_patches(patches)
                self._record(model, name, Placement.GPU, self.device)
                yield dit
                return
            dit = self._place_layerwise(model, name, config, config.resident_blocks)
            model.resources.offloaders[name].set_weight_patches(patches)
            self._record(model, name, Placement.LAYERWISE, self.device)
            try:
                yield dit
            finally:
                offloader = model.resources.offloaders.get(name)
                if offloader is not None and offloader.stats().resident_blocks == 0:
                    # Fully streamed: its slots and outer weights (1.9 GiB on 14B) would sit beside the VAE decode.
                    # Placing them again next run costs one copy of the outer weights (~10 ms on 14B).
                    offloader.release_device()

    def _kernel_key(self, model: LoadedModel, name: str) -> tuple:
        return model.source.identity, name, model.dtypes.get(name), str(self.device)

    def _warm_up_kernels(self, model: LoadedModel, name: str, config: OffloadConfig) -> None:
        """Start compiling the kernels DiT ``name``'s sliced forward launches (the family's ``kernel_compile``), in
        the background, from its config alone: it overlaps the placement and what runs before the first step. Not
        with ``dit_activation_chunking="off"``: the blocks then run their own forward, which needs none."""
        kernel_compile = getattr(model.spec.stages, "kernel_compile", None)
        if kernel_compile is None or self.device.type != "cuda" or config.dit_activation_chunking == "off":
            return
        dtype, device = model.dtypes.get(name), self.device
        self.background.start(self._kernel_key(model, name),
                              lambda: kernel_compile(model.source.config(name), dtype, device), "GPU kernels")

    def wait_for_kernels(self, model: LoadedModel, name: str) -> float:
        """Before the first forward that launches them: wait for DiT ``name``'s background compile (seconds)."""
        return self.background.wait(self._kernel_key(model, name))

    def _place_layerwise(self, model: LoadedModel, name: str, config: OffloadConfig, resident_blocks) -> nn.Module:
        """Component ``name`` (a DiT, or a streamed text encoder) with its blocks streaming from host memory."""
        resources = model.resources
        key = (config.pin_cpu_memory, config.prefetch_depth, resident_blocks, config.max_pinned_memory_gb)
        if name in resources.offloaders and resources.offloader_keys[name] == key:
            return resources.offloaders[name].model
        resources.drop_layerwise(name)
        placer = resources.placers.pop(name, None)
        if placer is not None:
            placer.close()  # unpinned; the module's tensors are its (then pageable) arena views, adopted below
        component = model.spec.component(name)
        narrow = model.source.narrow_weights(name)
        options = dict(
            pin_cpu_memory=config.pin_cpu_memory,
            prefetch_depth=config.prefetch_depth,
            resident_blocks=resident_blocks,
            host_modules=component.host_modules,
            max_pinned_bytes=self.pin_allowance(config) if config.pin_cpu_memory else None,
            # Experts take turns: one set of slots for all of a model's DiTs (core.slot_sharing).
            shared_slots=resources.dit_slots if component.role is Role.DIT else None,
        )
        if not narrow and (name in model.components or component.role is not Role.DIT):
            # Adopt the module loaded in host memory (its tensors move into the arena block by block).
            module = self.component(model, name)
            _, blocks = find_block_list(module)
            offloader = LayerwiseOffloader(module, blocks, self.device, **options)
        else:
            # Straight from the files into the pinned host arena: never whole in memory twice. Stored narrow (fp8):
            # the arena keeps the stored bytes and the blocks are widened on the device, so the model lives only in
            # its offloader (a whole widened copy, if one was loaded for resident use, is dropped).
            dtype = model.dtypes.get(name)
            with model.source.weights(component, dtype) as weights:
                module = model.source.empty_model(component, dtype)
                weights.apply_dtypes(module)
                _, blocks = find_block_list(module)
                offloader = LayerwiseOffloader(module, blocks, self.device, weights=weights, **options)
            offloader.model.requires_grad_(False)
            if narrow:
                model.components.pop(name, None)
            else:
                model.components[name] = offloader.model
        resources.offloaders[name], resources.offloader_keys[name] = offloader, key
        try:
            self._reserve(0)  # the offloader's slots and non-block weights now count against the budget
        except BudgetExceeded:
            resources.drop_layerwise(name)
            raise
        stats = offloader.stats()
        logger.info(
            "%s/%s: layerwise, %d of %d blocks stream from %s host memory (%.2f GiB), %d resident, prefetch depth %d",
            model.name, name, stats.streamed_blocks, stats.num_blocks, "pinned" if stats.pinned_bytes else "pageable",
            stats.host_bytes / 2**30, stats.resident_blocks, stats.prefetch_depth,
        )
        return offloader.model

    def _streamed_on_cpu(self, model: LoadedModel, name: str, host_copy: bool = True) -> nn.Module:
        """A text encoder computed on the CPU block by block - the layerwise pipeline with ``device="cpu"`` - for two
        reasons. Stored narrow (fp8): its blocks stay fp8 in host memory and each is widened into a CPU slot just
        before it runs, so host memory holds about one byte per parameter instead of two or four. Short of host
        memory (``host_copy=False``, see :meth:`host_short`): its blocks are not held at all but read from the file
        as they run, so the process holds one block and the OS page cache, which the kernel may reclaim, the rest."""
        resources = model.resources
        key = ("cpu", host_copy)
        offloader = resources.offloaders.get(name)
        if offloader is not None and resources.offloader_keys.get(name) == key:
            return offloader.model
        resources.drop_layerwise(name)
        placer = resources.placers.pop(name, None)
        if placer is not None:
            placer.close()  # a whole copy placed before: the blocks now come from the file
        component = model.spec.component(name)
        dtype = model.dtypes.get(name)
        model.components.pop(name, None)  # a whole copy loaded before goes before the blocks are read
        weights = model.source.weights(component, dtype)
        try:
            module = model.source.empty_model(component, dtype)
            weights.apply_dtypes(module)
            _, blocks = find_block_list(module)
            offloader = LayerwiseOffloader(module, blocks, torch.device("cpu"), pin_cpu_memory=False, weights=weights,
                                           host_copy=host_copy)
        except BaseException:
            weights.close()
            raise
        if host_copy:
            weights.close()  # without a host copy the offloader keeps reading it, and closes it
        module.requires_grad_(False)
        resources.offloaders[name], resources.offloader_keys[name] = offloader, key
        stats = offloader.stats()
        if host_copy:
            logger.info(
                "%s/%s: computed on the CPU from its stored form: %d blocks, %.2f GiB in host memory, each widened to "
                "%.1f MiB just before it runs", model.name, name, stats.num_blocks, stats.host_bytes / 2**30,
                stats.device_block_bytes / 2**20,
            )
        else:
            logger.info(
                "%s/%s: computed on the CPU with its %d blocks read from the file as they run (held whole, the weights "
                "would exceed max_host_memory_gb): %.2f GiB held, the rest left to the OS file cache",
                model.name, name, stats.num_blocks, (stats.host_bytes + stats.non_block_bytes) / 2**30,
            )
        return offloader.model

    # ------------------------------------------------------------------ host memory

    def host_limit(self, config: OffloadConfig) -> int:
        """Bytes the weights may hold in host memory, all models together (``max_host_memory_gb``; "auto":
        ``host_memory.HOST_SHARE_OF_RAM`` of RAM)."""
        if config.max_host_memory_gb == "auto":
            return host_memory.default_host_limit()
        return config.max_host_memory_gb * 2**30

    def host_short(self, model: LoadedModel, config: OffloadConfig) -> bool:
        """Whether ``model``'s weights, each component held whole in host memory (those not loaded yet at their
        stored size), and what the other models hold now, would exceed :meth:`host_limit`. Then the encoders,
        used once per prompt or image, are not held between uses. Counting the components not loaded yet keeps the
        answer the same from the first encode on (it does not flip once the DiT is loaded)."""
        needed = 0
        for component in model.spec.components:
            if component.role.has_weights and model.source.has(component.name):
                needed += max(self._stored_bytes(model, component.name), self._held_bytes(model, component.name))
        needed += sum(self._held_bytes(other, name) for other in self.models() if other is not model
                      for name in {*other.components, *other.resources.offloaders, *other.resources.placers})
        limit = self.host_limit(config)
        if needed > limit:
            self._log_once(
                f"{model.name}: its weights ({needed / 2**30:.1f} GiB with the other models') exceed "
                f"max_host_memory_gb ({limit / 2**30:.1f} GiB): the encoders are not held between uses"
            )
        return needed > limit

    def _read_to_device(self, model: LoadedModel, name: str) -> nn.Module:
        """Component ``name`` read from its files straight into device memory, one tensor at a time through host
        memory: no host copy of it is ever made (short of host memory, an image encoder used once per image;
        reading it again from the OS file cache costs about what copying a held host copy would)."""
        component = model.spec.component(name)
        dtype = model.dtypes.get(name)
        with model.source.weights(component, dtype) as weights:
            module = model.source.empty_model(component, dtype)
            weights.apply_dtypes(module)
            materialize(module, weights.fill_many, self.device)
        module.to(self.device)  # the buffers computed at construction (CLIP's position ids) are not in the files
        self._log_once(f"{model.name}/{name}: read from its file onto {self.device} for each use, never held in host "
                       "memory (the weights would exceed max_host_memory_gb)")
        return module

    @staticmethod
    def _stored_bytes(model: LoadedModel, name: str) -> int:
        """Bytes of component ``name`` in its files; 0 when it has none (a component handed over in memory)."""
        try:
            return model.source.weight_bytes(name)
        except ModelLoadError:
            return 0

    def _held_bytes(self, model: LoadedModel, name: str) -> int:
        """Host bytes component ``name`` holds now."""
        placer = model.resources.placers.get(name)
        if placer is not None:
            return placer.nbytes
        offloader = model.resources.offloaders.get(name)
        if offloader is not None:
            stats = offloader.stats()
            return stats.host_bytes + (stats.non_block_bytes if offloader.device.type == "cpu" else 0)
        obj = model.components.get(name)
        return tensor_bytes(obj) if isinstance(obj, nn.Module) else 0

    def _let_go(self, model: LoadedModel, name: str, until: str) -> None:
        """Drop component ``name``'s host copy (it is read from its file again when next used)."""
        nbytes = self._held_bytes(model, name)
        placer = model.resources.placers.pop(name, None)
        if placer is not None:
            placer.close()
        model.resources.drop_layerwise(name)
        model.components.pop(name, None)
        host_memory.return_freed_memory()
        logger.info("%s/%s: let go of its host copy (%.2f GiB) %s: the weights would exceed max_host_memory_gb",
                    model.name, name, nbytes / 2**30, until)

    def prefetch_next_dit(self, model: LoadedModel, current: str, following: str, forwards: int) -> None:
        """The denoising loop's notice, before the last step of DiT ``current``: ``following`` runs next, after
        ``forwards`` more forwards of ``current``. When both stream through the shared slots, the last of those
        forwards prefetches ``following``'s first blocks (no stall at the switch); otherwise nothing to do."""
        offloaders = model.resources.offloaders
        if current in offloaders and following in offloaders:
            offloaders[current].hand_over(offloaders[following], forwards)

    def offloader(self, model: LoadedModel, name: str) -> LayerwiseOffloader | None:
        """The layerwise offloader streaming DiT ``name``, if it streams."""
        return model.resources.offloaders.get(name)

    # ------------------------------------------------------------- distributed

    def worker_group(self, model: LoadedModel, key: Any, start: Callable[[], Any]) -> Any:
        """The model's worker group for ``key`` (the options it was launched with): the running one while the key is
        unchanged and it is alive, else a fresh one from ``start()``. The manager owns it (it is stopped with the
        model's other resources); the caller - the pipeline, which knows the distributed layer - says how to start it."""
        resources = model.resources
        with self._lock:
            if resources.worker_group is not None and (resources.worker_group_key != key or not resources.worker_group.alive):
                resources.stop_workers()
            if resources.worker_group is None:
                resources.worker_group = start()
                resources.worker_group_key = key
                self._record(model, ",".join(resources.worker_group.sharded), Placement.FSDP, "workers")
            return resources.worker_group

    # ---------------------------------------------------------------- memory

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def device_bytes(self) -> int:
        """Bytes of weights this manager holds on the device now (all models)."""
        total = 0
        for model in self.models():
            resources = model.resources
            total += sum(p.nbytes for p in resources.placers.values() if p.device_buffer is not None)
            counted_slots: set[int] = set()
            for offloader in resources.offloaders.values():
                if offloader.device != self.device:
                    continue  # a component streamed on the CPU (an fp8 text encoder under CPU offload)
                stats = offloader.stats()
                total += stats.resident_bytes + stats.non_block_bytes
                slots = offloader.slot_set
                if slots is not None and id(slots) not in counted_slots:  # slots shared by experts count once
                    counted_slots.add(id(slots))
                    total += stats.slot_bytes
        return total

    def available_bytes(self) -> int | None:
        """What may still be allocated on the device for activations (free memory, the allocator's unused reserve,
        a per-process cap, ``memory_limit``); None when unknown (the CPU). The weights ``memory_budget`` does not
        enter it."""
        available = available_device_bytes(self.device)
        if self.memory_limit is not None and self.device.type == "cuda":
            limit = max(self.memory_limit - torch.cuda.memory_allocated(self.device), 0)
            available = limit if available is None else min(available, limit)
        return available

    def compact_device_memory(self) -> None:
        """Hand the caching allocator's unused blocks back to the device before a pass whose size was planned from
        free memory (a tiled VAE pass). Why: blocks cached by the stage before (the DiT's slots and activations)
        count as available but come in the wrong sizes; under a card's limit the allocator then fails, frees its
        whole cache and retries, again and again, each time synchronising the device (H200, 6 GiB cap: 12 retries
        and 150 frees made a tiled decode 2.6x slower than the same decode after one release)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
            components = dict(model.components)
            for name, offloader in list(resources.offloaders.items()):
                components.setdefault(name, offloader.model)  # stored narrow: the model lives in its offloader
            for name, obj in components.items():
                if not isinstance(obj, nn.Module):
                    continue
                placer = resources.placers.get(name)
                offloader = resources.offloaders.get(name)
                nbytes = tensor_bytes(obj)
                if offloader is not None:
                    placement = Placement.LAYERWISE
                    stats = offloader.stats()
                    if stats.stored_narrow or not offloader.host_copy:  # what it holds: blocks as stored (or one)
                        nbytes = stats.host_bytes + stats.non_block_bytes
                elif placer is not None:
                    placement = placer.placement
                else:
                    placement = Placement.HOST_PAGEABLE
                device = str(self.device) if placement in (Placement.GPU, Placement.LAYERWISE) else "cpu"
                if offloader is not None:
                    device = str(offloader.device)
                records.append(PlacementRecord(model.name, name, nbytes, placement, device))
            if resources.worker_group is not None:
                # The DiTs live only in the workers, sharded; their size is that of their stored weights.
                for name in resources.worker_group.sharded:
                    nbytes = model.source.weight_bytes(name)
                    records.append(PlacementRecord(model.name, name, nbytes, Placement.FSDP, "workers"))
        return records

    def release(self, model: LoadedModel) -> None:
        """Drop every device copy of ``model``, unpin its host memory, stop its workers; host weights stay."""
        with self._lock:
            model.release()

    def release_all(self) -> None:
        """``release`` every live model (what ComfyUI's "free memory" should mean for this pack)."""
        for model in self.models():
            self.release(model)

    # ------------------------------------------------------------------ helpers

    def log_once(self, message: str) -> None:
        """Log ``message`` at INFO the first time only (a decision repeated every run is said once)."""
        self._log_once(message)

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.info(message)
