"""The Diffusers-folder format adapter: check a model folder before anything is loaded, then load from it.

A missing component, a half-downloaded shard or a pickle checkpoint should fail in milliseconds with a message
that names the file and says what to do - not minutes later from deep inside ``from_pretrained``. Checking reads
``model_index.json`` and every safetensors header (``safetensors_file.read_header``), never the weights. Which
components a folder must have, and which classes each may name, comes from the model family's spec: this module
knows the format, not the models.

Loading a whole component goes through diffusers' and transformers' own ``from_pretrained`` so that dtype rules
(``_keep_in_fp32_modules``) and key layouts are exactly the libraries' - the pipelines we are compared against load
the same way. Loading straight into offloaded memory goes through :meth:`DiffusersFolder.weights`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.spec import ComponentSpec, ModelSpec, Role
from ..errors import ModelLoadError
from .files import check_component_files, check_inside, confinement_root, read_text
from .safetensors_file import TensorEntry, read_header
from .tensor_source import PICKLE_SUFFIXES, SafetensorsWeights, build_empty_model, folder_weight_files, pickle_message

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.json", "scheduler_config.json", "preprocessor_config.json")
WEIGHT_NAMES = ("weight", "bias", "gamma", "beta")
"""Last name components of tensors that are learned weights (and so floating point) in every model."""
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; errors name the file and the fix (a regular file only: see
    ``weights.files``)."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({str(e)[:200]}). Fix: re-download {path.name}.") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, not an object. Fix: re-download {path.name}.")
    return value


class DiffusersFolder:
    """A Diffusers-format model folder: ``model_index.json`` and one subfolder per component."""

    def __init__(self, path: Path, index: dict):
        self.path = path
        self.index = index
        self._configs: dict[str, dict] = {}
        self._entries: dict[str, dict[str, TensorEntry]] = {}

    # ------------------------------------------------------------------ opening and checking

    @classmethod
    def open(cls, path: Any, hint: str) -> DiffusersFolder:
        """Check that ``path`` is a folder with a readable ``model_index.json``; ``hint`` says what to point at.
        A Hugging Face cache folder (``models--Org--Name``, holding ``snapshots/<hash>/``) means its snapshot."""
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise ModelLoadError(f"model_path={path!r} is not a folder path. Fix: {hint}.")
        root = hf_cache_snapshot(Path(path).expanduser())
        if not root.exists():
            raise ModelLoadError(f"model_path={str(root)!r} does not exist. Fix: {hint}.")
        if not root.is_dir():
            if root.suffix in PICKLE_SUFFIXES:
                raise ModelLoadError(pickle_message(root))
            raise ModelLoadError(
                f"model_path={str(root)!r} is a file, not a folder. Fix: {hint}; or load single files (ComfyUI's "
                "diffusion_models, text_encoders, vae files) with VideoGenerator.from_files(dit=..., text_encoder=..., "
                "vae=...) or --dit/--text-encoder/--vae."
            )
        index_path = root / "model_index.json"
        if not index_path.exists():
            raise ModelLoadError(f"{root} has no model_index.json, so it is not a Diffusers-format folder. Fix: {hint}.")
        check_inside(index_path, confinement_root(root), root)
        return cls(root, read_json_object(index_path, "model_index.json"))

    @property
    def pipeline_class(self) -> Any:
        return self.index.get("_class_name")

    def check(self, spec: ModelSpec) -> None:
        """Every component the spec needs is present, names an allowed class, and has whole safetensors files."""
        for component in spec.components:
            if self.index.get(component.name) is None and component.optional:
                continue
            self.check_component(component, spec)

    def check_component(self, component: ComponentSpec, spec: ModelSpec) -> None:
        """One component is present, names an allowed class, and has whole safetensors files (or tokenizer files)
        - also when it is the only part of the folder a model uses (single files mixed with a folder)."""
        index_path = self.path / "model_index.json"
        entry = self.index.get(component.name)
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) and entry[1]):
            raise ModelLoadError(
                f"{index_path} has no '{component.name}' component. Fix: use a complete {spec.pipeline_class} folder."
            )
        if entry[1] not in component.classes:
            raise ModelLoadError(
                f"{index_path}: component '{component.name}' is a {entry[1][:80]!r}; expected one of "
                f"{sorted(component.classes)}. Fix: use an official {spec.family} Diffusers folder."
            )
        folder = self.path / component.name
        if not folder.is_dir():
            raise ModelLoadError(
                f"{self.path} is incomplete: the '{component.name}/' folder is missing. Fix: download it again."
            )
        # Before any file in it is opened (by us, or by transformers' tokenizer and processor loaders).
        check_component_files(folder, confinement_root(self.path))
        if component.role.has_weights:
            check_weights(folder)
            self._check_weight_dtypes(component.name)
            self._check_config_class(component.name, entry[1])
        if component.role is Role.TOKENIZER and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{folder} has neither tokenizer.json nor spiece.model. Fix: download the tokenizer folder again."
            )

    def _check_weight_dtypes(self, component: str) -> None:
        """Weights and biases are floating point; an integer or bool one would load and then fail deep in a
        matrix multiply (or silently compute in integers)."""
        for name, entry in self.tensor_entries(component).items():
            if not entry.dtype.is_floating_point and name.rpartition(".")[2] in WEIGHT_NAMES:
                raise ModelLoadError(
                    f"{self.path / component}: tensor {name[:100]!r} is stored as {entry.dtype}, but weights are "
                    "floating point. The file is corrupt or not a model of this kind. Fix: re-download the "
                    f"'{component}' folder."
                )

    def _check_config_class(self, component: str, class_name: str) -> None:
        """A diffusers ``config.json`` names its class; one that names another class than ``model_index.json``
        belongs to another model (the class is always taken from the index's allow-list, never from here)."""
        named = self.config(component).get("_class_name")
        if named is not None and named != class_name:
            raise ModelLoadError(
                f"{self.path / component / 'config.json'} is the config of a {str(named)[:80]!r}, but model_index.json "
                f"says '{component}' is a {class_name!r}. Fix: re-download the '{component}' folder."
            )

    # ------------------------------------------------------------------ ModelSource

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def identity(self) -> str:
        return str(self.path.resolve())

    def describe(self) -> dict:
        return {"kind": "diffusers_folder", "path": str(self.path.resolve())}

    def pipeline_config(self) -> dict:
        """``model_index.json``'s settings: what is not a component entry nor diffusers' bookkeeping."""
        return {k: v for k, v in self.index.items() if not k.startswith("_") and not isinstance(v, list)}

    def has(self, component: str) -> bool:
        entry = self.index.get(component)
        return isinstance(entry, list) and len(entry) == 2 and bool(entry[1]) and (self.path / component).is_dir()

    def class_name(self, component: str) -> str:
        return self.index[component][1]

    def component_path(self, component: str) -> Path:
        return self.path / component

    def config_path(self, component: str) -> Path:
        """The JSON config file of a component (``config.json``, or the scheduler's/processor's own file)."""
        for file_name in CONFIG_FILES:
            config_path = self.path / component / file_name
            if config_path.exists():  # read_json_object refuses what is not a regular file
                return config_path
        raise ModelLoadError(f"{self.path / component} has no config file. Fix: re-download the '{component}' folder.")

    def config(self, component: str) -> dict:
        """The JSON config of a component, read once."""
        if component not in self._configs:
            self._configs[component] = read_json_object(self.config_path(component), "the config")
        return dict(self._configs[component])

    def weight_files(self, component: str) -> list[Path]:
        return folder_weight_files(self.path / component)

    def narrow_weights(self, component: str) -> bool:
        return False  # Diffusers folders are loaded as from_pretrained loads them

    def weight_bytes(self, component: str) -> int:
        return sum(entry.nbytes for entry in self.tensor_entries(component).values())

    def tensor_entries(self, component: str) -> dict[str, TensorEntry]:
        """Every tensor of a component as its safetensors headers describe it (name, dtype, shape), from every
        shard; read once. What config checks and memory estimates compare against, before anything is built."""
        if component not in self._entries:
            entries: dict[str, TensorEntry] = {}
            for file in self.weight_files(component):
                entries.update(read_header(file)[0])
            self._entries[component] = entries
        return self._entries[component]

    def _class(self, component: ComponentSpec) -> type:
        name = self.class_name(component.name)
        try:
            return component.resolve(name)
        except KeyError:
            raise ModelLoadError(
                f"{self.path / 'model_index.json'}: component '{component.name}' is a {name[:80]!r}; expected one of "
                f"{sorted(component.classes)}."
            ) from None

    def load(self, component: ComponentSpec, dtype: torch.dtype | None) -> Any:
        """The component in host memory: a module (eval, no grad), a tokenizer/processor, or for the scheduler its
        ``(class name, config)`` - schedulers hold per-run state, so each run builds a fresh one."""
        if component.role is Role.SCHEDULER:
            return self.class_name(component.name), self.config(component.name)
        cls = self._class(component)
        path = str(self.path / component.name)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if component.role.has_weights:
            kwargs.update(dtype=dtype, use_safetensors=True)
        elif component.role is Role.TOKENIZER:
            kwargs.update(trust_remote_code=False)
        try:
            loaded = cls.from_pretrained(path, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the component named
            interrupt = _interrupt_in(e)
            if interrupt is not None:  # Ctrl+C (or the host's Cancel) that a library wrapped: not a damaged file
                raise interrupt from None
            raise ModelLoadError(
                f"Loading '{component.name}' from {path} failed: {type(e).__name__}: {str(e)[:300]}. Fix: check that "
                "the folder is a complete, uncorrupted download (delete and re-download the component if unsure)."
            ) from e
        if isinstance(loaded, nn.Module):
            loaded = loaded.eval().requires_grad_(False)
        return loaded

    def weights(self, component: ComponentSpec, dtype: torch.dtype | None) -> SafetensorsWeights:
        cls = self._class(component)
        return SafetensorsWeights(
            self.weight_files(component.name), dtype, getattr(cls, "_keep_in_fp32_modules", None),
            describe=str(self.path / component.name),
        )

    def empty_model(self, component: ComponentSpec, dtype: torch.dtype | None) -> nn.Module:
        cls = self._class(component)
        return build_empty_model(cls, self.config(component.name), dtype, str(self.path / component.name))


def _interrupt_in(error: BaseException) -> BaseException | None:
    """A user's interrupt (``KeyboardInterrupt``, ComfyUI's ``InterruptProcessingException``) that ``error`` was
    raised from or while handling, if any. Libraries wrap what they catch into their own errors; loading that was
    interrupted must be reported as interrupted, never as a corrupt model to re-download."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt) or type(current).__name__ == "InterruptProcessingException":
            return current
        current = current.__cause__ or current.__context__
    return None


def check_weights(folder: Path) -> list[Path]:
    """Return the safetensors files of a component after proving each one is whole; refuse pickles."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json. Fix: download the '{folder.name}' folder again.")
    files = folder_weight_files(folder)
    for file in files:
        read_header(file)
    return files


def hf_cache_snapshot(root: Path) -> Path:
    """``root`` itself, or for a Hugging Face cache folder (``models--Org--Name`` with ``snapshots/<hash>/``) the
    snapshot that ``refs/main`` names, else its only (or newest) snapshot holding a ``model_index.json``."""
    snapshots = root / "snapshots"
    if (root / "model_index.json").exists() or not snapshots.is_dir():
        return root
    ref = root / "refs" / "main"
    if ref.is_file():
        named = snapshots / ref.read_text().strip()
        if (named / "model_index.json").is_file():
            return named
    found = [s for s in snapshots.iterdir() if (s / "model_index.json").is_file()]
    return max(found, key=lambda s: s.stat().st_mtime) if found else root


def open_source(description: dict, spec: ModelSpec | None = None) -> Any:
    """Reopen a source from ``describe()`` (in a worker process; single files need the model's ``spec``)."""
    kind = description.get("kind")
    if kind == "single_files" and spec is not None:
        from .single_files import SingleFiles

        return SingleFiles.open(spec, description["files"])
    if kind != "diffusers_folder":
        raise ModelLoadError(f"unknown model source kind {kind!r}")
    path = Path(description["path"])
    return DiffusersFolder(path, read_json_object(path / "model_index.json", "model_index.json"))
