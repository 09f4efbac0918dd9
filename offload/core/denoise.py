"""The denoising loop: initial noise, scheduler steps, classifier-free guidance.

Step for step what diffusers' pipelines do (``WanPipeline.__call__``), so the same seed gives the same video. Where
the DiT runs (resident, streamed layer by layer, or sharded over a worker group), and which DiT runs at each step,
is hidden behind the ``predict`` callable; this module only orders the steps and gives the host a chance to report
progress and stop between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from ..config import SamplingParams
from .spec import LatentSpace

Branch = Literal["cond", "uncond"]


@dataclass(frozen=True)
class Conditioning:
    """Everything the DiT is conditioned on besides the noisy latents. Tensors live on the CPU between stages."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    image_embeds: torch.Tensor | None = None
    """Image features (image-to-video models with an image encoder)."""
    image: Any = None
    """The start image (image-to-video only). Its VAE latents depend on the video's size, so they are made when
    sampling, into ``image_condition``."""
    image_condition: torch.Tensor | None = None
    """Latents (and mask) of the start image, as the family's DiT takes them (image-to-video only)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, by field name (plain data for a worker request)."""
        names = ("prompt_embeds", "negative_prompt_embeds", "image_embeds", "image_condition")
        return {n: getattr(self, n).contiguous() for n in names if getattr(self, n) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Conditioning:
        return cls(
            prompt_embeds=tensors["prompt_embeds"],
            negative_prompt_embeds=tensors.get("negative_prompt_embeds"),
            image_embeds=tensors.get("image_embeds"),
            image_condition=tensors.get("image_condition"),
        )


class BranchPredictor(Protocol):
    """One DiT pass for one guidance branch: the conditional (prompt) or unconditional (negative prompt) one."""

    has_uncond: bool

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch) -> torch.Tensor: ...


def guided_prediction(predictor: BranchPredictor, latents: torch.Tensor, timestep: torch.Tensor, scale: float,
                      guided: bool | None = None) -> torch.Tensor:
    """Classifier-free guidance as diffusers computes it: the two passes stay separate (not batched), so numbers
    match the reference and the activation peak stays that of a batch of one - the point is to fit small GPUs.

    ``guided`` says whether the negative pass runs (default: ``scale > 1``). Two-expert models pass it from the
    first expert's scale for every step, as diffusers decides it (``do_classifier_free_guidance``), so a second
    expert's scale of 1 still runs both passes and computes ``u + 1 * (c - u)``."""
    noise_pred = predictor(latents, timestep, "cond")
    if (scale > 1.0 if guided is None else guided) and predictor.has_uncond:
        noise_uncond = predictor(latents, timestep, "uncond")
        noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
    return noise_pred


def initial_noise(params: SamplingParams, space: LatentSpace) -> torch.Tensor:
    """The starting latents, drawn on the CPU from ``seed`` exactly as diffusers' ``randn_tensor`` draws them."""
    generator = torch.Generator("cpu").manual_seed(params.seed)
    return torch.randn(space.shape(params), generator=generator, dtype=torch.float32)


class StepObserver(Protocol):
    def before_step(self, index: int, total: int) -> None:
        """Called before each step; raise (e.g. an interrupt) to stop cleanly."""

    def after_step(self, index: int, total: int) -> None:
        """Called after each step, e.g. to advance a progress bar."""


Predict = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict(step_index, latents, timestep) -> guided noise prediction``."""


@torch.no_grad()
def denoise(
    predict: Predict,
    scheduler: Any,
    params: SamplingParams,
    noise: torch.Tensor,
    device: torch.device,
    observer: StepObserver | None = None,
) -> torch.Tensor:
    """Run ``params.num_inference_steps`` scheduler steps from ``noise``; return the final latents on the CPU."""
    scheduler.set_timesteps(params.num_inference_steps, device=device)
    scheduler.set_begin_index(0)
    latents = noise.to(device)
    timesteps = scheduler.timesteps
    total = len(timesteps)
    for index, t in enumerate(timesteps):
        if observer is not None:
            observer.before_step(index, total)
        noise_pred = predict(index, latents, t.expand(latents.shape[0]))
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if observer is not None:
            observer.after_step(index, total)
    return latents.to("cpu")


def make_scheduler(resolve_class: Callable[[str], type], class_name: str, config: dict, flow_shift: float | None,
                   sampler: str = "model") -> Any:
    """A fresh scheduler from a model's config, with ``flow_shift`` overridden when given. ``resolve_class`` maps
    the class name through the family's allow-list.

    ``sampler="euler"`` on a flow-matching UniPC config keeps its timesteps and makes every step first order with no
    corrector: UniPC's order-1 predictor in data-prediction form is the DDIM step, which for flow matching
    (``x_t = (1 - sigma) x0 + sigma noise``) is exactly Euler's ``x + (sigma_next - sigma) v``. It stays a scheduler
    diffusers' own pipelines accept, so their output remains the oracle."""
    cls = resolve_class(class_name)
    overrides: dict[str, Any] = {}
    if sampler == "euler" and class_name == "UniPCMultistepScheduler":
        overrides.update(solver_order=1, disable_corrector=list(range(1001)))
    if flow_shift is not None:
        if "flow_shift" in config or class_name == "UniPCMultistepScheduler":
            overrides["flow_shift"] = flow_shift
        else:
            overrides["shift"] = flow_shift
    return cls.from_config(config, **overrides)
