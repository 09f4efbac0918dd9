"""A model registered with the manager, and the resources that placing it holds.

Everything that must be freed - device copies, page-locked host buffers, layerwise offloaders' hooks and slots,
a worker group - lives in its ``ModelResources``, which is closed when the model is released *or* garbage
collected. That second path is how ComfyUI's "free memory" reaches us without any hook into ComfyUI: its output
cache holds the only strong reference to a model, and dropping the cache drops the model.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Precision
from .slot_sharing import SharedSlots
from .spec import ModelSource, ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class ModelResources:
    """Device copies, pinned memory, offloaders and worker group of one model. ``close()`` frees them all."""

    name: str
    placers: dict[str, Any] = field(default_factory=dict)
    """``ModulePlacer`` per whole-module component (VAE, encoders, resident DiTs)."""
    offloaders: dict[str, Any] = field(default_factory=dict)
    """``LayerwiseOffloader`` per streamed component: DiTs in layerwise mode, and a text encoder stored narrow
    (fp8) computed on the CPU from its stored form."""
    offloader_keys: dict[str, tuple] = field(default_factory=dict)
    worker_group: Any = None
    """The FSDP worker group while the DiTs are sharded over GPUs."""
    worker_group_key: Any = None
    dit_slots: SharedSlots = field(default_factory=lambda: SharedSlots("DiT experts"))
    """The one set of streaming slots every streamed DiT of the model uses (two experts take turns in it)."""

    def drop_layerwise(self, name: str | None = None) -> None:
        """Close the offloader of DiT ``name`` (every DiT's when None)."""
        for key in [name] if name is not None else list(self.offloaders):
            offloader = self.offloaders.pop(key, None)
            self.offloader_keys.pop(key, None)
            if offloader is not None:
                offloader.close()

    def stop_workers(self) -> None:
        if self.worker_group is not None:
            self.worker_group.shutdown()
            self.worker_group = None
            self.worker_group_key = None

    def close(self) -> None:
        """Idempotent: every device copy dropped, host memory unpinned, workers stopped."""
        self.drop_layerwise()
        self.stop_workers()
        for placer in self.placers.values():
            placer.close()
        self.placers.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("%s: released device memory and pinned host memory", self.name)


class LRUCache:
    """A small thread-safe least-recently-used map (prompt embeddings: a few MB each)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(eq=False)
class LoadedModel:
    """A model's source and spec, its components in host memory as they are loaded, and the resources placing them."""

    source: ModelSource
    spec: ModelSpec
    precision: Precision
    dtypes: dict[str, torch.dtype]
    """Weight dtype of each component with weights (from the precision option its spec names)."""
    components: dict[str, Any] = field(default_factory=dict)
    prompt_cache: LRUCache = field(default_factory=lambda: LRUCache(16))
    """Recent prompt embeddings, so re-queueing a workflow does not re-encode."""
    auto_level: int = 0
    """With auto_offload: how far along the recommended order this model had to go (kept across runs)."""
    resources: ModelResources = field(init=False)

    def __post_init__(self) -> None:
        self.resources = ModelResources(self.source.name)
        # Runs when the model is garbage collected (or at interpreter exit); holds no reference to the model.
        self._finalizer = weakref.finalize(self, self.resources.close)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dit_names(self) -> tuple[str, ...]:
        """The DiTs this model has (a spec may declare optional ones, such as a second expert)."""
        from .spec import Role

        return tuple(c.name for c in self.spec.by_role(Role.DIT) if not c.optional or self.source.has(c.name))

    @property
    def dit_dtype(self) -> torch.dtype:
        return self.dtypes[self.dit_names[0]]

    def release(self) -> None:
        self.resources.close()
