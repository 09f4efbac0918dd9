"""Wan2.2 A14B, text-to-video and image-to-video: two experts in one model.

A Wan2.2 A14B model is a Wan2.1 14B model twice over: ``transformer`` (the high-noise expert) denoises while the
timestep is at or above ``boundary_ratio * num_train_timesteps``, ``transformer_2`` (the low-noise expert) after
it - diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` with ``transformer_2`` and ``boundary_ratio``
(``model_index.json``: 0.875 for T2V, 0.9 for I2V). Everything else is Wan2.1's: the text encoder, the VAE, the
latent geometry, the steps (``spec.WanStages``). The I2V model has no image encoder: its DiTs take the start
image's VAE latents and mask on 36 input channels, as Wan2.1 I2V does, and no CLIP features.

Single files (Comfy-Org's ``wan2.2_{t2v,i2v}_{high,low}_noise_14B_{fp16,fp8_scaled}.safetensors``) carry no
pipeline settings and look exactly like Wan2.1 14B files (the T2V experts) or like a Wan2.1 I2V file without its
image embedder (the I2V experts): a model is Wan2.2 A14B when two DiT files are given (``dit`` the high-noise
expert, ``dit_2`` the low-noise one), and its boundary is then the model type's (``DEFAULT_BOUNDARY``) unless the
sampling parameters set ``boundary_ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import SamplingParams
from ...core.config_checks import ConfigReader
from ...core.spec import ComponentSpec, FileLayout, ModelSource, ModelSpec, NotThisFile, Role, lazy_classes
from ...errors import ModelLoadError
from .config_checks import check_wan_configs
from .files import HEAD_WIDTH, Tensors, dit_config, size_label
from .spec import _COMMON, SCHEDULER, SINGLE_FILES_T2V, TEXT_ENCODER, TOKENIZER, TRANSFORMER, VAE, WanStages

TRANSFORMER_2 = ComponentSpec("transformer_2", Role.DIT, lazy_classes("diffusers", "WanTransformer3DModel"), precision="dit")
"""The low-noise expert (diffusers' name)."""

DEFAULT_BOUNDARY = {False: 0.875, True: 0.9}
"""``boundary_ratio`` of the released A14B models (T2V, I2V), for single files, which carry no pipeline settings."""

HINT = "a Diffusers-format Wan2.2 A14B folder (Wan2.2-T2V-A14B-Diffusers or Wan2.2-I2V-A14B-Diffusers)"

SHAPE_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
              "freq_dim", "ffn_dim", "num_layers", "image_dim", "added_kv_proj_dim")
"""Config fields the two experts must agree on: they take the same inputs and stream through the same slots."""


class Wan22Stages(WanStages):
    """Wan2.1's steps, with diffusers' expert choice: the high-noise expert while ``t >= boundary``."""

    def __init__(self, image_to_video: bool):
        self.default_boundary = DEFAULT_BOUNDARY[image_to_video]

    def boundary_ratio(self, source: ModelSource, params: SamplingParams | None) -> float | None:
        """``params.boundary_ratio``, else the folder's ``boundary_ratio`` (None there: diffusers then runs the
        first expert only), else the model type's default (single files)."""
        if params is not None and params.boundary_ratio is not None:
            return params.boundary_ratio
        pipeline = source.pipeline_config()
        if "boundary_ratio" in pipeline:
            return pipeline["boundary_ratio"]
        return self.default_boundary

    def dit_for_step(self, source: ModelSource, dits: tuple[str, ...], timestep: float, num_train_timesteps: int,
                     params: SamplingParams) -> str:
        ratio = self.boundary_ratio(source, params)
        # diffusers compares the int64 timestep with the float boundary: `t >= boundary_ratio * num_train_timesteps`.
        if ratio is None or len(dits) == 1 or timestep >= ratio * num_train_timesteps:
            return dits[0]
        return dits[1]


def has_second_expert(index: dict) -> bool:
    """A ``model_index.json`` naming a ``transformer_2`` (Wan2.2 A14B; Wan2.1 folders saved by recent diffusers
    carry ``"transformer_2": [null, null]``)."""
    entry = index.get("transformer_2")
    return isinstance(entry, list) and len(entry) == 2 and bool(entry[1])


