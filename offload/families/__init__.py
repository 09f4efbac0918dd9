"""Model families: one folder per family (``wan/``), each a spec plus the steps only that family knows.

The registry maps what a model folder says it is (``model_index.json``) to a ``ModelSpec``. Families register
themselves when imported; a family defined elsewhere (a test's toy family, a plugin) calls :func:`register`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..core.spec import ModelSpec
from ..errors import ModelLoadError
from ..weights.diffusers_folder import DiffusersFolder

_lock = threading.Lock()
_specs: list[ModelSpec] = []
_hints: dict[str, str] = {}


def register(spec: ModelSpec, hint: str = "") -> ModelSpec:
    """Make ``spec`` known (idempotent by name). ``hint`` describes the family's folders for error messages."""
    with _lock:
        _specs[:] = [s for s in _specs if s.name != spec.name] + [spec]
        if hint:
            _hints.setdefault(spec.family, hint)
    return spec


def unregister(name: str) -> None:
    with _lock:
        _specs[:] = [s for s in _specs if s.name != name]


def registered() -> tuple[ModelSpec, ...]:
    with _lock:
        return tuple(_specs)


def folder_hint() -> str:
    hints = list(dict.fromkeys(_hints.values())) or ["a Diffusers-format model folder"]
    return (
        f"point it at {' or '.join(hints)} that contains model_index.json and the subfolders of its components "
        "(transformer/, text_encoder/, tokenizer/, vae/, scheduler/ ...)"
    )


def spec_for_index(index: dict[str, Any], where: Path) -> ModelSpec:
    """The registered spec that reads a folder with this ``model_index.json``."""
    pipeline_class = index.get("_class_name")
    candidates = [s for s in registered() if s.pipeline_class == pipeline_class]
    for spec in reversed(candidates):  # the most specific (latest registered) first
        if spec.matches is None or spec.matches(index):
            return spec
    supported = sorted({s.pipeline_class for s in registered()})
    raise ModelLoadError(
        f"{where / 'model_index.json'} describes a {str(pipeline_class)[:80]!r}; this pack runs "
        f"{', '.join(supported)} folders. Fix: {folder_hint()}."
    )


def open_model(path: Any) -> tuple[DiffusersFolder, ModelSpec]:
    """Check ``path`` as a model folder of a registered family, before any weight is read; return its source and
    spec. Raises ``ModelLoadError`` naming what is wrong and the fix."""
    folder = DiffusersFolder.open(path, folder_hint())
    spec = spec_for_index(folder.index, folder.path)
    folder.check(spec)
    if spec.check_configs is not None:
        spec.check_configs(folder)  # configs vs bounds and headers, before anything is built
    return folder, spec


from . import wan  # noqa: E402,F401 - the built-in families register themselves
