"""What a model family declares, so the generic layers can place, stream, shard and run it without knowing it.

Shaped like torchtitan's ``ModelSpec``: a family is a folder (``offload/families/<name>/``) plus one spec per
pipeline it reads. The spec says

- **components by role** (text encoder, image encoder, VAE, one or more DiTs, tokenizer, scheduler...), with the
  classes a model folder may name for each (an allow-list: a ``model_index.json`` from the internet never chooses
  arbitrary code to import) and which precision option sets its dtype;
- **the latent geometry** (channels, temporal and spatial factors, the DiT's patch, the normalisation), through
  :meth:`FamilyStages.latent_space`;
- **the denoising loop**: which DiT runs at each step (:meth:`FamilyStages.dit_for_step`);
- **its steps** (encode text and images, build the noise predictor, decode) and **its parallel plan** for the
  worker group (``parallelize``), plus the methods its workers serve.

- **its single files** (``ModelSpec.files``): what one file of each component looks like - recognised from its keys
  and shapes, mapped to the diffusers/transformers names, configured - and where the components no file carries
  come from (a tokenizer stored inside the text encoder's file, a default scheduler config). The generic adapter
  (``weights.single_files``) reads files through these declarations and knows no model.

Everything else - which module is a "block" to stream or shard - is read from what diffusers models already
declare (``_repeated_blocks``, ``_no_split_modules``, ``_keep_in_fp32_modules``): see :func:`find_block_list`.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import SamplingParams
    from .denoise import BranchPredictor, Conditioning


class Role(enum.Enum):
    """What a component does; the manager places components by role."""

    TOKENIZER = "tokenizer"
    TEXT_ENCODER = "text encoder"
    IMAGE_PROCESSOR = "image processor"
    IMAGE_ENCODER = "image encoder"
    VAE = "vae"
    DIT = "dit"
    SCHEDULER = "scheduler"

    @property
    def has_weights(self) -> bool:
        return self in (Role.TEXT_ENCODER, Role.IMAGE_ENCODER, Role.VAE, Role.DIT)


def lazy_classes(library: str, *names: str) -> dict[str, Callable[[], type]]:
    """``{name: importer}`` for classes of ``library`` (diffusers, transformers), imported only when used."""

    def importer(name: str) -> Callable[[], type]:
        return lambda: getattr(importlib.import_module(library), name)

    return {name: importer(name) for name in names}


@dataclass(frozen=True)
class ComponentSpec:
    """One component of a pipeline."""

    name: str
    """Its folder in a Diffusers-format model (``transformer``, ``text_encoder``...)."""
    role: Role
    classes: Mapping[str, Callable[[], type]]
    """The classes a model may name for it, each with a lazy importer: the allow-list."""
    precision: Literal["dit", "vae"] | None = None
    """Which precision option sets its dtype: ``dit`` (DiT and text encoder) or ``vae`` (VAE, image encoder)."""
    optional: bool = False
    """May be absent from a model (Wan2.2's second expert in a Wan2.1 folder, say)."""
    host_modules: tuple[str, ...] = ()
    """When the component streams layer by layer, these submodules stay in host memory and run on the CPU (large
    lookup tables such as a text encoder's token embedding, of which one prompt reads a few rows)."""

    def resolve(self, class_name: str) -> type:
        """The class for ``class_name``; only names on the allow-list are ever imported."""
        importer = self.classes.get(class_name)
        if importer is None:
            raise KeyError(class_name)
        return importer()


@dataclass(frozen=True)
class LatentSpace:
    """A model's latent geometry, resolved from its configs. Pixels -> latents: ``(F-1)/t + 1`` frames of
    ``H/s x W/s``, where the DiT then groups ``patch`` latents into one token."""

    channels: int
    temporal_factor: int
    spatial_factor: int
    patch: tuple[int, int, int]
    """(frames, height, width) of one DiT token, in latents."""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    """Per-channel statistics: the DiT works on ``(raw - mean) / std``; None means the raw space is the DiT's."""

    @property
    def pixel_multiple(self) -> int:
        return self.spatial_factor * max(self.patch[1], self.patch[2])

    def check(self, params: SamplingParams) -> None:
        """Refuse sizes this geometry cannot represent, naming the nearest sizes that work."""
        step = self.pixel_multiple
        for name in ("height", "width"):
            value = getattr(params, name)
            if value % step:
                raise ConfigError(name, value, f"must be a multiple of {step}", f"use {value // step * step or step} or {value // step * step + step}")
        t = self.temporal_factor
        if params.num_frames % t != 1 % t:
            lower = (params.num_frames - 1) // t * t + 1
            raise ConfigError("num_frames", params.num_frames, f"must be of the form {t}k+1", f"use {lower} or {lower + t}")

    def check_latents(self, latents: Any, field: str = "latents", fix: str = "connect the Sample node's LATENT") -> None:
        """Refuse what this model's VAE cannot decode: not a 5-D tensor ``[B, C, T, h, w]``, the wrong channel
        count, or an empty axis - before the VAE (or the normalisation) fails on it with a broadcasting error."""
        layout = f"[B, {self.channels}, T, H/{self.spatial_factor}, W/{self.spatial_factor}]"
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            shape = tuple(getattr(latents, "shape", ())) or None
            raise ConfigError(field, shape, f"must be a 5-D video latent {layout}", fix)
        shape = tuple(latents.shape)
        if shape[1] != self.channels:
            raise ConfigError(field, shape, f"must have {self.channels} channels {layout}, not {shape[1]}: it is "
                              "the latent of another model", "decode it with the VAE of the model that made it")
        if min(shape[0], shape[2], shape[3], shape[4]) < 1:
            raise ConfigError(field, shape, "has an empty batch, frame or spatial axis", fix)
        if latents.dtype.is_complex or latents.dtype == torch.bool:
            raise ConfigError(field, str(latents.dtype), "is not a real-valued latent", fix)

    def shape(self, params: SamplingParams, batch: int = 1) -> tuple[int, int, int, int, int]:
        return (
            batch,
            self.channels,
            (params.num_frames - 1) // self.temporal_factor + 1,
            params.height // self.spatial_factor,
            params.width // self.spatial_factor,
        )

    def tokens(self, latent_shape: tuple[int, ...]) -> int:
        _, _, frames, height, width = latent_shape
        p_t, p_h, p_w = self.patch
        return (frames // p_t) * (height // p_h) * (width // p_w)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As diffusers' Wan pipelines write it: the statistics are cast to the latents' dtype, the inverse std is
        # taken after the cast, and the scale is applied as a division by it (decode) or a product with it (encode),
        # so results match their pipelines bit for bit.
        view = (1, self.channels, 1, 1, 1)
        mean = torch.tensor(self.mean).view(view).to(like.device, like.dtype)
        inverse_std = 1.0 / torch.tensor(self.std).view(view).to(like.device, like.dtype)
        return mean, inverse_std

    def to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's normalised latents -> the VAE's raw latents (what a VAE decodes and encodes)."""
        if self.mean is None:
            return latents
        mean, inverse_std = self._stats(latents)
        return latents / inverse_std + mean

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents -> the DiT's normalised latents."""
        if self.mean is None:
            return raw
        mean, inverse_std = self._stats(raw)
        return (raw - mean) * inverse_std


class FileTensor(NamedTuple):
    """One tensor of a single file, as its header describes it (no data read)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class NotThisFile(ValueError):
    """Raised by :meth:`SingleFileFormat.recognise`: the file is not of that format; the message says why (what it
    lacks, or what it is instead)."""


@dataclass(frozen=True)
class FileLayout:
    """A recognised single file: the class and config to build, and where each of the model's tensors is stored."""

    kind: str
    """What the file was recognised as, for logs and messages (``Wan2.1 T2V 14B DiT``)."""
    class_name: str
    """One of the component's allowed classes."""
    config: Mapping[str, Any]
    """Arguments of that class's config (diffusers ``from_config``; transformers ``config_class``)."""
    keys: Mapping[str, str]
    """Model tensor name -> key in the file. Keys the model does not use are ignored."""


class SingleFileFormat(Protocol):
    """What a single file of one component looks like (declared by a family, per component)."""

    expected: str
    """The file a user should pick, for messages: ``a Wan2.1 DiT (diffusion_models/wan2.1_t2v_14B_fp8_scaled...)``."""

    def recognise(self, tensors: Mapping[str, FileTensor]) -> FileLayout:
        """The layout of a file with these tensors, or :class:`NotThisFile`. ``tensors`` excludes the bookkeeping
        of ComfyUI's scaled fp8 files (``scaled_fp8``, ``*.scale_weight``, ``*.scale_input``), which the adapter
        handles for every format."""


@dataclass(frozen=True)
class EmbeddedIn:
    """A component no file of its own carries, stored as one tensor inside another component's file (ComfyUI keeps
    the UMT5 tokenizer, a sentencepiece model, in the text encoder's file as the uint8 tensor ``spiece_model``).
    When that other component comes from a Diffusers folder, this one comes from the same folder."""

    component: str
    key: str
    class_name: str
    build: Callable[[bytes], Any]
    """The tensor's bytes -> the component."""
    missing: str
    """What to do when the file lacks the tensor (which file to use instead)."""


@dataclass(frozen=True)
class DefaultConfig:
    """A component without weights that single files do not carry (a scheduler, an image processor): built from a
    config the family derives from the other components' configs. When ``follows`` comes from a Diffusers folder
    that has this component, the folder's own is used instead."""

    follows: str
    class_name: str
    config: Callable[[Callable[[str], dict]], dict]
    """``config(config_of)``: the config, given ``config_of(component)`` for the other components."""


ComponentFiles = SingleFileFormat | EmbeddedIn | DefaultConfig


class ModelSource(Protocol):
    """Where a model's components come from: a Diffusers folder, or single files (any of them possibly from a
    Diffusers folder). Implemented in ``weights``."""

    @property
    def name(self) -> str: ...
    @property
    def identity(self) -> str:
        """Equal for the same files (the manager's cache key)."""
    def has(self, component: str) -> bool: ...
    def class_name(self, component: str) -> str: ...
    def config(self, component: str) -> dict: ...
    def weight_bytes(self, component: str) -> int: ...
    def narrow_weights(self, component: str) -> bool:
        """Whether the component is stored narrower than it computes (fp8): it is then kept so in host memory and
        streamed block by block (widened on the compute device) rather than loaded whole."""
    def load(self, component: ComponentSpec, dtype: torch.dtype | None) -> Any:
        """The whole component in host memory (tokenizers, processors and scheduler configs included)."""
    def weights(self, component: ComponentSpec, dtype: torch.dtype | None) -> Any:
        """A ``SafetensorsWeights`` for the component's tensors, for loading straight into offloaded memory."""
    def empty_model(self, component: ComponentSpec, dtype: torch.dtype | None) -> nn.Module:
        """The component built on the meta device (buffers computed), for streaming or sharding."""
    def describe(self) -> dict:
        """Plain data from which a worker process reopens the same source (``weights.open_source``)."""
    def pipeline_config(self) -> dict:
        """The pipeline's own settings (``model_index.json`` without its components: Wan2.2's ``boundary_ratio``);
        empty when no Diffusers folder gives them."""


class FamilyStages(Protocol):
    """The family-specific steps of a generation. Every tensor a stage returns lives on the CPU."""

    def latent_space(self, source: ModelSource) -> LatentSpace: ...
    def check_params(self, source: ModelSource, params: SamplingParams) -> None:
        """Model-specific limits beyond the latent geometry (e.g. a rotary table's length)."""
    def encode_text(self, tokenizer: Any, encoder: nn.Module, text: str, device: torch.device) -> torch.Tensor: ...
    def prepare_image(self, image: Any) -> Any:
        """A user's start image (PIL, path, array, ComfyUI IMAGE) in the form the other image steps take."""
    def encode_image(self, processor: Any, encoder: nn.Module, image: Any, device: torch.device) -> torch.Tensor: ...
    def image_condition(
        self, vae: nn.Module, image: Any, params: SamplingParams, space: LatentSpace, device: torch.device,
        tiling: str = "off", available_bytes: int | None = None,
    ) -> torch.Tensor:
        """The start image's conditioning; ``tiling`` (auto/on/off) and the device's free bytes bound the VAE's
        activation memory where the family can tile exactly."""
    def noise_predictor(
        self, dit: nn.Module, conditioning: Conditioning, device: torch.device, dtype: torch.dtype
    ) -> BranchPredictor: ...
    def dit_for_step(self, source: ModelSource, dits: tuple[str, ...], timestep: float, num_train_timesteps: int,
                     params: SamplingParams) -> str:
        """The denoising loop's choice of DiT for the step at ``timestep`` (one DiT: always it; two experts: by the
        boundary, which ``params.boundary_ratio`` may override)."""
    def decode(self, vae: nn.Module, latents: torch.Tensor, space: LatentSpace, device: torch.device,
               tiling: str = "off", available_bytes: int | None = None) -> torch.Tensor:
        """Normalised latents -> frames ``[F, H, W, 3]`` float32 in 0..1 (``tiling`` as for ``image_condition``)."""
    def sequence_parallel_heads(self, dit_config: dict) -> int | None:
        """Attention heads that Ulysses splits over GPUs; None if the DiT does not support sequence parallelism."""
    def tokenwise_modules(self, dit: nn.Module) -> list[nn.Module]:
        """The DiT's modules that act on each token independently (feed-forward networks), with the sequence on
        dim 1 of their input and output: they may run over chunks of the sequence with the same result."""

    def chunk_blocks(self, dit: nn.Module, max_tokens: int | None) -> bool:
        """Run the DiT's blocks with *every* token-wise step (norms, modulation, projections, feed-forward) over
        slices of ``max_tokens`` tokens, attention whole (None: the blocks' own forward). False when the family
        has no such forward: then only :meth:`tokenwise_modules` are chunked."""

    # Optional step (looked up with getattr; a family without it keeps the denoising loop's latents unchanged):
    #   finish_latents(latents, conditioning) -> latents: the sampled latents as the pipeline returns them, e.g. the
    #       start frame pasted back in (Wan2.2 TI2V-5B).
    #   kernel_compile(dit_config, dtype, device) -> Callable[[], None] | None: the compile, running nothing, of the
    #       GPU kernels the DiT's forward will launch on ``device``, built in the caller's thread and returned to be
    #       run in the background (the offload manager does so when it places a DiT: ``core.background``).
    #   decode_planner(vae_cls, vae_config, dtype, latent_shape, tiling, available_bytes) -> Callable | None: the
    #       planning of a decode to come (``decode``'s tiling choice for that memory), prepared in the caller's thread
    #       and returned to be run in the background while the DiT samples (``pipeline.stages``).


@dataclass(frozen=True)
class ModelSpec:
    """One pipeline of a family: see the module docstring."""

    name: str
    """Human name, e.g. ``wan2.1-t2v``."""
    family: str
    pipeline_class: str
    """The ``_class_name`` of ``model_index.json`` this spec reads."""
    components: tuple[ComponentSpec, ...]
    stages: FamilyStages
    module: str
    """``__name__`` of the module defining the spec; workers import it to find the spec again."""
    image_to_video: bool = False
    optional_image: bool = False
    """Takes a start image or not, both through the same model (Wan2.2 TI2V-5B); ``image_to_video`` requires one."""
    parallelize: Callable[..., Any] | None = None
    """``parallelize(model, plan, device, *, cpu_offload, pin_memory)`` for FSDP workers; None: no worker group."""
    worker_methods: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    """Methods the worker group serves, ``method(worker, payload, observer) -> reply``."""
    matches: Callable[[dict], bool] | None = None
    """Extra test on ``model_index.json`` beyond the class name (e.g. a second expert present)."""
    check_configs: Callable[[ModelSource], None] | None = None
    """Optional: refuse a source whose configs are out of bounds or disagree with its weights' headers (raises
    ``ModelLoadError``). Run when the model is opened, before anything is built (``core.config_checks``)."""
    memory_model: Callable[[ModelSource], Any] | None = None
    """Optional: the family's per-token and per-pixel memory figures (``core.memory_estimate.MemoryModel``) for the
    estimate made before a job starts; without one only the host-side check runs."""
    files: Mapping[str, ComponentFiles] = field(default_factory=dict)
    """How a model of this pipeline is read from single files, per component (empty: folders only). The DiT's
    format also picks the spec: the first registered spec whose DiT format recognises a file reads it."""
    read_lora: Callable[..., Any] | None = None
    """Optional: ``read_lora(path, shapes, what) -> weight_patches.PatchFile``, the family's LoRA file formats read
    onto a DiT whose tensors have ``shapes`` (its own names); None: this family takes no LoRAs."""

    def component(self, name: str) -> ComponentSpec:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(f"{self.name} has no component {name!r}")

    def by_role(self, role: Role) -> tuple[ComponentSpec, ...]:
        return tuple(c for c in self.components if c.role is role)

    def first(self, role: Role) -> ComponentSpec | None:
        found = self.by_role(role)
        return found[0] if found else None


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of the model's repeated blocks, found from what the class declares.

    diffusers models name their repeated block classes in ``_repeated_blocks`` (and the blocks that must stay whole
    in ``_no_split_modules``); the list holding instances of them is what layerwise offload streams and FSDP shards.
    """
    declared = list(getattr(model, "_repeated_blocks", None) or []) or list(getattr(model, "_no_split_modules", None) or [])
    if not declared:
        raise ValueError(
            f"{type(model).__name__} declares no _repeated_blocks or _no_split_modules: cannot tell which modules "
            "are its blocks. Declare _repeated_blocks = ['<BlockClass>'] on the model class."
        )
    def is_block(module: nn.Module) -> bool:  # by class name, through subclasses (FSDP wraps classes)
        return any(cls.__name__ in declared for cls in type(module).__mro__)

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(is_block(m) for m in module):
            return name, module
    raise ValueError(f"{type(model).__name__} has no nn.ModuleList of {declared}")
