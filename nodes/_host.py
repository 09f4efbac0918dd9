"""What the nodes take from ComfyUI when it is there: folder paths, the progress bar, the interrupt flag.

Each facility is imported on its own and only if present, so the pack also works (and is tested) outside
ComfyUI. The engine in ``offload/`` never imports any of this.
"""

from __future__ import annotations

import glob
import threading
from pathlib import Path

from ..offload.errors import ModelLoadError
from ..offload.core.manager import OffloadManager
from ..offload.weights.diffusers_folder import hf_cache_snapshot

try:  # ComfyUI's model folders
    import folder_paths
except ImportError:  # pragma: no cover - depends on the host
    folder_paths = None

try:  # ComfyUI's progress bar and interrupt flag
    import comfy.model_management as comfy_model_management
    import comfy.utils as comfy_utils
except ImportError:  # pragma: no cover - depends on the host
    comfy_model_management = None
    comfy_utils = None

MODEL_FOLDER_KEY = "diffusers"
"""ComfyUI's model folder for Diffusers-format models (``ComfyUI/models/diffusers``)."""

FILE_FOLDER_KEYS = {
    "dit": "diffusion_models",
    "text_encoder": "text_encoders",
    "vae": "vae",
    "image_encoder": "clip_vision",
}
"""ComfyUI's model folder of each component's single files, as its own loaders use them (``diffusion_models``
also covers the legacy ``models/unet``, ``text_encoders`` the legacy ``models/clip``: ComfyUI maps both)."""

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
"""What the file lists offer (ComfyUI lists pickles too; this pack refuses them, so it does not offer them)."""

DIFFUSERS_CHOICE = "[Diffusers folder] "
"""Prefix of the entries of a component list that take the component from a Diffusers folder instead."""

_manager_lock = threading.Lock()
_manager: OffloadManager | None = None


def shared_manager() -> OffloadManager:
    """The process's one offload manager, made on first use.

    ComfyUI instantiates node classes with no context to pass in, so the nodes reach the manager through this
    accessor; it is the only process-wide state in the pack, and nothing is created at import time. The manager
    holds models weakly: ComfyUI's output cache owns them, so its "free memory" frees ours too.
    """
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = OffloadManager(comfyui_device(), make_room=make_room_in_comfyui if comfy_model_management else None)
        return _manager


def comfyui_device():
    """The device ComfyUI chose (``--cpu``, ``--cuda-device``...), or None outside ComfyUI (the manager's default).

    ComfyUI started with ``--cpu`` on a GPU machine means the CPU: the pack must not take the GPU by itself."""
    get_device = getattr(comfy_model_management, "get_torch_device", None)
    return get_device() if get_device is not None else None


def metadata_disabled() -> bool:
    """ComfyUI's ``--disable-metadata``: saved files carry no prompt or workflow."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


def make_room_in_comfyui(nbytes: int, device) -> None:
    """Ask ComfyUI to unload its own models until ``nbytes`` are free on ``device`` (its public API, no patching)."""
    comfy_model_management.free_memory(nbytes, device)


def in_comfyui() -> bool:
    return folder_paths is not None


def model_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER_KEY)] if folder_paths else []


def _hf_cache_repos(root: Path) -> list[Path]:
    """Hugging Face cache folders (``models--Org--Name`` holding a snapshot) under ``root`` or ``root/hub``."""
    found = []
    for pattern in ("models--*--*", "hub/models--*--*"):
        found += [p for p in sorted(root.glob(pattern)) if p.is_dir() and hf_cache_snapshot(p) != p]
    return found


def list_model_folders() -> list[str]:
    """Diffusers folders in ComfyUI's diffusers folders, by the names the workflows use: a folder directly inside
    (``Wan2.1-T2V-1.3B-Diffusers``), one inside an organisation folder both as ``Wan-AI/<repo>`` and as ``<repo>``,
    and a Hugging Face cache folder (``models--Wan-AI--<repo>/snapshots/<hash>``) as ``<repo>``."""
    names = set()
    for root in model_roots():
        if root.is_dir():
            for index in root.glob("*/model_index.json"):
                names.add(index.parent.name)
            for index in root.glob("*/*/model_index.json"):
                names.add(index.parent.relative_to(root).as_posix())
                names.add(index.parent.name)
            for repo in _hf_cache_repos(root):
                names.add(repo.name.split("--", 2)[2])
    return sorted(names)


def _candidates(root: Path, relative: Path) -> list[Path]:
    """Where a listed name may live under ``root``: as given, or (a bare repo name) inside an organisation folder
    or a Hugging Face cache folder."""
    found = [root / relative]
    if len(relative.parts) == 1:
        name = glob.escape(relative.name)
        found += [p for p in sorted(root.glob(f"*/{name}")) if (p / "model_index.json").is_file()]
        found += [p for p in _hf_cache_repos(root) if p.name.split("--", 2)[2] == relative.name]
    return found


def resolve_model_folder(name: str) -> Path:
    """The folder ``name`` inside one of ComfyUI's diffusers folders; refuses names that escape them.

    ``..``, absolute paths and symlinks that lead outside the model folders are refused: a workflow from the
    network must not make the server read arbitrary paths.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model_name={name!r} is empty. Fix: pick a model folder from the list.")
    if not in_comfyui():
        return Path(name)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ModelLoadError(
            f"model_name={name!r} points outside ComfyUI's diffusers model folders. Fix: put the model under "
            f"ComfyUI/models/diffusers/ and pick it by name."
        )
    for root in model_roots():
        for candidate in _candidates(root, relative):
            if not candidate.exists():
                continue
            real_root = root.resolve()
            real = candidate.resolve()
            if real != real_root and real_root not in real.parents:
                raise ModelLoadError(
                    f"model_name={name!r} is a link to {real}, outside ComfyUI's diffusers model folders. "
                    "Fix: move or copy the model into ComfyUI/models/diffusers/."
                )
            return candidate
    roots = ", ".join(str(r) for r in model_roots()) or "(none configured)"
    raise ModelLoadError(
        f"model_name={name!r} was not found in ComfyUI's diffusers model folders ({roots}). Fix: download a "
        "Diffusers-format Wan2.1 folder there and refresh the node."
    )


