"""A registered Wan model: its checked folder, its components in host memory, and what it holds on devices.

Host weights are loaded lazily (a graph that never encodes never reads UMT5). Everything a model holds outside
ordinary Python memory - device copies, page-locked host buffers, a layerwise offloader's hooks and slots, a
worker group - lives in its ``ModelResources``, which is closed when the model is released *or* garbage
collected. That second path is how ComfyUI's "free memory" reaches us without any hook into ComfyUI: its output
cache holds the only strong reference to a model, and dropping the cache drops the model.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import loading
from .model_folder import WanModelFolder

logger = logging.getLogger(__name__)


@dataclass
class ModelResources:
    """Device copies, pinned memory, offloader and worker group of one model. ``close()`` frees them all."""

    name: str
    placers: dict[str, Any] = field(default_factory=dict)
    """``ModulePlacer`` per whole-module component (VAE, encoders, resident DiT)."""
    dit_offloader: Any = None
    """The ``LayerwiseOffloader`` while the DiT is in layerwise mode."""
    dit_offloader_key: tuple | None = None
    worker_group: Any = None
    """The FSDP worker group while the DiT is sharded over GPUs."""
    worker_group_key: tuple | None = None

    def drop_layerwise(self) -> None:
        if self.dit_offloader is not None:
            self.dit_offloader.close()
            self.dit_offloader = None
            self.dit_offloader_key = None

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


@dataclass(eq=False)
class LoadedWan:
    """A Wan folder's components in host memory, plus the resources placing them."""

    folder: WanModelFolder
    precision: loading.Precision
    dit_dtype: torch.dtype
    vae_dtype: torch.dtype
    components: dict[str, Any] = field(default_factory=dict)
    prompt_cache: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    """Recent prompt embeddings (a few MB each), so re-queueing a workflow does not re-encode."""
    auto_level: int = 0
    """With auto_offload: how far along the recommended order this model had to go (kept across runs)."""
    resources: ModelResources = field(init=False)

    def __post_init__(self) -> None:
        self.resources = ModelResources(self.folder.path.name)
        # Runs when the model is garbage collected (or at interpreter exit); holds no reference to the model.
        self._finalizer = weakref.finalize(self, self.resources.close)

    @property
    def name(self) -> str:
        return self.folder.path.name

    def release(self) -> None:
        self.resources.close()
