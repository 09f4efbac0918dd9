"""Wan2.2 A14B rows of bench/layerwise.py: two experts, one set of slots, no stall at the switch.

A denoising-like run of ``--a14b-steps`` steps, each two forwards at batch 1 (classifier-free guidance), the
high-noise expert for the first half and the low-noise expert after, from one latent carried step to step. Modes:

- ``a14b_resident``: both experts on the GPU (the reference: time and bits).
- ``a14b_stream``: both streamed through one shared set of slots (``core.slot_sharing``), the low-noise expert's
  first blocks prefetched during the last high-noise step (``LayerwiseOffloader.hand_over``), as the pipeline does.
- ``a14b_stream_no_prefetch``: the same slots without that notice: what the switch costs when nobody prepares it.

Per row: the median step against resident (target <=1.02x at 81 frames), the steps on both sides of the switch
against their neighbours (target <=1.05x), peak VRAM against one set of slots, and host memory of both experts.
Weights are random, in the real configs' shapes (the low-noise expert from another seed). Every streamed row is
checked bit for bit against resident.

    python bench/layerwise.py --configs a14b --frames 81,17          # on an H200: two 14B experts, 57 GB of RAM
                                                                      # and of disk (--a14b-one-folder: 28.6 GB)
    python bench/layerwise.py --configs a14b-tiny --tiny             # seconds on a CPU: every code path
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

from layerwise import (A14B_CONFIGS, CONFIGS, GiB, bit_equal, host_memory, make_inputs, sync,  # noqa: E402
                       write_random_weights)
from video_offload.offload.core.slot_sharing import SharedSlots  # noqa: E402
from video_offload.offload.weights.streaming import layerwise_from_pretrained  # noqa: E402

A14B_MODES = ("a14b_resident", "a14b_stream", "a14b_stream_no_prefetch")


def setup(mode: str, folders: tuple[Path, Path], device, dtype, prefetch_depth: int):
    """``(high, low, offloaders)`` for a mode."""
    from diffusers import WanTransformer3DModel

    if mode == "a14b_resident":
        models = tuple(WanTransformer3DModel.from_pretrained(str(f), dtype=dtype).to(device) for f in folders)
        if device.type == "cpu":  # own allocations, as the offloader's: CPU kernels may differ on mmapped file views
            for t in (t for m in models for t in (*m.parameters(), *m.buffers())):
                t.data = t.data.clone()
        return models + ((),)
    shared = SharedSlots("a14b bench")
    offloaders = [
        layerwise_from_pretrained(f, device, model_cls=WanTransformer3DModel, dtype=dtype, pin_cpu_memory=True,
                                  prefetch_depth=prefetch_depth, shared_slots=shared)
        for f in folders
    ]
    return offloaders[0].model, offloaders[1].model, tuple(offloaders)


def run_steps(high, low, offloaders, inputs, steps: int, switch: int, device, prefetch: bool):
    """One run: ``steps`` steps of two forwards, ``high`` before step ``switch``. Returns the final latent and the
    time of each step (CUDA events on the compute stream; host time on a CPU)."""
    x, _, text = inputs
    negative = torch.flip(text, dims=[1])
    times = []
    with torch.inference_mode():
        for i in range(steps):
            model = high if i < switch else low
            if prefetch and offloaders and i == switch - 1:
                offloaders[0].hand_over(offloaders[1], after_forwards=2)
            timestep = torch.tensor([999.0 * (1 - i / steps)], device=device)
            t0 = time.perf_counter()
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            cond = model(x, timestep, text, return_dict=False)[0]
            uncond = model(x, timestep, negative, return_dict=False)[0]
            x = (x - 0.05 * (uncond + 3.0 * (cond - uncond))).to(x.dtype)
            if device.type == "cuda":
                end.record()
                times.append((begin, end))
            else:
                times.append(time.perf_counter() - t0)
        sync(device)
    if device.type == "cuda":
        times = [b.elapsed_time(e) / 1e3 for b, e in times]
    return x.detach().to("cpu"), times


def switch_figures(times: list[float], switch: int) -> dict:
    """The steps on both sides of the switch against their neighbours (every other step but the first, whose
    expert takes the slots back from the previous run's last one)."""
    crossing = [switch - 1, switch]
    neighbours = [t for i, t in enumerate(times) if i not in crossing and i != 0]
    reference = statistics.median(neighbours)
    worst = max(times[i] for i in crossing)
    return {
        "s_last_high_step": round(times[switch - 1], 4),
        "s_first_low_step": round(times[switch], 4),
        "s_neighbour_median": round(reference, 4),
        "switch_ratio": round(worst / reference, 4),
    }


def run_a14b(name: str, args, device, dtype, emit, bandwidth) -> tuple[list[dict], list[str], list[str]]:
    config = CONFIGS[A14B_CONFIGS[name]]
    root = Path(args.workdir)
    high = root / f"wan-{A14B_CONFIGS[name]}"
    folders = (high, high if args.a14b_one_folder else root / f"wan-{A14B_CONFIGS[name]}-low-noise")
    write_s = write_random_weights(name, config, folders[0], dtype)
    if folders[1] != folders[0]:
        write_s += write_random_weights(name + " low noise", config, folders[1], dtype, seed=1)
    steps, switch = args.a14b_steps, args.a14b_steps // 2
    rows, failures, errors = [], [], []
    resident: dict[int, dict] = {}
    references: dict[int, torch.Tensor] = {}
    for mode in A14B_MODES:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rss_before = host_memory().get("VmRSS")
        started = time.perf_counter()
        try:
            high, low, offloaders = setup(mode, folders, device, dtype, args.prefetch_depth)
            sync(device)
        except Exception as e:  # an OOM in one mode must not hide the others
            errors.append(f"{name}/{mode}: {type(e).__name__}: {e}")
            emit({"config": name, "mode": mode, "error": f"{type(e).__name__}: {e}"})
            continue
        setup_s = time.perf_counter() - started
        rss_after = host_memory().get("VmRSS")
        weight_bytes = sum(t.numel() * t.element_size() for m in (high, low) for t in (*m.parameters(), *m.buffers()))
        try:
            for frames in args.frames:
                inputs, latent_frames, tokens = make_inputs(config, frames, args.height, args.width, args.text_tokens,
                                                            device, dtype)
                prefetch = mode == "a14b_stream"
                for _ in range(args.warmup):
                    run_steps(high, low, offloaders, inputs, steps, switch, device, prefetch)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                out, times = run_steps(high, low, offloaders, inputs, steps, switch, device, prefetch)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                stats = [o.stats() for o in offloaders]
                row = {
                    "config": name, "mode": mode, "frames": frames, "latent_frames": latent_frames, "tokens": tokens,
                    "height": args.height, "width": args.width, "steps": steps, "switch_at_step": switch,
                    "forwards_per_step": 2,
                    "s_per_step": statistics.median(times),
                    "s_per_step_all": [round(t, 4) for t in times],
                    **switch_figures(times, switch),
                    "ratio_to_resident": None,
                    "peak_vram_bytes": peak,
                    "peak_vram_gib": None if peak is None else round(peak / GiB, 3),
                    "weight_bytes": weight_bytes,
                    "slot_sets": len({id(o.slot_set) for o in offloaders if o.slot_set is not None}),
                    "slot_bytes": stats[0].slot_bytes if stats else None,
                    "non_block_bytes": sum(s.non_block_bytes for s in stats) if stats else None,
                    "host_arena_bytes": sum(s.host_bytes for s in stats) if stats else None,
                    "pinned_bytes": sum(s.pinned_bytes for s in stats) if stats else None,
                    "host_rss_delta_bytes": None if rss_before is None else (rss_after or 0) - rss_before,
                    "setup_s": round(setup_s, 2), "weights_write_s": round(write_s, 2),
                    "prefetch_depth": args.prefetch_depth if offloaders else None,
                    **bandwidth,
                }
                if mode == "a14b_resident":
                    resident[frames], references[frames] = row, out
                    row["ratio_to_resident"], row["bit_exact"] = 1.0, True
                else:
                    row["bit_exact"] = bit_equal(out, references[frames]) if frames in references else None
                    if row["bit_exact"] is False:
                        failures.append(f"{name}/{mode}/{frames} frames: output differs from the resident experts")
                    if frames in resident:
                        row["ratio_to_resident"] = round(row["s_per_step"] / resident[frames]["s_per_step"], 4)
                row["targets"] = a14b_targets(row, resident.get(frames))
                rows.append(row)
                emit(row)
                del inputs
        except Exception as e:
            errors.append(f"{name}/{mode}: {type(e).__name__}: {e}")
            emit({"config": name, "mode": mode, "error": f"{type(e).__name__}: {e}"})
        finally:
            for offloader in offloaders:
                offloader.close()
            del high, low, offloaders
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, failures, errors


def a14b_targets(row: dict, resident: dict | None) -> dict:
    """Issue 13's targets for a streamed A14B row (None where they cannot be judged)."""
    if row["mode"] != "a14b_stream" or resident is None:
        return {}
    targets = {"switch_le_1.05x_neighbours": row["switch_ratio"] <= 1.05, "one_slot_set": row["slot_sets"] == 1}
    if row["frames"] >= 81:
        targets["ratio_le_1.02"] = row["s_per_step"] <= 1.02 * resident["s_per_step"]
    if row["peak_vram_bytes"] is not None and resident["peak_vram_bytes"] is not None:
        # Resident activations, plus one set of slots and both experts' weights outside the blocks.
        limit = resident["peak_vram_bytes"] - resident["weight_bytes"] + row["slot_bytes"] + row["non_block_bytes"]
        targets["peak_vram_limit_bytes"] = limit
        targets["peak_vram_le_limit"] = row["peak_vram_bytes"] <= limit
    return targets
