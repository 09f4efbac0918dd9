"""Frozen, validated configuration: the offload options, the precision, and the generation parameters.

The seven offload options keep FastVideo's names, defaults and meanings exactly (``shared/seed-offloading.txt``),
so its examples run here with only the import changed. Each option is declared once, below, with its doc and
bounds in the field's metadata: the CLI flags, the Offload Settings node's widgets and tooltips, the
``VideoGenerator.from_pretrained`` arguments, the auto ladder and the one validation are all derived from these
declarations (``option_specs``). Everything is checked at construction, before a single weight is read: a bad
value fails in milliseconds with a message naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError


def option(default: Any, doc: str, *, low: int | None = None, high: int | None = None, fix: str = "",
           auto: bool = False, labels: tuple[str, str] | None = None, cost: str = "",
           choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying what every front end needs to present and check it.

    ``auto``: the value may also be the string ``"auto"``. ``labels``: a boolean shown as a two-way choice
    (false label, true label). ``choices``: the value is one of these strings. ``cost``: what turning the option on
    costs, for tooltips and the README.
    """
    metadata = dict(doc=doc, low=low, high=high, fix=fix, auto=auto, labels=labels, cost=cost, choices=choices)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionSpec:
    """One offload option as the front ends see it (derived from an ``OffloadConfig`` field)."""

    name: str
    kind: Literal["bool", "int", "choice"]
    default: Any
    doc: str
    low: int | None
    high: int | None
    fix: str
    auto: bool
    labels: tuple[str, str] | None
    cost: str
    choices: tuple[str, ...] | None

    @property
    def flag(self) -> str:
        """The CLI flag: FastVideo's name with hyphens."""
        return "--" + self.name.replace("_", "-")

    @property
    def tooltip(self) -> str:
        return f"{self.doc} {self.cost}".strip()

    def validate(self, value: Any) -> None:
        """The one check of this option's value (the config, the layerwise offloader and the nodes use it)."""
        if self.auto and isinstance(value, str) and value == "auto":
            return
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(self.name, value, f"must be one of {', '.join(self.choices)}", self.fix)
            return
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(self.name, value, "must be True or False", f"pass {self.name}=True or {self.name}=False")
            return
        if isinstance(value, bool) or not isinstance(value, int):
            what = f"must be a whole number from {self.low} to {self.high}" + (' or "auto"' if self.auto else "")
            raise ConfigError(self.name, value, what, self.fix)
        if not self.low <= value <= self.high:
            raise ConfigError(self.name, value, f"must be from {self.low} to {self.high}", self.fix)


