"""The single-file format adapter: a model whose components are one ``.safetensors`` file each, as ComfyUI keeps
them (``diffusion_models/``, ``text_encoders/``, ``vae/``, ``clip_vision/``), any of them possibly a Diffusers
folder instead.

What each file must look like - which keys and shapes make it a DiT or a text encoder of the model, the class and
config to build for it, the diffusers/transformers name of each tensor - is the family's knowledge, declared in its
spec (``ModelSpec.files``, ``core.spec.SingleFileFormat``); this module only applies it, so it knows the format and
not the models. What it does know is ComfyUI's file conventions that hold for every model:

- **scaled fp8**: a ``scaled_fp8`` marker tensor says that each fp8 weight ``<module>.weight`` has a float32
  ``<module>.scale_weight`` (ComfyUI ignores the scales of a file without the marker, and so does this adapter);
  weights are widened with ComfyUI's rule (``core.stored_format.dequantize``), either when a component is loaded
  whole or - streamed components - on the compute device, block by block, with the fp8 bytes kept in host memory;
- **pickles are refused** like everywhere in the pack; a truncated or corrupt file is named by the one reader.

Every file is recognised and checked against the model it will build (keys and shapes, on the meta device) when
the source is opened, so a wrong file fails in a second with its name, what it is, and what was expected - not
minutes later from inside a load.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.spec import (
    ComponentSpec,
    DefaultConfig,
    EmbeddedIn,
    FileLayout,
    FileTensor,
    ModelSpec,
    NotThisFile,
    Role,
)
from ..core.stored_format import NARROW_FLOATS
from ..errors import ModelLoadError
from .diffusers_folder import DiffusersFolder
from .safetensors_file import SafetensorsFile, TensorEntry, read_header
from .tensor_source import (
    PICKLE_SUFFIXES,
    SafetensorsWeights,
    build_empty_model,
    keep_in_fp32_modules,
    load_whole,
    pickle_message,
)

logger = logging.getLogger(__name__)

ARGUMENT_ROLES = {
    "dit": Role.DIT,
    "dit_2": Role.DIT,
    "text_encoder": Role.TEXT_ENCODER,
    "vae": Role.VAE,
    "image_encoder": Role.IMAGE_ENCODER,
}
"""The arguments a user passes (``--dit``, ``VideoGenerator.from_files(dit=...)``, a loader node) and the role of the
component each one gives. ``dit_2`` is a model's second DiT (Wan2.2 A14B's low-noise expert)."""


def component_for(spec: ModelSpec, argument: str) -> ComponentSpec | None:
    """The component an argument gives: the first of its role, or for ``dit_2`` the second DiT."""
    found = spec.by_role(ARGUMENT_ROLES[argument])
    index = 1 if argument == "dit_2" else 0
    return found[index] if len(found) > index else None


def argument_for(spec: ModelSpec, component: ComponentSpec) -> str:
    """The argument that gives ``component`` (inverse of :func:`component_for`)."""
    return next(a for a in ARGUMENT_ROLES if component_for(spec, a) is component)

SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
_ABSENT = "\0absent"


def is_bookkeeping(key: str) -> bool:
    """Keys of ComfyUI's scaled fp8 convention, handled here for every format."""
    return key == SCALED_FP8_MARKER or key.endswith(SCALE_SUFFIXES)


def folder_hint_for(argument: str) -> str:
    return f"a Diffusers-format model folder with a '{argument}' component"


@dataclass(frozen=True)
class FilePart:
    """A component read from one single file."""

    path: Path
    entries: Mapping[str, TensorEntry]
    layout: FileLayout

    @property
    def scaled(self) -> bool:
        return SCALED_FP8_MARKER in self.entries

    def key_for(self, name: str) -> str:
        return self.layout.keys.get(name, _ABSENT)

    def scale_key_for(self, key: str) -> str | None:
        if not self.scaled or not key.endswith(".weight"):
            return None
        scale = key[: -len("weight")] + "scale_weight"
        return scale if scale in self.entries else None

    def used_entries(self) -> list[TensorEntry]:
        return [self.entries[key] for key in set(self.layout.keys.values()) if key in self.entries]

    def weights(self, model_cls: type, dtype: torch.dtype | None) -> SafetensorsWeights:
        """The file's tensors under the model's names, cast by ``from_pretrained``'s rules, fp8 widened by
        ComfyUI's (or kept as stored, for a layerwise offloader that asks)."""
        return SafetensorsWeights(
            [self.path], dtype, keep_in_fp32_modules(model_cls, dtype), key_for=self.key_for,
            describe=str(self.path), scale_key_for=self.scale_key_for,
        )

    def empty_model(self, model_cls: type, dtype: torch.dtype | None) -> nn.Module:
        return build_empty_model(model_cls, dict(self.layout.config), dtype, str(self.path))

    @classmethod
    def open(cls, path: Any, fmt: Any, argument: str) -> FilePart:
        """One file read through one format (its header and the format's recognition; no weights)."""
        file, entries = read_single_file(path, argument)
        return cls(file, entries, recognise(file, entries, fmt, argument))


