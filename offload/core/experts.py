"""Which DiT runs each denoising step, with which guidance, and where the loop switches from one to the next.

A model with several DiTs (Wan2.2 A14B: a high-noise expert for the first steps, a low-noise one after) is still
run by one loop (``denoise``): the family says which DiT a timestep belongs to (``FamilyStages.dit_for_step``) and
this schedule, made once per run from the scheduler's timesteps, answers the loop's questions: the DiT and guidance
of step ``i``, and whether the next step runs another DiT - so whoever streams the DiTs can load the next one's
first blocks during the last step of the current one instead of at the switch.

Guidance follows diffusers' two-expert pipelines exactly: the first DiT uses ``guidance_scale``, the others
``guidance_scale_2`` (defaulting to it); whether the negative pass runs at all is decided by ``guidance_scale``
alone (``do_classifier_free_guidance``), for every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import SamplingParams


@dataclass(frozen=True)
class ExpertSchedule:
    """The DiT of every step of one run."""

    dits: tuple[str, ...]
    """The model's DiTs, in the spec's order (the first is diffusers' ``transformer``)."""
    steps: tuple[str, ...]
    """The DiT of each step."""
    params: SamplingParams

    @classmethod
    def of(cls, stages: Any, source: Any, dits: tuple[str, ...], timesteps: Sequence[Any], num_train_timesteps: int,
           params: SamplingParams) -> ExpertSchedule:
        steps = tuple(stages.dit_for_step(source, dits, float(t), num_train_timesteps, params) for t in timesteps)
        return cls(dits, steps, params)

    def dit(self, index: int) -> str:
        return self.steps[index]

    def guidance(self, index: int) -> tuple[float, bool]:
        """``(scale, guided)`` of step ``index``: its DiT's scale, and whether the negative pass runs."""
        return self.params.guidance_for(self.dits.index(self.steps[index])), self.params.uses_guidance

    def next_dit(self, index: int) -> str | None:
        """The DiT of step ``index + 1`` when it differs from step ``index``'s (a switch follows), else None."""
        if index + 1 >= len(self.steps) or self.steps[index + 1] == self.steps[index]:
            return None
        return self.steps[index + 1]

    def counts(self) -> dict[str, int]:
        """Steps per DiT (for logs and tests)."""
        return {name: self.steps.count(name) for name in self.dits}