@dataclass(frozen=True)
class OffloadConfig:
    """Where the weights of each model live and how they move. Defaults are FastVideo's."""

    num_gpus: int = option(1, "GPUs to use. More than one needs use_fsdp_inference (and dit_layerwise_offload off).",
                           low=1, high=64, fix="use 1 for one GPU, or the number of GPUs to shard over")
    use_fsdp_inference: bool = option(
        False, "Shard the DiT's weights over num_gpus GPUs with FSDP; each layer is gathered just before it runs.",
        cost="Recommended with several GPUs.")
    dit_cpu_offload: bool = option(
        True, "With FSDP only: shards live in host memory and move to the GPU per layer. Without FSDP it has no "
              "effect.", cost="Saves the most VRAM on several GPUs, at a cost in speed.")
    dit_layerwise_offload: bool = option(
        True, "One GPU: DiT blocks live in host memory; the next block's copy overlaps the current block's compute. "
              "Not compatible with FSDP.", cost="Near-resident speed in a few GiB of VRAM; needs the DiT's size in RAM.")
    text_encoder_cpu_offload: bool = option(
        True, "Text encoder weights stay on the CPU and the prompt is encoded there.",
        cost="Saves ~11 GiB of VRAM for UMT5-XXL; encoding a new prompt takes seconds on the CPU. Turn on last.")
    image_encoder_cpu_offload: bool = option(
        True, "Image encoder weights stay in host memory; copied to the GPU for the encode, dropped after.",
        cost="Costs one PCIe copy per image-to-video run.")
    vae_cpu_offload: bool = option(
        True, "VAE weights stay in host memory; copied to the GPU for the encode/decode, dropped after.",
        cost="Costs one PCIe copy (~0.5 GB) per use.")
    pin_cpu_memory: bool = option(
        True, "Page-lock host copies so host-to-GPU copies run at full PCIe speed and asynchronously.",
        cost="Uses locked RAM.")
    text_encoder_layerwise_offload: bool = option(
        False, "Text encoder weights stay in host memory and its blocks stream through the GPU (the DiT's layerwise "
               "machinery), instead of computing on the CPU. Used when text_encoder_cpu_offload is off.",
        cost="About 1 GiB of VRAM for UMT5-XXL and a fraction of a second per prompt, instead of ~11 GiB resident or "
             "seconds of CPU compute.")
    vae_tiling: str = option(
        "auto", "Decode (and encode) the video in spatial tiles with exact halos: the same frames in bounded VRAM. "
                "auto tiles when the untiled decode would not fit in free memory.",
        choices=("auto", "on", "off"), fix="use auto (the default), on or off",
        cost="0-5% more decode time in tiles of whole frames (H200, 480p-720p); about 30% more where memory only allows "
             "frames one at a time. Saves 6-17 GiB at 14B 480p-720p.")
    dit_activation_chunking: str = option(
        "auto", "Run the DiT's token-wise steps (norms, modulation, projections, feed-forward) over slices of the "
                "sequence, attention whole: the same output in about half the activation memory. auto slices when "
                "free memory is short.",
        choices=("auto", "on", "off"), fix="use auto (the default), on or off",
        cost="Wan on CUDA: its sliced block fuses the element-wise steps (one Triton pass each), so a step takes "
             "0.93x diffusers' block time at 8,192-token slices (H200, 480p81) and 1.04x the same kernels run whole; "
             "without Triton about 5% more than diffusers'. Saves about 1.5 GiB of activations at 14B 480p81.")
    prefetch_depth: int = option(
        1, "Layerwise only: how many blocks ahead of the running one are copied in.", low=1, high=8,
        fix="use 1 (the default) or 2 on slow PCIe links", cost="1 hides PCIe on large clips; 2 smooths slow links.")
    resident_blocks: int | Literal["auto"] = option(
        0, 'Layerwise only: DiT blocks kept on the GPU for the whole run (the rest stream). "auto" keeps as many as '
           "free memory allows after measuring one denoising step; 0 streams every block (FastVideo's).",
        low=0, high=1000, fix='use 0 to stream every block, a block count, or "auto"', auto=True,
        cost="More is faster on short clips and uses more VRAM.")
    auto_offload: bool = option(
        False, "Ignore the seven options and walk the recommended order by itself: start resident (or plain FSDP on "
               "several GPUs) and turn on the next option whenever a stage runs out of memory, logging each choice.",
        labels=("manual", "auto"))
    max_pinned_memory_gb: int | Literal["auto"] = option(
        "auto", "With pin_cpu_memory: the most host memory, in GiB, the pack may page-lock, all models together. "
                "Weights beyond it stay pageable and still stream, more slowly. \"auto\": 45% of the machine's RAM "
                "(ComfyUI's later versions cap pinning near there).",
        low=0, high=4096, fix='use "auto", 0 to pin nothing, or a number of GiB well below your RAM', auto=True,
        cost="Page-locked memory cannot be swapped out; what does not fit streams from pageable memory, slower.")
    max_host_memory_gb: int | Literal["auto"] = option(
        "auto", "The most host memory, in GiB, the weights may hold, all models together. When a model's weights "
                "would take more, the text encoder computed on the CPU is read from its file block by block as it "
                "runs instead of being held, and the image encoder is read from its file onto the GPU for each "
                "encode. \"auto\": 60% of the machine's RAM.",
        low=0, high=4096, fix='use "auto", or a number of GiB well below your RAM', auto=True,
        cost="Short of it, a new prompt takes about a second more to encode (UMT5-XXL re-read from the OS file "
             "cache) and a new start image about half a second more; a 32 GB machine keeps 4.6 GB (fp8 UMT5) to 9 GB "
             "(bf16) and the 2.5 GB image encoder free for the DiT.")

    def __post_init__(self) -> None:
        for spec in option_specs():
            value = getattr(self, spec.name)
            if spec.kind == "int" and _is_integer(value):
                value = int(value)  # numpy integers (a seed or count computed with numpy) are whole numbers too
                object.__setattr__(self, spec.name, value)
            spec.validate(value)
        if self.auto_offload:
            return  # the seven options are chosen by the auto walk, so their combination is not the user's
        if self.use_fsdp_inference and self.dit_layerwise_offload:
            raise ConfigError(
                "dit_layerwise_offload",
                True,
                "layerwise offload is for one GPU and is not compatible with use_fsdp_inference=True",
                "set dit_layerwise_offload=False (FSDP shards the DiT instead; if memory still runs out, "
                "enable text/image encoder and VAE offload, then dit_cpu_offload=True)",
            )
        if self.use_fsdp_inference and self.num_gpus < 2:
            raise ConfigError(
                "use_fsdp_inference",
                True,
                "FSDP shards weights over several GPUs but num_gpus=1",
                "set num_gpus to 2 or more, or use dit_layerwise_offload=True on a single GPU",
            )
        if self.num_gpus > 1 and not self.use_fsdp_inference:
            raise ConfigError(
                "num_gpus",
                self.num_gpus,
                "several GPUs are used through FSDP, which is off",
                "set use_fsdp_inference=True and dit_layerwise_offload=False, or num_gpus=1",
            )

    @property
    def distributed(self) -> bool:
        return self.use_fsdp_inference and self.num_gpus > 1 and not self.auto_offload

    def recommended_steps(self) -> tuple[tuple[str, ...], ...]:
        return MULTI_GPU_STEPS if self.num_gpus > 1 else SINGLE_GPU_STEPS

    def is_on(self, name: str) -> bool:
        """Whether option ``name`` is fully on: True, or "on" for a choice (its "auto" may still decide off)."""
        value = getattr(self, name)
        return value == "on" if isinstance(value, str) else bool(value)

    def next_step_to_enable(self) -> tuple[str, ...] | None:
        """The first step of the recommended order that is not fully on, or None when all are on. With text encoder
        CPU offload on, the streamed text encoder step is moot (CPU compute is the further step)."""
        for step in self.recommended_steps():
            if step == ("text_encoder_layerwise_offload",) and self.text_encoder_cpu_offload:
                continue
            if not all(self.is_on(name) for name in step):
                return step
        return None

    def next_option_to_enable(self) -> str | None:
        """The first option of the recommended order that is still off, or None when all are on."""
        step = self.next_step_to_enable()
        return None if step is None else next(name for name in step if not self.is_on(name))


