"""The ``auto`` choice: walk the seed's recommended order by itself, one step per out-of-memory error.

It starts from the fastest placement (everything resident on one GPU; FSDP with nothing offloaded on several)
and, whenever a stage runs out of memory, turns on the next step of the recommended order, releases what is on the
device, and retries that stage. The level reached is remembered per model, so later runs start there. The levels
are derived from the order declared in ``config`` (``SINGLE_GPU_STEPS``/``MULTI_GPU_STEPS``), never written out
again here.
"""

from __future__ import annotations

import dataclasses

from ..config import OffloadConfig


def levels_for(config: OffloadConfig) -> tuple[dict, ...]:
    """Level 0 is the fastest placement; level i turns on the first i steps of the recommended order. On several
    GPUs the first step (FSDP itself) is always taken, so level 0 is plain FSDP. A choice option (tiling, chunking)
    keeps the config's own value - its "auto" already decides by free memory - until a step forces it "on"."""
    steps = config.recommended_steps()
    names = sorted({name for step in steps for name in step} | {"dit_layerwise_offload", "dit_cpu_offload"})
    off = {name: getattr(config, name) if isinstance(getattr(config, name), str) else False for name in names}
    if config.num_gpus > 1:
        off["use_fsdp_inference"] = True
        steps = steps[1:]
    levels = [dict(off)]
    current = dict(off)
    for step in steps:
        current.update({name: "on" if isinstance(off[name], str) else True for name in step})
        levels.append(dict(current))
    return tuple(levels)


def config_at_level(config: OffloadConfig, level: int) -> OffloadConfig:
    """The concrete options ``auto`` uses at ``level`` (pin, prefetch and residency are kept from ``config``)."""
    return dataclasses.replace(config, auto_offload=False, **levels_for(config)[level])


def describe(options: dict) -> str:
    on = [name for name, value in options.items() if value in (True, "on") and name != "use_fsdp_inference"]
    base = "FSDP" if options.get("use_fsdp_inference") else ""
    text = ", ".join(on) if on else "everything resident"
    return f"{base} + {text}" if base and on else (base or text)