@dataclass(frozen=True)
class FolderPart:
    """A component read from a Diffusers folder (a mix of single files and a folder)."""

    folder: DiffusersFolder


@dataclass(frozen=True)
class EmbeddedPart:
    """A component stored as one tensor inside another component's file (the UMT5 tokenizer)."""

    path: Path
    declaration: EmbeddedIn


@dataclass(frozen=True)
class DefaultPart:
    """A component built from a family default (a scheduler or image processor no single file carries)."""

    declaration: DefaultConfig


Part = FilePart | FolderPart | EmbeddedPart | DefaultPart


def read_single_file(path: Any, argument: str) -> tuple[Path, dict[str, TensorEntry]]:
    """``path`` as a readable safetensors file (its checked header), or a ModelLoadError naming it and the fix."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ModelLoadError(f"{argument}={path!r} is not a file path. Fix: pass the path of a .safetensors file.")
    file = Path(path).expanduser()
    if not file.exists():
        raise ModelLoadError(f"{argument}={str(file)!r} does not exist. Fix: check the path (or the file's folder).")
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(pickle_message(file))
    entries, _ = read_header(file)
    return file, entries


def recognise(file: Path, entries: Mapping[str, TensorEntry], fmt: Any, argument: str) -> FileLayout:
    """The family's reading of ``file``, or a ModelLoadError naming the file, what it is and what was expected."""
    tensors = {key: FileTensor(e.shape, e.dtype) for key, e in entries.items() if not is_bookkeeping(key)}
    try:
        return fmt.recognise(tensors)
    except NotThisFile as e:
        raise ModelLoadError(f"{file} is not {fmt.expected} ({e}). Fix: pick {fmt.expected} for {argument}.") from None