SINGLE_GPU_STEPS: tuple[tuple[str, ...], ...] = (
    ("dit_layerwise_offload",),
    ("image_encoder_cpu_offload", "vae_cpu_offload"),
    ("vae_tiling", "dit_activation_chunking"),
    ("text_encoder_layerwise_offload",),
    ("text_encoder_cpu_offload",),
)
"""The seed's recommended order on one GPU (layerwise, then image encoder + VAE offload, then text encoder offload),
with this pack's exact memory savers in between: what to turn on next when memory runs out, step by step. A
choice option counts as on when it is "on" (its "auto" decides by free memory, and a step forces it)."""

MULTI_GPU_STEPS: tuple[tuple[str, ...], ...] = (
    ("use_fsdp_inference",),
    ("text_encoder_cpu_offload", "image_encoder_cpu_offload", "vae_cpu_offload"),
    ("vae_tiling",),
    ("dit_cpu_offload",),
)
"""The seed's recommended order on several GPUs (FSDP starts with layerwise and DiT CPU offload off)."""


def option_specs() -> tuple[OptionSpec, ...]:
    """Every ``OffloadConfig`` option, in declaration order, as the front ends present it."""
    specs = []
    for f in fields(OffloadConfig):
        kind = "bool" if f.type == "bool" else "choice" if f.metadata.get("choices") else "int"
        specs.append(OptionSpec(f.name, kind, f.default, **f.metadata))
    return tuple(specs)


