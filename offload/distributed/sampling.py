"""The ``sample`` worker method: the denoising loop inside the worker group, for any family.

A family lists it in its spec's ``worker_methods``; the payload is plain data built by the pipeline
(``pipeline.stages``): sampling parameters, the scheduler's class and config, the initial noise and the
conditioning tensors. Every rank runs the same loop; the family's predictor runs its DiT pass, the CFG branches are
split over the mesh, and the family's denoising loop picks the DiT of each step.
"""

from __future__ import annotations

from typing import Any

from ..config import SamplingParams
from ..core.denoise import Conditioning, denoise, make_scheduler
from ..core.experts import ExpertSchedule
from ..core.spec import Role
from .fsdp import cfg_parallel_prediction


def sample_payload(conditioning: Conditioning, params: SamplingParams, scheduler: tuple[str, dict], noise: Any) -> dict:
    """What the pipeline sends to ``sample_in_workers``."""
    return {
        "params": params.as_dict(),
        "scheduler_class": scheduler[0],
        "scheduler_config": scheduler[1],
        "noise": noise.contiguous(),
        "conditioning": conditioning.tensors(),
    }


def sample_in_workers(worker: Any, payload: dict, observer: Any) -> dict:
    """Denoise ``payload["noise"]`` on every rank; the reply holds the latents (identical on every rank)."""
    spec = worker.model_spec
    params = SamplingParams(**payload["params"])
    scheduler = make_scheduler(
        spec.first(Role.SCHEDULER).resolve, payload["scheduler_class"], payload["scheduler_config"], params.flow_shift,
        params.sampler,
    )
    conditioning = Conditioning.from_tensors(payload["conditioning"])
    predictors = {
        name: spec.stages.noise_predictor(model, conditioning, worker.device, worker.dtype)
        for name, model in worker.models.items()
    }
    dits = tuple(worker.models)
    num_train = int(scheduler.config.get("num_train_timesteps", 1000))

    schedule: list[ExpertSchedule] = []

    def predict(index, latents, timestep):
        if not schedule:  # the scheduler's timesteps are set by now
            schedule.append(ExpertSchedule.of(spec.stages, worker.source, dits, scheduler.timesteps, num_train, params))
        name = schedule[0].dit(index)
        scale, guided = schedule[0].guidance(index)
        return cfg_parallel_prediction(predictors[name], latents, timestep, scale, worker.parallelism[name], guided)

    return {"latents": denoise(predict, scheduler, params, payload["noise"], worker.device, observer)}