class SingleFiles:
    """A ``ModelSource`` over one file per component (or a Diffusers folder for some); see the module docstring."""

    def __init__(self, spec: ModelSpec, parts: dict[str, Part], given: dict[str, str]):
        self.spec = spec
        self.parts = parts
        self.given = given
        """The user's arguments (``dit``, ``text_encoder``...) -> resolved paths, for ``describe``."""
        self._configs: dict[str, dict] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, spec: ModelSpec, files: Mapping[str, Any]) -> SingleFiles:
        """Resolve every component of ``spec`` from ``files`` (argument -> path; ``ARGUMENT_ROLES``), recognise and
        check each file against the model it builds. Reads headers only."""
        unknown = sorted(set(files) - set(ARGUMENT_ROLES))
        if unknown:
            raise ModelLoadError(f"{unknown[0]}= is not a model file argument. Fix: use {', '.join(ARGUMENT_ROLES)}.")
        given = {argument: path for argument, path in files.items() if path not in (None, "")}
        by_component: dict[str, tuple[str, Any]] = {}
        for argument, path in given.items():
            component = component_for(spec, argument)
            if component is None and argument == "dit_2":
                raise ModelLoadError(
                    f"dit_2={str(path)!r} was given, but {spec.name} models have one DiT. Fix: leave dit_2 empty (it is "
                    "the low-noise expert of a Wan2.2 A14B model, given with its high-noise expert as dit)."
                )
            if component is None:
                raise ModelLoadError(
                    f"{argument}={str(path)!r} was given, but {spec.name} models have no {ARGUMENT_ROLES[argument].value}. "
                    f"Fix: leave {argument} empty (or pick a DiT that uses one)."
                )
            by_component[component.name] = (argument, path)
        parts: dict[str, Part] = {}
        resolved: dict[str, str] = {}
        ordered = sorted(spec.components, key=lambda c: not c.role.has_weights)  # weights first: others follow them
        for component in ordered:
            declaration = spec.files.get(component.name)
            if component.role.has_weights:
                if component.name not in by_component:
                    first = parts.get(spec.first(component.role).name)
                    if isinstance(first, FolderPart) and first.folder.has(component.name):
                        # The second expert of a Diffusers folder given as the DiT comes from the same folder.
                        first.folder.check_component(component, spec)
                        parts[component.name] = first
                        continue
                    if component.optional:
                        continue
                    argument = argument_for(spec, component)
                    expected = getattr(declaration, "expected", "its file")
                    raise ModelLoadError(
                        f"{spec.name} needs a {component.role.value}: {argument} is missing. Fix: pass {argument}= "
                        f"{expected}."
                    )
                argument, path = by_component[component.name]
                parts[component.name], resolved[argument] = cls._weights_part(spec, component, declaration, argument, path)
            elif isinstance(declaration, EmbeddedIn):
                host = parts.get(declaration.component)
                if isinstance(host, FolderPart):
                    host.folder.check_component(component, spec)
                    parts[component.name] = host
                elif isinstance(host, FilePart):
                    if declaration.key not in host.entries:
                        raise ModelLoadError(
                            f"{host.path} has no '{declaration.key}' tensor, which holds the {component.role.value} of "
                            f"this model. Fix: {declaration.missing}."
                        )
                    parts[component.name] = EmbeddedPart(host.path, declaration)
            elif isinstance(declaration, DefaultConfig):
                host = parts.get(declaration.follows)
                if isinstance(host, FolderPart) and host.folder.has(component.name):
                    host.folder.check_component(component, spec)
                    parts[component.name] = host
                elif host is not None or not spec.component(declaration.follows).optional:
                    parts[component.name] = DefaultPart(declaration)
            elif not component.optional:
                raise ModelLoadError(f"{spec.name} declares no single-file form for its '{component.name}' component.")
        source = cls(spec, parts, resolved)
        if spec.check_configs is not None:
            spec.check_configs(source)  # bounds, before anything is built from what the files' shapes say
        source._check_files()
        return source

    @staticmethod
    def _weights_part(spec: ModelSpec, component: ComponentSpec, declaration: Any, argument: str, path: Any):
        if isinstance(path, (str, Path)) and Path(path).expanduser().is_dir():
            folder = DiffusersFolder.open(path, folder_hint_for(component.name))
            folder.check_component(component, spec)
            return FolderPart(folder), str(folder.path.resolve())
        if declaration is None:
            raise ModelLoadError(
                f"{argument}={str(path)!r}: {spec.name} models read their {component.role.value} from a Diffusers folder "
                f"only. Fix: pass {folder_hint_for(component.name)}."
            )
        part = FilePart.open(path, declaration, argument)
        if part.layout.class_name not in component.classes:
            raise ModelLoadError(f"{part.path}: recognised as {part.layout.class_name}, which {component.name} may not be.")
        logger.info("%s: %s (%s)", part.path.name, part.layout.kind, describe_dtypes(part.entries, part.layout))
        return part, str(part.path.resolve())

    def _check_files(self) -> None:
        """Every tensor each file's model needs is in the file with its shape (on the meta device: no memory)."""
        for name, part in self.parts.items():
            if isinstance(part, FilePart):
                component = self.spec.component(name)
                with self.weights(component, None) as weights:
                    weights.apply_dtypes(self.empty_model(component, None))

    # ------------------------------------------------------------------ ModelSource

    @property
    def name(self) -> str:
        dit = self.parts.get(self.spec.first(Role.DIT).name)
        if isinstance(dit, FilePart):
            return dit.path.stem
        if isinstance(dit, FolderPart):
            return dit.folder.name
        return self.spec.name

    @property
    def identity(self) -> str:
        return "files:" + json.dumps(self.given, sort_keys=True)

    def describe(self) -> dict:
        return {"kind": "single_files", "spec": self.spec.name, "files": dict(self.given)}

    def pipeline_config(self) -> dict:
        """The settings of the Diffusers folder the DiT comes from, if it does; single files carry none."""
        dit = self.parts.get(self.spec.first(Role.DIT).name)
        return dit.folder.pipeline_config() if isinstance(dit, FolderPart) else {}

    def has(self, component: str) -> bool:
        return component in self.parts

    def _part(self, component: str) -> Part:
        part = self.parts.get(component)
        if part is None:
            raise ModelLoadError(f"{self.name} has no '{component}' component.")
        return part

    def class_name(self, component: str) -> str:
        part = self._part(component)
        if isinstance(part, FilePart):
            return part.layout.class_name
        if isinstance(part, FolderPart):
            return part.folder.class_name(component)
        return part.declaration.class_name

    def config(self, component: str) -> dict:
        part = self._part(component)
        if isinstance(part, FolderPart):
            return part.folder.config(component)
        if isinstance(part, DefaultPart):
            return dict(part.declaration.config(self.config))
        if isinstance(part, EmbeddedPart):
            return {}
        if component not in self._configs:
            self._configs[component] = full_config(self._class(self.spec.component(component)), part.layout.config)
        return dict(self._configs[component])

    def config_path(self, component: str) -> Any:
        """Where a component's config comes from, for messages: its file (configs of single files are read from
        their tensors' shapes), its folder's config file, or the family's default."""
        part = self._part(component)
        if isinstance(part, FolderPart):
            return part.folder.config_path(component)
        if isinstance(part, (FilePart, EmbeddedPart)):
            return part.path
        return f"{self.spec.name}'s default {component} config"

    def tensor_entries(self, component: str) -> dict[str, TensorEntry]:
        """The component's tensors as the headers describe them, under the model's names (what config checks and
        memory estimates read; a tensor a layout maps under two spellings is listed once, under the shorter)."""
        part = self._part(component)
        if isinstance(part, FolderPart):
            return part.folder.tensor_entries(component)
        if not isinstance(part, FilePart):
            return {}
        by_key: dict[str, str] = {}
        for name, key in part.layout.keys.items():
            if key in part.entries and (key not in by_key or len(name) < len(by_key[key])):
                by_key[key] = name
        return {name: part.entries[key] for key, name in by_key.items()}

    def weight_bytes(self, component: str) -> int:
        part = self._part(component)
        if isinstance(part, FolderPart):
            return part.folder.weight_bytes(component)
        if isinstance(part, FilePart):
            return sum(entry.nbytes for entry in part.used_entries())
        return 0

    def narrow_weights(self, component: str) -> bool:
        part = self.parts.get(component)
        return isinstance(part, FilePart) and any(e.dtype in NARROW_FLOATS for e in part.used_entries())

    def _class(self, component: ComponentSpec) -> type:
        return component.resolve(self.class_name(component.name))

    def weights(self, component: ComponentSpec, dtype: torch.dtype | None) -> SafetensorsWeights:
        part = self._part(component.name)
        if isinstance(part, FolderPart):
            return part.folder.weights(component, dtype)
        if not isinstance(part, FilePart):
            raise ModelLoadError(f"'{component.name}' has no weights")
        return part.weights(self._class(component), dtype)

    def empty_model(self, component: ComponentSpec, dtype: torch.dtype | None) -> nn.Module:
        part = self._part(component.name)
        if isinstance(part, FolderPart):
            return part.folder.empty_model(component, dtype)
        return part.empty_model(self._class(component), dtype)

    def load(self, component: ComponentSpec, dtype: torch.dtype | None) -> Any:
        """The whole component in host memory (narrow weights widened), a tokenizer, a processor, or for the
        scheduler its ``(class name, config)``."""
        part = self._part(component.name)
        if isinstance(part, FolderPart):
            return part.folder.load(component, dtype)
        if isinstance(part, FilePart):
            with self.weights(component, dtype) as weights:
                model = self.empty_model(component, dtype)
                weights.apply_dtypes(model)
                return load_whole(model, weights)
        if isinstance(part, EmbeddedPart):
            return self._load_embedded(component, part)
        config = self.config(component.name)
        if component.role is Role.SCHEDULER:
            return part.declaration.class_name, config
        return component.resolve(part.declaration.class_name)(**config)

    def _load_embedded(self, component: ComponentSpec, part: EmbeddedPart) -> Any:
        declaration = part.declaration
        with SafetensorsFile(part.path) as handle:
            data = handle.read(declaration.key).contiguous().view(torch.uint8).numpy().tobytes()
        try:
            return declaration.build(data)
        except ValueError as e:
            raise ModelLoadError(
                f"{part.path}: the '{declaration.key}' tensor is not a valid {component.role.value} ({e}). "
                f"Fix: {declaration.missing}."
            ) from e


def full_config(model_cls: type, config: Mapping[str, Any]) -> dict:
    """``config`` with every default of ``model_cls`` filled in, as the class would record it - without building
    anything (config checks read it before any model is built). diffusers: the ``__init__`` signature's defaults;
    transformers: the config class's ``to_dict``."""
    if hasattr(model_cls, "from_config"):
        params = inspect.signature(model_cls.__init__).parameters
        defaults = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
        return {**defaults, **dict(config)}
    return model_cls.config_class(**dict(config)).to_dict()


def describe_dtypes(entries: Mapping[str, TensorEntry], layout: FileLayout) -> str:
    """``fp8_e4m3fn 91%, bf16 9% (scaled)``: how a file stores its weights, by bytes."""
    totals: dict[str, int] = {}
    for key in set(layout.keys.values()):
        entry = entries.get(key)
        if entry is not None:
            name = str(entry.dtype).removeprefix("torch.")
            totals[name] = totals.get(name, 0) + entry.nbytes
    whole = sum(totals.values()) or 1
    text = ", ".join(f"{name} {100 * n // whole}%" for name, n in sorted(totals.items(), key=lambda kv: -kv[1]))
    return text + (" (scaled)" if SCALED_FP8_MARKER in entries else "")