def option_spec(name: str) -> OptionSpec:
    for spec in option_specs():
        if spec.name == name:
            return spec
    raise KeyError(name)


def make_offload_config(**options: Any) -> OffloadConfig:
    """``OffloadConfig(**options)``, refusing an unknown option by name (instead of a TypeError)."""
    known = {spec.name for spec in option_specs()}
    for name in options:
        if name not in known:
            raise ConfigError(name, options[name], "is not an offload option", f"use one of {', '.join(sorted(known))}")
    return OffloadConfig(**options)


PRECISIONS = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Precision:
    """Weight dtypes per component. Wan runs its DiT and UMT5 in bfloat16 and its VAE in float32."""

    dit: str = "auto"
    """DiT and text encoder: auto (bfloat16 on a GPU, float32 on a CPU), bfloat16, float16 or float32."""
    vae: str = "float32"
    """VAE and image encoder: float32 (Wan's reference) or bfloat16 to halve their memory."""

    def __post_init__(self) -> None:
        if self.dit not in PRECISIONS:
            raise ConfigError("precision", self.dit, "is not a known dtype", "use auto, bfloat16, float16 or float32")
        if self.vae not in PRECISIONS[1:]:
            raise ConfigError("vae_precision", self.vae, "is not a known dtype", "use float32 (default), bfloat16 or float16")


MAX_PROMPT_CHARS = 20_000
"""Longest prompt accepted. The text encoder reads 512 tokens (a few thousand characters) and truncates the rest
with a warning; counting the tokens of a multi-megabyte text would cost seconds and gigabytes before that."""


def validate_prompt(name: str, value: object, allow_empty: bool = False) -> str:
    """Prompts are plain text; an empty positive prompt is almost always a wiring mistake in a graph."""
    if not isinstance(value, str):
        raise ConfigError(name, value, "must be text", f"pass {name} as a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise ConfigError(
            name, value, f"is longer than {MAX_PROMPT_CHARS} characters",
            "shorten it: the text encoder reads only the first 512 tokens (a few thousand characters)",
        )
    if not allow_empty and not value.strip():
        raise ConfigError(name, value, "is empty", "describe the video you want")
    return value