def list_component_files(argument: str) -> list[str]:
    """The choices of a component loader: the safetensors files of its ComfyUI folder (relative names, as ComfyUI's
    own loaders list them), then the Diffusers folders, for taking that component from one."""
    names: list[str] = []
    if folder_paths is not None:
        try:
            names = [n for n in folder_paths.get_filename_list(FILE_FOLDER_KEYS[argument])
                     if n.lower().endswith(SINGLE_FILE_SUFFIXES)]
        except KeyError:  # a ComfyUI without that folder key
            names = []
    return sorted(names) + [DIFFUSERS_CHOICE + name for name in list_model_folders()]


def resolve_component(argument: str, widget: str, name: str) -> Path:
    """The file ``name`` in ComfyUI's folder for this component (``folder_paths.get_full_path``, which keeps names
    inside its folders), or a Diffusers folder picked from the same list. Outside ComfyUI, ``name`` is a path."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"{widget}={name!r} is empty. Fix: pick a file from the list.")
    if not in_comfyui():
        return Path(name)
    if name.startswith(DIFFUSERS_CHOICE):
        return resolve_model_folder(name[len(DIFFUSERS_CHOICE):])
    return find_in_comfy_folder(FILE_FOLDER_KEYS[argument], widget, name)


def find_in_comfy_folder(key: str, widget: str, name: str) -> Path:
    """``name`` in ComfyUI's ``key`` folders (``folder_paths.get_full_path`` keeps names inside them), or an error
    naming the widget, the folders searched and where to put the file."""
    try:
        found = folder_paths.get_full_path(key, name)
        folders = folder_paths.get_folder_paths(key)
    except KeyError:  # a ComfyUI without that folder key
        found, folders = None, []
    if found is None:
        raise ModelLoadError(
            f"{widget}={name!r} was not found in ComfyUI's {key} folders ({', '.join(folders) or 'none configured'}). "
            f"Fix: put the file in ComfyUI/models/{key}/ and refresh the node list (press r)."
        )
    return Path(found)


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory()) if folder_paths else Path("outputs")


class NodeStepObserver:
    """Advances ComfyUI's progress bar after each denoising step and honours its interrupt before each one."""

    def __init__(self) -> None:
        self.bar = None

    def before_step(self, index: int, total: int) -> None:
        if comfy_model_management is not None:
            comfy_model_management.throw_exception_if_processing_interrupted()
        if self.bar is None and comfy_utils is not None:
            self.bar = comfy_utils.ProgressBar(total)

    def after_step(self, index: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update_absolute(index + 1, total)


LORA_FOLDER_KEY = "loras"
"""ComfyUI's LoRA folder (``ComfyUI/models/loras``), which its own LoraLoaderModelOnly lists."""


def list_lora_files() -> list[str]:
    """The safetensors files of ComfyUI's loras folders, by the relative names its own LoRA loader shows."""
    if folder_paths is None:
        return []
    try:
        names = folder_paths.get_filename_list(LORA_FOLDER_KEY)
    except KeyError:  # a ComfyUI without that folder key
        return []
    return sorted(n for n in names if n.lower().endswith(SINGLE_FILE_SUFFIXES))


def resolve_lora(name: str) -> Path:
    """The LoRA ``name`` in ComfyUI's loras folders (``folder_paths.get_full_path`` keeps names inside them), or,
    outside ComfyUI, the path ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"lora_name={name!r} is empty. Fix: pick a LoRA from the list.")
    if not in_comfyui():
        return Path(name)
    return find_in_comfy_folder(LORA_FOLDER_KEY, "lora_name", name)
