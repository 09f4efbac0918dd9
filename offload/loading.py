"""Load the components of a checked Wan2.1 folder into host memory (safetensors only, no network, no remote code).

Every component is loaded to the CPU; where it runs is the offload manager's decision, made later. Loading goes
through diffusers' and transformers' own ``from_pretrained`` so that dtype rules (``_keep_in_fp32_modules``) and
key layouts are exactly the libraries' - the pipelines we are compared against load the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelLoadError
from .model_folder import WanModelFolder

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU (Wan's native precision) and float32 on a CPU (where bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass(frozen=True)
class Precision:
    """Weight dtypes per component. Wan runs its DiT and UMT5 in bfloat16 and its VAE in float32."""

    dit: str = "auto"
    """DiT and text encoder: auto, bfloat16, float16 or float32."""
    vae: str = "float32"
    """VAE and image encoder: float32 (Wan's reference) or bfloat16 to halve their memory."""

    def __post_init__(self) -> None:
        from .errors import ConfigError

        if self.dit not in ("auto", *DTYPES):
            raise ConfigError("precision", self.dit, "is not a known dtype", "use auto, bfloat16, float16 or float32")
        if self.vae not in DTYPES:
            raise ConfigError(
                "vae_precision", self.vae, "is not a known dtype", "use float32 (default), bfloat16 or float16"
            )


def _from_pretrained(folder: WanModelFolder, name: str, loader: Any, **kwargs: Any) -> Any:
    path = str(folder.component(name))
    try:
        return loader(path, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the component named
        raise ModelLoadError(
            f"Loading '{name}' from {path} failed: {type(e).__name__}: {e}. Fix: check that the folder is a "
            "complete, uncorrupted download (delete and re-download the component if unsure)."
        ) from e


def load_transformer(folder: WanModelFolder, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    model = _from_pretrained(folder, "transformer", WanTransformer3DModel.from_pretrained, dtype=dtype, use_safetensors=True)
    return model.eval().requires_grad_(False)


def load_text_encoder(folder: WanModelFolder, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, folder.classes["text_encoder"])
    model = _from_pretrained(folder, "text_encoder", cls.from_pretrained, dtype=dtype, use_safetensors=True)
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: WanModelFolder) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(folder, "tokenizer", AutoTokenizer.from_pretrained, trust_remote_code=False)


def load_vae(folder: WanModelFolder, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    model = _from_pretrained(folder, "vae", AutoencoderKLWan.from_pretrained, dtype=dtype, use_safetensors=True)
    return model.eval().requires_grad_(False)


def load_scheduler_config(folder: WanModelFolder) -> tuple[str, dict]:
    """The scheduler's class name and config. Schedulers hold per-run state, so each run builds a fresh one."""
    return folder.classes["scheduler"], folder.read_config("scheduler")


def load_image_encoder(folder: WanModelFolder, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, folder.classes["image_encoder"])
    model = _from_pretrained(folder, "image_encoder", cls.from_pretrained, dtype=dtype, use_safetensors=True)
    return model.eval().requires_grad_(False)


def load_image_processor(folder: WanModelFolder) -> Any:
    import transformers

    cls = getattr(transformers, folder.classes["image_processor"])
    return _from_pretrained(folder, "image_processor", cls.from_pretrained)


def make_scheduler(class_name: str, config: dict, flow_shift: float | None) -> Any:
    """A fresh scheduler from the folder's config, with ``flow_shift`` overridden when given."""
    import diffusers

    cls = getattr(diffusers, class_name)
    overrides = {}
    if flow_shift is not None:
        if "flow_shift" in config or class_name == "UniPCMultistepScheduler":
            overrides["flow_shift"] = flow_shift
        else:
            overrides["shift"] = flow_shift
    return cls.from_config(config, **overrides)