def check_wan22_configs(source: Any) -> None:
    """Wan's bounds for every component, both experts shaped alike, and a boundary in 0..1."""
    check_wan_configs(source)
    high, low = source.config("transformer"), source.config("transformer_2")
    for key in SHAPE_KEYS:
        if high.get(key) != low.get(key):
            raise ModelLoadError(
                f"{source.name}: the experts differ in {key} (transformer {high.get(key)!r}, transformer_2 "
                f"{low.get(key)!r}): they are not the two experts of one Wan2.2 A14B model. Fix: give the high-noise "
                "and the low-noise expert of the same model (both T2V, or both I2V)."
            )
    pipeline = source.pipeline_config()
    ratio = pipeline.get("boundary_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0):
        raise ModelLoadError(f"{source.name}/model_index.json: boundary_ratio={ratio!r} must be a number from 0 to 1. "
                             "Fix: re-download model_index.json (0.875 for T2V, 0.9 for I2V).")


def check_i2v_experts(source: Any) -> None:
    check_wan22_configs(source)
    reader = ConfigReader(source, "transformer")
    if reader.config.get("image_dim") is not None:
        raise reader.fail("image_dim", reader.config.get("image_dim"), "is set, but Wan2.2 I2V A14B experts have no "
                          "image embedder (that is a Wan2.1 I2V DiT)")


@dataclass(frozen=True)
class Wan22ExpertFormat:
    """One expert of a Wan2.2 A14B model as a single file (high-noise for ``dit``, low-noise for ``dit_2``)."""

    image_to_video: bool
    low_noise: bool = False

    @property
    def expected(self) -> str:
        kind = "i2v" if self.image_to_video else "t2v"
        noise = "low" if self.low_noise else "high"
        return (f"the {noise}-noise expert of Wan2.2 {kind.upper()} A14B "
                f"(diffusion_models/wan2.2_{kind}_{noise}_noise_14B_fp8_scaled.safetensors or _fp16)")

    def recognise(self, tensors: Tensors) -> FileLayout:
        config, names = dit_config(tensors)
        if config["image_dim"] is not None:
            raise NotThisFile("it is a Wan2.1 I2V DiT (it has a CLIP image embedder), not a Wan2.2 A14B expert")
        if config["out_channels"] != 16 or config["in_channels"] != (36 if self.image_to_video else 16):
            what = {16: "a text-to-video", 36: "an image-to-video", 48: "a Wan2.2 TI2V-5B"}.get(config["in_channels"],
                                                                                             "an unknown")
            raise NotThisFile(f"it has {config['in_channels']} input channels ({what} DiT)")
        label = size_label(config["num_attention_heads"] * HEAD_WIDTH, config["num_layers"])
        kind = f"Wan2.2 {'I2V' if self.image_to_video else 'T2V'} A14B {'low' if self.low_noise else 'high'}-noise expert"
        return FileLayout(f"{kind} ({label} shape)", "WanTransformer3DModel", config, names)


def _single_files(image_to_video: bool) -> dict:
    files = {key: value for key, value in SINGLE_FILES_T2V.items()}
    files["transformer"] = Wan22ExpertFormat(image_to_video)
    files["transformer_2"] = Wan22ExpertFormat(image_to_video, low_noise=True)
    return files


_WAN22 = {**_COMMON, "family": "wan2.2"}

WAN22_A14B_T2V = ModelSpec(
    name="wan2.2-a14b-t2v", pipeline_class="WanPipeline",
    components=(TOKENIZER, TEXT_ENCODER, TRANSFORMER, TRANSFORMER_2, VAE, SCHEDULER),
    files=_single_files(False), matches=has_second_expert,
    **{**_WAN22, "stages": Wan22Stages(False), "module": __name__, "check_configs": check_wan22_configs},
)
WAN22_A14B_I2V = ModelSpec(
    name="wan2.2-a14b-i2v", pipeline_class="WanImageToVideoPipeline", image_to_video=True,
    components=(TOKENIZER, TEXT_ENCODER, TRANSFORMER, TRANSFORMER_2, VAE, SCHEDULER),
    files=_single_files(True), matches=has_second_expert,
    **{**_WAN22, "stages": Wan22Stages(True), "module": __name__, "check_configs": check_i2v_experts},
)
SPECS = (WAN22_A14B_T2V, WAN22_A14B_I2V)
