"""A small stand-in for ComfyUI's executor, for running the pack's workflow files in tests.

It loads the pack the way ComfyUI's ``nodes.load_custom_node`` does (a module spec built from the folder's
``__init__.py``, registered under the folder's name), gives it a ``folder_paths`` module pointing at test folders,
validates each API-format input against the node's ``INPUT_TYPES`` (type, min/max, choices, link types), and
runs the nodes in dependency order. It is deliberately strict: anything ComfyUI would reject, this rejects.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from pathlib import Path
from typing import Any

import torch

PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkflowValidationError(Exception):
    pass


SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
LEGACY_FOLDER_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}


def make_folder_paths(models_dir: Path, output_dir: Path, input_dir: Path | None = None) -> types.ModuleType:
    """A ``folder_paths`` module with ComfyUI 0.3.64's functions the pack uses, rooted at test folders:
    ``models_dir`` is ``<models>/diffusers``, and its siblings are the single-file folders, with ComfyUI's legacy
    aliases (``unet`` before ``diffusion_models``, ``clip`` after ``text_encoders``)."""
    import os

    models = Path(models_dir).parent
    module = types.ModuleType("folder_paths")
    module.folder_names_and_paths = {
        "diffusers": ([str(models_dir)], {"folder"}),
        "diffusion_models": ([str(models / "unet"), str(models / "diffusion_models")], SUPPORTED_PT_EXTENSIONS),
        "text_encoders": ([str(models / "text_encoders"), str(models / "clip")], SUPPORTED_PT_EXTENSIONS),
        "vae": ([str(models / "vae")], SUPPORTED_PT_EXTENSIONS),
        "clip_vision": ([str(models / "clip_vision")], SUPPORTED_PT_EXTENSIONS),
        "loras": ([str(models / "loras")], SUPPORTED_PT_EXTENSIONS),
    }

    def folders(name: str) -> tuple[list[str], set[str]]:
        return module.folder_names_and_paths[LEGACY_FOLDER_NAMES.get(name, name)]

    def get_filename_list(name: str) -> list[str]:
        """Relative paths (subfolders included) of the files with a supported extension, sorted, de-duplicated."""
        directories, extensions = folders(name)
        found = set()
        for directory in directories:
            for dirpath, _, filenames in os.walk(directory, followlinks=True):
                for filename in filenames:
                    if not extensions or os.path.splitext(filename)[-1].lower() in extensions:
                        found.add(os.path.relpath(os.path.join(dirpath, filename), directory))
        return sorted(found)

    def get_full_path(name: str, filename: str) -> str | None:
        """As ComfyUI: the name is normalised so that it cannot leave the folders; the first existing file wins."""
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for directory in folders(name)[0]:
            path = os.path.join(directory, filename)
            if os.path.isfile(path):
                return path
        return None

    module.get_folder_paths = lambda name: list(folders(name)[0])
    module.get_filename_list = get_filename_list
    module.get_full_path = get_full_path
    module.get_output_directory = lambda: str(output_dir)
    module.get_input_directory = lambda: str(input_dir or output_dir)
    return module


def core_nodes(input_dir: Path) -> dict:
    """Stand-ins for the ComfyUI built-in nodes the shipped workflows use, with ComfyUI's inputs and outputs."""
    import numpy as np
    import PIL.Image
    import torch

    class LoadImage:
        """ComfyUI's ``LoadImage``: a file from the input folder -> IMAGE [1, H, W, 3] in 0..1 and a MASK."""

        @classmethod
        def INPUT_TYPES(cls):
            files = sorted(p.name for p in input_dir.iterdir() if p.is_file())
            return {"required": {"image": (files, {"image_upload": True})}}

        RETURN_TYPES = ("IMAGE", "MASK")
        FUNCTION = "load_image"

        def load_image(self, image):
            with PIL.Image.open(input_dir / image) as opened:
                pixels = np.array(opened.convert("RGB")).astype(np.float32) / 255.0
            tensor = torch.from_numpy(pixels)[None]
            return tensor, torch.zeros(tensor.shape[1:3])

    return {"LoadImage": LoadImage}


def comfy_module_name(folder: Path) -> str:
    """ComfyUI registers a custom-node folder under its absolute path, dots replaced (``nodes.load_custom_node``)."""
    return str(folder.resolve()).replace(".", "_x_")


