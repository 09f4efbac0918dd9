"""Weights kept in host memory narrower than they compute (fp8), and the step that widens them on the device.

A Comfy-Org ``*_fp8_scaled`` file stores each Linear weight as ``float8_e4m3fn`` plus a per-tensor float32
``scale_weight``. Widening it in host memory would double the host RAM and the PCIe bytes of every streamed block;
instead the stored bytes are kept as they are (1 byte per parameter), copied to the device as they are, and widened
there, into the slot the block computes from. This module holds the two pieces of that:

- :func:`dequantize`, the one arithmetic rule, which is ComfyUI's (``comfy/ops.py``, ``scaled_fp8_op``:
  ``cast_bias_weight`` casts the fp8 weight to the compute dtype, then ``weight * scale_weight.to(weight.dtype)``):
  **cast to the compute dtype first, then multiply by the scale cast to that same dtype**. Every fp8 cast is exact
  (e4m3 values are representable in float16, bfloat16 and float32), so the only rounding is the product's;
- :class:`StagedLayout`: a block's *stored* byte layout (what the host arena holds and what crosses PCIe: each
  tensor in its stored dtype, each scale already cast to the compute dtype) next to its *compute* layout (what
  the block's tensors point at while it runs), and :meth:`StagedLayout.decode`, which fills the second from the
  first in place with the same rule (``copy_`` casts, ``mul_`` by the 0-dim scale tensor): no allocation, so it
  can run on any stream.

Casting the scale to the compute dtype on the host, once, is bit-identical to casting it on the device (IEEE
round-to-nearest-even on both), and lets the device step be two in-place kernels per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .host_memory import FlatLayout, TensorSlot

NARROW_FLOATS = (torch.float8_e4m3fn, torch.float8_e5m2)
"""Stored dtypes that are kept as stored and widened on the device."""


@dataclass(frozen=True)
class StoredFormat:
    """How one tensor is kept in host memory when that differs from the dtype it computes in."""

    dtype: torch.dtype
    """The stored dtype (``float8_e4m3fn``)."""
    scale: torch.Tensor | None = None
    """The per-tensor scale (float32, 0-dim) of a "scaled" file; None: plain cast."""


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``stored`` widened to ``dtype`` as ComfyUI computes it: cast first, then times the scale cast to ``dtype``."""
    out = stored.to(dtype)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=dtype)
    return out


@dataclass(frozen=True)
class DecodeStep:
    """One tensor of a block: where its compute copy, its stored bytes and (scaled files) its scale are."""

    compute: TensorSlot
    stored: TensorSlot
    scale: TensorSlot | None


@dataclass(frozen=True)
class StagedLayout:
    """A block as stored in host memory (``stored``) and as computed (``compute``), and how one becomes the other."""

    compute: FlatLayout
    stored: FlatLayout
    steps: tuple[DecodeStep, ...]

    @classmethod
    def of(cls, compute: FlatLayout, formats: Sequence[StoredFormat | None]) -> StagedLayout:
        """``formats[i]`` is the stored format of ``compute.slots[i]`` (None: stored in its compute dtype). The
        stored layout keeps the compute layout's order, then one compute-dtype scalar per scaled tensor."""
        stored_named: list[tuple[str, torch.Tensor]] = []
        for slot, fmt in zip(compute.slots, formats, strict=True):
            dtype = slot.dtype if fmt is None else fmt.dtype
            stored_named.append((slot.name, torch.empty(slot.shape, dtype=dtype, device="meta")))
        scaled = [(i, slot) for i, (slot, fmt) in enumerate(zip(compute.slots, formats)) if fmt is not None and fmt.scale is not None]
        for _, slot in scaled:
            stored_named.append((slot.name + ":scale", torch.empty((), dtype=slot.dtype, device="meta")))
        stored = FlatLayout.of(stored_named)
        scale_of = {i: stored.slots[len(compute.slots) + k] for k, (i, _) in enumerate(scaled)}
        steps = tuple(DecodeStep(c, s, scale_of.get(i)) for i, (c, s) in enumerate(zip(compute.slots, stored.slots)))
        return cls(compute, stored, steps)

    def fill_scales(self, stored_flat: torch.Tensor, formats: Sequence[StoredFormat | None]) -> None:
        """Write each scale, cast to its tensor's compute dtype, into a block's stored bytes (host side, once)."""
        for step, fmt in zip(self.steps, formats):
            if step.scale is not None:
                step.scale.view_into(stored_flat).copy_(fmt.scale.to(step.compute.dtype))

    def views(self, stored_flat: torch.Tensor, compute_flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(compute view, stored view, scale view)`` per tensor, for :meth:`decode` (built once per buffer pair)."""
        return [
            (s.compute.view_into(compute_flat), s.stored.view_into(stored_flat),
             None if s.scale is None else s.scale.view_into(stored_flat))
            for s in self.steps
        ]

    def decode_copy(self, stored_flat: torch.Tensor, compute_flat: torch.Tensor) -> None:
        """Copy a block's stored bytes to ``compute_flat``'s device and widen them there, on the current stream (a
        resident block: once, at placement). The temporary raw buffer is freed on that stream, after its readers."""
        raw = torch.empty(self.stored.nbytes, dtype=torch.uint8, device=compute_flat.device)
        raw.copy_(stored_flat, non_blocking=True)
        self.decode(self.views(raw, compute_flat))

    def resting_views(self, stored_flat: torch.Tensor) -> list[torch.Tensor]:
        """What a block's tensors point at between forwards: the host copy of those stored in their compute dtype,
        and for the narrow ones a NaN that takes no memory (one element, zero strides), so the module keeps its
        shapes and dtypes on the CPU and any use of it outside the streaming pipeline shows as NaN rather than as
        plausible numbers."""
        views = []
        for step in self.steps:
            if step.stored.dtype == step.compute.dtype:
                views.append(step.stored.view_into(stored_flat))
            else:
                views.append(torch.full((), float("nan"), dtype=step.compute.dtype).expand(step.compute.shape))
        return views

    @staticmethod
    def decode(views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        """Fill the compute copy from the stored bytes, in place, on the current stream: :func:`dequantize`'s rule
        (``copy_`` is the cast, ``mul_`` by the 0-dim compute-dtype scale is the product, rounded once)."""
        for compute, stored, scale in views:
            compute.copy_(stored)
            if scale is not None:
                compute.mul_(scale)