def _is_integer(value: Any) -> bool:
    """A whole number: ``int`` or a numpy integer (``np.int64``), never a bool (``True`` is not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, _np_bool()))


def _np_bool() -> type:
    try:
        import numpy

        return numpy.bool_
    except ImportError:  # pragma: no cover - numpy is a dependency
        return bool


def _require_int(name: str, value: Any, low: int, high: int, fix: str) -> int:
    if not _is_integer(value):
        raise ConfigError(name, value, f"must be a whole number from {low} to {high}", fix)
    value = int(value)
    if not low <= value <= high:
        raise ConfigError(name, value, f"must be from {low} to {high}", fix)
    return value


def _require_float(name: str, value: Any, low: float, high: float, fix: str) -> float:
    if isinstance(value, (bool, _np_bool())) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(name, value, f"must be a finite number from {low} to {high}", fix)
    value = float(value) if not isinstance(value, int) else value
    if not low <= value <= high:
        raise ConfigError(name, value, f"must be from {low} to {high}", fix)
    return value


SAMPLERS = ("model", "euler")
"""What ``SamplingParams.sampler`` accepts."""


@dataclass(frozen=True)
class SamplingParams:
    """One video's size, schedule and seed. Generic bounds here; the model's latent geometry (multiples, frame
    counts) and its own limits are checked by the pipeline once the model is known, still before any weight."""

    height: int = 480
    """Pixels; a multiple of the model's spatial factor times its DiT patch (16 for Wan2.1)."""
    width: int = 832
    """Pixels; likewise."""
    num_frames: int = 81
    """Of the form tk+1 for the VAE's temporal factor t (4 for Wan)."""
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    """Classifier-free guidance; at 1.0 or below the negative prompt is not used (diffusers' rule)."""
    guidance_scale_2: float | None = None
    """Two-expert models (Wan2.2 A14B) only: the guidance of the low-noise expert's steps; None uses
    ``guidance_scale``. As in diffusers, whether guidance runs at all is decided by ``guidance_scale`` alone: with
    ``guidance_scale`` <= 1 no step runs the negative prompt, whatever this says."""
    boundary_ratio: float | None = None
    """Two-expert models only: the high-noise expert runs while ``t >= boundary_ratio * num_train_timesteps``, the
    low-noise one after; None keeps the model's (its folder's ``model_index.json``, else 0.875 for T2V and 0.9 for
    I2V)."""
    flow_shift: float | None = None
    """Noise-schedule shift; None keeps the model folder's value (3.0 suits 480p, 5.0 suits 720p)."""
    seed: int = 0
    """Initial noise comes from a CPU generator seeded with this, so a seed is the same video on any device."""
    sampler: str = "model"
    """``model``: the model's own scheduler (UniPC, second order, for the Wan folders). ``euler``: first-order
    steps on the same timesteps - what step-distilled LoRAs such as lightx2v's 4-step ones are trained for, and what
    ComfyUI's Wan2.2 templates run (``euler``, ``simple``)."""

    def __post_init__(self) -> None:
        # Checked values are stored as plain Python numbers (numpy scalars from a caller's own code are accepted).
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("height", "width"):
            put(name, _require_int(name, getattr(self, name), 16, 8192,
                                   f"use a multiple of 16 such as {480 if name == 'height' else 832}"))
        put("num_frames", _require_int("num_frames", self.num_frames, 1, 4093, "use 4k+1 frames such as 17, 33, 49 or 81"))
        put("num_inference_steps", _require_int("num_inference_steps", self.num_inference_steps, 1, 1000,
                                                "use 20-50 steps (at least 1)"))
        put("guidance_scale", _require_float("guidance_scale", self.guidance_scale, 0.0, 100.0,
                                             "use 5.0 (the default), or 1.0 to disable"))
        if self.guidance_scale_2 is not None:
            put("guidance_scale_2", _require_float("guidance_scale_2", self.guidance_scale_2, 0.0, 100.0,
                                                   "use a guidance like 3.0, or leave it empty to use guidance_scale"))
        if self.boundary_ratio is not None:
            put("boundary_ratio", _require_float("boundary_ratio", self.boundary_ratio, 0.0, 1.0,
                                                 "use 0.875 (Wan2.2 T2V) or 0.9 (Wan2.2 I2V), or leave it empty"))
        if self.flow_shift is not None:
            put("flow_shift", _require_float("flow_shift", self.flow_shift, 0.01, 100.0, "use 3.0 for 480p or 5.0 for 720p"))
        put("seed", _require_int("seed", self.seed, 0, 2**64 - 1, "use a whole number from 0 to 2**64-1"))
        if self.sampler not in SAMPLERS:
            raise ConfigError("sampler", self.sampler, f"is not one of {', '.join(SAMPLERS)}",
                              "use 'model' (the model's own scheduler) or 'euler' (first-order steps, for 4-step "
                              "distilled LoRAs)")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def guidance_for(self, expert: int) -> float:
        """The guidance scale of a step run by DiT number ``expert`` (0: the first, or only, one): diffusers'
        ``guidance_scale`` for the first, ``guidance_scale_2`` (defaulting to it) for the others."""
        if expert == 0 or self.guidance_scale_2 is None:
            return self.guidance_scale
        return self.guidance_scale_2

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
