"""Check a Diffusers-format Wan2.1 folder before anything is loaded from it.

A missing component, a half-downloaded shard or a pickle checkpoint should fail in milliseconds with a message
that names the file and says what to do - not minutes later from deep inside ``from_pretrained``. Nothing here
reads weights: safetensors headers are parsed to prove each file is whole.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Checkpoint formats that unpickle Python objects when loaded, and so can run code: always refused."""

T2V_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
I2V_COMPONENTS = T2V_COMPONENTS + ("image_encoder", "image_processor")
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae", "image_encoder")

ALLOWED_CLASSES = {
    "transformer": {"WanTransformer3DModel"},
    "text_encoder": {"UMT5EncoderModel", "T5EncoderModel"},
    "tokenizer": {"T5Tokenizer", "T5TokenizerFast", "AutoTokenizer"},
    "vae": {"AutoencoderKLWan"},
    "scheduler": {"UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"},
    "image_encoder": {"CLIPVisionModel", "CLIPVisionModelWithProjection"},
    "image_processor": {"CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"},
}
"""Classes a folder may name per component. ``model_index.json`` is data from the internet; it never chooses
arbitrary code to import."""

PIPELINES = {"WanPipeline": T2V_COMPONENTS, "WanImageToVideoPipeline": I2V_COMPONENTS}

FOLDER_HINT = (
    "point it at a Diffusers-format Wan2.1 folder (for example Wan2.1-T2V-1.3B-Diffusers) that contains "
    "model_index.json and the subfolders transformer/, text_encoder/, tokenizer/, vae/ and scheduler/"
)


@dataclass(frozen=True)
class WanModelFolder:
    """A checked model folder: where it is, what pipeline it is, and which class each component uses."""

    path: Path
    pipeline_class: str
    classes: dict[str, str]

    @property
    def image_to_video(self) -> bool:
        return self.pipeline_class == "WanImageToVideoPipeline"

    def component(self, name: str) -> Path:
        return self.path / name

    def read_config(self, name: str) -> dict:
        """The JSON config of a component (``config.json`` or the scheduler's/processor's own file)."""
        for file_name in ("config.json", "scheduler_config.json", "preprocessor_config.json"):
            config_path = self.path / name / file_name
            if config_path.is_file():
                return json.loads(config_path.read_text())
        raise ModelLoadError(f"{self.path / name} has no config file. Fix: re-download the '{name}' folder.")


def inspect_model_folder(path: str | Path) -> WanModelFolder:
    """Validate ``path`` as a Wan2.1 Diffusers folder; raise ModelLoadError naming what is wrong and the fix."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ModelLoadError(f"model_path={path!r} is not a folder path. Fix: {FOLDER_HINT}.")
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelLoadError(f"model_path={str(root)!r} does not exist. Fix: {FOLDER_HINT}.")
    if not root.is_dir():
        if root.suffix in PICKLE_SUFFIXES:
            raise ModelLoadError(_pickle_message(root))
        raise ModelLoadError(
            f"model_path={str(root)!r} is a file, not a folder. Single-file checkpoints are not supported. "
            f"Fix: {FOLDER_HINT}."
        )
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(f"{root} has no model_index.json, so it is not a Diffusers-format folder. Fix: {FOLDER_HINT}.")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{index_path} is not valid JSON ({e}). Fix: re-download model_index.json.") from e
    pipeline_class = index.get("_class_name")
    if pipeline_class not in PIPELINES:
        raise ModelLoadError(
            f"{index_path} describes a {pipeline_class!r}; this pack runs WanPipeline (text-to-video) and "
            f"WanImageToVideoPipeline (image-to-video) folders. Fix: {FOLDER_HINT}."
        )
    classes = {}
    for name in PIPELINES[pipeline_class]:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise ModelLoadError(
                f"{index_path} has no '{name}' component. Fix: use a complete {pipeline_class} folder."
            )
        if entry[1] not in ALLOWED_CLASSES[name]:
            raise ModelLoadError(
                f"{index_path}: component '{name}' is a {entry[1]!r}; expected one of "
                f"{sorted(ALLOWED_CLASSES[name])}. Fix: use an official Wan2.1 Diffusers folder."
            )
        classes[name] = entry[1]
        folder = root / name
        if not folder.is_dir():
            raise ModelLoadError(f"{root} is incomplete: the '{name}/' folder is missing. Fix: download it again.")
        if name in WEIGHT_COMPONENTS:
            check_weights(folder)
    tokenizer = root / "tokenizer"
    if not any((tokenizer / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise ModelLoadError(
            f"{tokenizer} has neither tokenizer.json nor spiece.model. Fix: download the tokenizer folder again."
        )
    return WanModelFolder(root, pipeline_class, classes)


def check_weights(folder: Path) -> list[Path]:
    """Return the safetensors files of a component after proving each one is whole; refuse pickles."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json. Fix: download the '{folder.name}' folder again.")
    files = sorted(folder.glob("*.safetensors"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(_pickle_message(pickles[0]))
        raise ModelLoadError(
            f"{folder} has no .safetensors weights. Fix: download the safetensors files of '{folder.name}'."
        )
    for index_file in indexes:
        try:
            shards = set(json.loads(index_file.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index_file} is not a valid shard index ({e}). Fix: re-download it.") from e
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelLoadError(
                f"{folder} is incomplete: {index_file.name} lists {len(missing)} missing shard(s), first "
                f"{missing[0]}. Fix: finish the download."
            )
    for file in files:
        check_safetensors_file(file)
    return files


def check_safetensors_file(file: Path) -> dict:
    """Parse a safetensors header and check that the file holds every byte the header promises.

    A truncated download is the most common broken model; this names it without reading the weights.
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
            header = json.loads(handle.read(header_len))
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            if not 0 <= begin <= stop:
                raise ValueError(f"tensor {key!r} has invalid offsets {begin}..{stop}")
            end = max(end, stop)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(
            f"{file} is not a valid safetensors file ({e}). Fix: delete it and download it again."
        ) from e
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{file} is truncated: its header needs {8 + header_len + end} bytes but the file has {size}. "
            "Fix: delete it and download it again."
        )
    return header


def _pickle_message(file: Path) -> str:
    return (
        f"{file} is a pickle checkpoint ({file.suffix}). Loading pickles can run arbitrary code, so this pack "
        "only loads .safetensors. Fix: download the safetensors version of the model (the official "
        "Wan-AI/*-Diffusers folders ship safetensors)."
    )