def load_pack(folder: Path, folder_paths: types.ModuleType, extra_modules: dict | None = None):
    """Import the pack from ``folder`` as ComfyUI does, with the given host modules visible during import."""
    module_name = comfy_module_name(folder)
    # ComfyUI imports a pack once per process; tests load it afresh, so drop an earlier load's submodules (they
    # are bound to that load's host modules).
    for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
        del sys.modules[name]
    injected = {"folder_paths": folder_paths, **(extra_modules or {})}
    saved = {name: sys.modules.get(name) for name in injected}
    sys.modules.update(injected)
    try:
        spec = importlib.util.spec_from_file_location(module_name, folder / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


def _check_literal(node_id: str, name: str, spec: tuple, value: Any, custom_validated: bool = False) -> None:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    where = f"node {node_id} input {name!r}"
    if isinstance(kind, list):
        if value not in kind:
            raise WorkflowValidationError(f"{where}: {value!r} not in choices {kind}")
        return
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            raise WorkflowValidationError(f"{where}: {value!r} is not an INT")
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkflowValidationError(f"{where}: {value!r} is not a FLOAT")
    elif kind == "STRING":
        if not isinstance(value, str):
            raise WorkflowValidationError(f"{where}: {value!r} is not a STRING")
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise WorkflowValidationError(f"{where}: {value!r} is not a BOOLEAN")
    else:
        raise WorkflowValidationError(f"{where}: type {kind} must come from a link, got literal {value!r}")
    if custom_validated:  # ComfyUI skips min/max for inputs its VALIDATE_INPUTS takes (execution.validate_inputs)
        return
    if "min" in options and value < options["min"]:
        raise WorkflowValidationError(f"{where}: {value} is below the minimum {options['min']}")
    if "max" in options and value > options["max"]:
        raise WorkflowValidationError(f"{where}: {value} is above the maximum {options['max']}")


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _custom_validation(node_id: str, cls: type, inputs: dict) -> list[str]:
    """ComfyUI's call of a V1 node's ``VALIDATE_INPUTS``: only the inputs it names (all with ``**kwargs``), linked
    ones as None (upstream has not run), before any node runs; a string result is an error for each input passed."""
    validate_function = getattr(cls, "VALIDATE_INPUTS", None)
    if validate_function is None:
        return []
    argspec = inspect.getfullargspec(validate_function)
    names = [a for a in argspec.args if a not in ("cls", "self")]
    passed = {name: (None if is_link(value) else value) for name, value in inputs.items()
              if name in names or argspec.varkw is not None}
    result = validate_function(**passed)
    if result is True:
        return []
    return [f"node {node_id} ({cls.__name__}) {name} - {result}" for name in passed]


def custom_validated_inputs(cls: type) -> set[str]:
    validate_function = getattr(cls, "VALIDATE_INPUTS", None)
    if validate_function is None:
        return set()
    argspec = inspect.getfullargspec(validate_function)
    return {"*"} if argspec.varkw is not None else set(argspec.args)


def validate(prompt: dict, mappings: dict) -> list[str]:
    """Check every node and input, as ComfyUI does before running anything, and report every problem of the graph
    at once; return the node ids in an order where each node follows its inputs."""
    errors: list[str] = []
    for node_id, node in prompt.items():
        cls = mappings.get(node.get("class_type"))
        if cls is None:
            errors.append(f"node {node_id}: unknown class_type {node.get('class_type')!r}")
            continue
        declared = cls.INPUT_TYPES()
        required = declared.get("required", {})
        optional = declared.get("optional", {})
        inputs = node.get("inputs", {})
        custom = custom_validated_inputs(cls)
        for name in required:
            if name not in inputs:
                errors.append(f"node {node_id}: required input {name!r} is missing")
        for name, value in inputs.items():
            spec = required.get(name) or optional.get(name)
            if spec is None:
                errors.append(f"node {node_id}: unexpected input {name!r}")
                continue
            if is_link(value):
                source = prompt.get(value[0])
                if source is None:
                    errors.append(f"node {node_id} input {name!r}: link to missing node {value[0]}")
                    continue
                produced = mappings[source["class_type"]].RETURN_TYPES[value[1]]
                if produced != spec[0]:
                    errors.append(f"node {node_id} input {name!r}: expects {spec[0]}, linked output gives {produced}")
            else:
                try:
                    _check_literal(node_id, name, spec, value, custom_validated=name in custom or "*" in custom)
                except WorkflowValidationError as e:
                    errors.append(str(e))
        errors += _custom_validation(node_id, cls, inputs)
    if errors:
        raise WorkflowValidationError("; ".join(errors))
    order: list[str] = []
    visiting: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in order:
            return
        if node_id in visiting:
            raise WorkflowValidationError(f"node {node_id}: cycle in links")
        visiting.add(node_id)
        for value in prompt[node_id]["inputs"].values():
            if is_link(value):
                visit(value[0])
        visiting.discard(node_id)
        order.append(node_id)

    for node_id in prompt:
        visit(node_id)
    return order


def execute(prompt: dict, mappings: dict, extra_pnginfo: dict | None = None) -> dict[str, Any]:
    """Validate, then run every node; return each node's outputs (a tuple, or the dict an output node returns).
    Hidden inputs are filled as ComfyUI fills them: ``PROMPT`` (this API prompt), ``EXTRA_PNGINFO`` (what the
    frontend sends, ``{"workflow": graph}``), ``UNIQUE_ID``. Nodes run inside ``torch.inference_mode()``, as
    ComfyUI's executor runs a whole prompt (execution.py)."""
    with torch.inference_mode():
        return _execute(prompt, mappings, extra_pnginfo)


def _execute(prompt: dict, mappings: dict, extra_pnginfo: dict | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for node_id in validate(prompt, mappings):
        node = prompt[node_id]
        cls = mappings[node["class_type"]]
        kwargs = {}
        for name, value in node["inputs"].items():
            if is_link(value):
                kwargs[name] = results[value[0]][value[1]]
            else:
                kwargs[name] = value
        hidden_values = {"PROMPT": prompt, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": node_id}
        for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
            kwargs[name] = hidden_values.get(kind)
        results[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
    return results
