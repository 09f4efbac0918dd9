"""Weight patches (LoRAs): deltas added to a model's weights on the device, never to its host master copy.

A LoRA changes a weight ``W`` by ``strength * (alpha / rank) * up @ down`` (a low-rank term) or by
``strength * diff`` (a full delta, ComfyUI's ``.diff`` / ``.diff_b`` keys). This module is the model-agnostic part:

- :class:`LowRank` and :class:`Delta`, the two kinds of term, and :class:`PatchFile`, one LoRA file's terms keyed by
  the model's own tensor names (a family maps its file formats onto those names);
- :class:`PatchSet`, the LoRAs applied to one DiT with their strengths. Two sets are equal when they hold the same
  files (by identity) at the same strengths: what decides whether anything on the device must change;
- :func:`apply_terms`, the one arithmetic rule, in place on the device copy of a weight, in that copy's dtype:
  ``W.addmm_(up, down, alpha=strength * alpha / rank)``. The product accumulates in float32 (on a GPU: cuBLAS's
  accumulator and epilogue) and the sum is rounded once to ``W``'s dtype - ComfyUI's rule (``weight_adapter/
  lora.py``: the product in float32, added to the weight widened to float32, rounded back), with the factors
  rounded to the compute dtype first (LoRA files are bf16/fp16 already, so usually exactly);
- :class:`BlockPatcher`, which adds a streamed block's terms to the slot the block was just copied (and widened)
  into, and :class:`LinearSidePaths`, which run the terms of Linear layers outside the streamed blocks as a
  low-rank side path (see ``layerwise.py`` for why each is used where).

Nothing here ever writes host memory a model's weights live in: patched values exist only in device copies
(slots, resident copies), and changing a LoRA or its strength means copying the affected weights from the
untouched host copy again, then adding the new terms.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .host_memory import FlatLayout, HostArena

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LowRank:
    """``scale * up @ down``: ``up`` is ``(out, rank)``, ``down`` is ``(rank, in, *kernel)`` (a conv's kernel
    flattened into the input side, as ComfyUI flattens it)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    """``alpha / rank`` (1 when the file has no alpha)."""

    def check(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why these factors cannot patch a weight of ``shape`` (None: they can)."""
        inner = 1
        for size in shape[1:]:
            inner *= size
        rank = self.down.shape[0]
        if self.up.ndim < 2 or self.up.shape[1] != rank or any(s != 1 for s in self.up.shape[2:]):
            return f"its up factor {tuple(self.up.shape)} does not pair with its down factor {tuple(self.down.shape)}"
        if len(shape) < 2 or self.up.shape[0] != shape[0] or self.down[0].numel() != inner:
            return (f"it is ({self.up.shape[0]} x rank {rank} x {self.down[0].numel()}) but {name} is "
                    f"{tuple(shape)}")
        return None


@dataclass(frozen=True, eq=False)
class Delta:
    """A full delta of the weight's own shape (ComfyUI's ``.diff`` for weights, ``.diff_b`` for biases)."""

    value: torch.Tensor

    def check(self, name: str, shape: tuple[int, ...]) -> str | None:
        if tuple(self.value.shape) != tuple(shape):
            return f"it is {tuple(self.value.shape)} but {name} is {tuple(shape)}"
        return None


Term = LowRank | Delta


@dataclass(frozen=True, eq=False)
class PatchFile:
    """One LoRA file read for one model: its terms by the model's tensor name (``blocks.0.attn1.to_q.weight``), at
    strength 1. Compared by identity: the same file read twice is two objects (and costs one re-patch)."""

    name: str
    """What the user picked (the file name), for messages."""
    targets: Mapping[str, tuple[Term, ...]]

    def __repr__(self) -> str:
        return f"PatchFile({self.name!r}, {len(self.targets)} tensors)"


@dataclass(frozen=True)
class PatchSet:
    """The LoRAs applied to one DiT, each with its strength (in the order given: terms add up in that order)."""

    entries: tuple[tuple[PatchFile, float], ...] = ()

    def __post_init__(self) -> None:
        for entry in self.entries:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], PatchFile)):
                raise TypeError(f"PatchSet entries are (PatchFile, strength) pairs, got {entry!r}")
            strength = entry[1]
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength != strength or abs(strength) == float("inf"):
                raise ValueError(f"{entry[0].name}: strength must be a finite number, got {strength!r}")

    def __bool__(self) -> bool:
        return any(strength != 0 for _, strength in self.entries)

    def targets(self) -> dict[str, list[tuple[Term, float]]]:
        """Tensor name -> the terms to add to it, each with its strength (files at strength 0 left out)."""
        found: dict[str, list[tuple[Term, float]]] = {}
        for patch_file, strength in self.entries:
            if strength == 0:
                continue
            for name, terms in patch_file.targets.items():
                found.setdefault(name, []).extend((term, float(strength)) for term in terms)
        return found

    def describe(self) -> str:
        return ", ".join(f"{f.name} x{s:g}" for f, s in self.entries) or "no LoRA"


NO_PATCHES = PatchSet()


def check_targets(patches: PatchSet, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse terms whose tensor ``where`` does not have or whose shape does not fit (a family checks its files
    when reading them; this is the model-agnostic last line, naming the file)."""
    for patch_file, _ in patches.entries:
        for name, terms in patch_file.targets.items():
            if name not in shapes:
                raise ValueError(f"LoRA {patch_file.name}: {where} has no tensor {name}")
            for term in terms:
                problem = term.check(name, shapes[name])
                if problem:
                    raise ValueError(f"LoRA {patch_file.name} does not fit {where}: {problem}")


def coefficient(term: Term, strength: float) -> float:
    return strength * term.scale if isinstance(term, LowRank) else strength


def apply_terms(weight: torch.Tensor, terms: Iterable[tuple[torch.Tensor, torch.Tensor | None, float]]) -> None:
    """Add terms to ``weight`` in place, on the current stream. Each term is ``(a, b, c)``: ``W += c * a @ b`` with
    ``a`` ``(out, rank)`` and ``b`` ``(rank, rest)``, or ``W += c * a`` when ``b`` is None. Factors must already be
    on ``weight``'s device in its dtype (no allocation but the product's workspace)."""
    for a, b, c in terms:
        if b is None:
            weight.add_(a, alpha=c)
        else:
            weight.view(weight.shape[0], -1).addmm_(a, b, alpha=c)


def factor_tensors(term: Term, dtype: torch.dtype) -> list[torch.Tensor]:
    """The factors of ``term`` as :func:`apply_terms` takes them, on the CPU in ``dtype`` (matrices for
    ``LowRank``: ``up`` 2-D, ``down`` flattened to 2-D)."""
    if isinstance(term, LowRank):
        return [term.up.reshape(term.up.shape[0], -1).to(dtype), term.down.reshape(term.down.shape[0], -1).to(dtype)]
    return [term.value.to(dtype)]


def patch_tensor(weight: torch.Tensor, terms: Sequence[tuple[Term, float]]) -> None:
    """Add ``terms`` to ``weight`` (a device copy) in place: factors copied to its device for the call (a one-off
    placement, not a streamed step)."""
    ready = []
    for term, strength in terms:
        factors = [t.to(weight.device, non_blocking=False) for t in factor_tensors(term, weight.dtype)]
        ready.append((factors[0], factors[1] if len(factors) == 2 else None, coefficient(term, strength)))
    apply_terms(weight, ready)


# ---------------------------------------------------------------------------------------------- streamed blocks


@dataclass(frozen=True)
class _Op:
    slot: int
    """Index of the patched tensor in the block's layout."""
    first: int
    second: int | None
    """Indices of its factors in the block's factor layout (second None: a full delta)."""
    coefficient: float


@dataclass
class _BlockFactors:
    layout: FlatLayout
    offset: int
    ops: tuple[_Op, ...]
    host_views: list[torch.Tensor] = field(default_factory=list)


class BlockPatcher:
    """The terms of a streamed model's blocks, and the step that adds them to a block's device copy.

    Each block's factors are kept in host memory once, in the compute dtype, laid out flat like the block itself
    (one ``HostArena``, pinned when the blocks' arena is, so their copy is a true async DMA); :meth:`apply` copies
    one block's factors (a few MB for a rank-64 LoRA on a 14B block of 700 MB) into one device scratch buffer and
    adds the terms to the slot's tensors. It runs on the copy stream right after the block's copy (and fp8 decode),
    before the slot is marked loaded: the block's compute never waits for it, and the scratch buffer is only ever
    used by that stream, in order, so one serves every slot. :meth:`apply_now` does the same on the current stream
    for a resident block (a one-off, with its own temporary buffer).

    Costs: host memory for the factors (a rank-64 LoRA on every Linear of a 14B DiT: about 0.6 GB in bf16, beside
    the ``PatchFile`` the caller keeps to re-patch at another strength), one block's factors of device memory, and
    per streamed block one thin matmul per patched weight on the copy stream, which the next block's copy waits
    behind (stream order): negligible where compute hides the copies (81 frames), visible where the copies are the
    bottleneck already (short videos on 14B).
    """

    def __init__(self, block_terms: Mapping[int, Mapping[int, Sequence[tuple[Term, float]]]], layout: FlatLayout,
                 device: torch.device, pin: bool):
        """``block_terms[i][s]``: the terms of tensor ``layout.slots[s]`` of block ``i``."""
        self.device = device
        self._blocks: dict[int, _BlockFactors] = {}
        offset = 0
        staged: list[tuple[int, list[torch.Tensor]]] = []
        for index in sorted(block_terms):
            named: list[tuple[str, torch.Tensor]] = []
            ops: list[_Op] = []
            for slot_index in sorted(block_terms[index]):
                dtype = layout.slots[slot_index].dtype
                for term, strength in block_terms[index][slot_index]:
                    factors = factor_tensors(term, dtype)
                    first = len(named)
                    named += [(f"{slot_index}.{len(named) + k}", t) for k, t in enumerate(factors)]
                    ops.append(_Op(slot_index, first, first + 1 if len(factors) == 2 else None, coefficient(term, strength)))
            if not ops:
                continue
            factor_layout = FlatLayout.of(named)
            self._blocks[index] = _BlockFactors(factor_layout, offset, tuple(ops))
            staged.append((index, [t for _, t in named]))
            offset += factor_layout.nbytes
        self.nbytes_per_block = max((b.layout.nbytes for b in self._blocks.values()), default=0)
        self._arena = HostArena(offset, pin=pin and device.type == "cuda") if offset else None
        for index, tensors in staged:
            block = self._blocks[index]
            flat = self._arena.buffer[block.offset:block.offset + block.layout.nbytes]
            block.host_views = [s.view_into(flat) for s in block.layout.slots]
            for view, tensor in zip(block.host_views, tensors):
                view.copy_(tensor)
        self._scratch: torch.Tensor | None = None

    @property
    def blocks(self) -> tuple[int, ...]:
        """The blocks that have terms."""
        return tuple(self._blocks)

    @property
    def host_bytes(self) -> int:
        return 0 if self._arena is None else self._arena.nbytes

    @property
    def device_bytes(self) -> int:
        return 0 if self._scratch is None else self._scratch.numel()

    def _factors(self, block: _BlockFactors, buffer: torch.Tensor | None) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return block.host_views  # the CPU computes from host memory directly
        flat = buffer[:block.layout.nbytes]
        flat.copy_(self._arena.buffer[block.offset:block.offset + block.layout.nbytes], non_blocking=True)
        return [s.view_into(flat) for s in block.layout.slots]

    @staticmethod
    def _run(block: _BlockFactors, factors: list[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
        for op in block.ops:
            second = None if op.second is None else factors[op.second]
            apply_terms(views[op.slot], ((factors[op.first], second, op.coefficient),))

    def apply(self, index: int, views: Sequence[torch.Tensor]) -> None:
        """Add block ``index``'s terms to ``views`` (the block's tensors in a slot), on the current stream - the
        copy stream, after the block's copy. No host synchronisation."""
        block = self._blocks.get(index)
        if block is None:
            return
        if self.device.type != "cpu" and self._scratch is None:
            self._scratch = torch.empty(self.nbytes_per_block, dtype=torch.uint8, device=self.device)
        self._run(block, self._factors(block, self._scratch), views)

    def apply_now(self, index: int, views: Sequence[torch.Tensor]) -> None:
        """:meth:`apply` for a resident block, on the current stream, with a temporary buffer of its own (freed on
        that stream after its readers, by the caching allocator's stream order)."""
        block = self._blocks.get(index)
        if block is None:
            return
        buffer = None
        if self.device.type != "cpu":
            buffer = torch.empty(block.layout.nbytes, dtype=torch.uint8, device=self.device)
        self._run(block, self._factors(block, buffer), views)

    def release_device(self) -> None:
        """Drop the scratch buffer (made again on the next :meth:`apply`). Callers synchronise first."""
        self._scratch = None

    def close(self) -> None:
        """Drop the scratch buffer and unpin the factors. Idempotent; callers synchronise first."""
        self._scratch = None
        if self._arena is not None:
            self._arena.release()


def merge_into_resident(model: nn.Module, patches: PatchSet, block_prefix: str = "blocks.") -> LinearSidePaths:
    """The reference a streamed LoRA is checked against: the terms of tensors under ``block_prefix`` merged once
    into ``model``'s own weights (what each slot gets after its copy), the rest run as side paths (installed and
    returned), as the offloader runs them."""
    params = dict(model.named_parameters())
    others = {}
    with torch.no_grad():
        for name, terms in patches.targets().items():
            if name.startswith(block_prefix):
                patch_tensor(params[name].data, terms)
            else:
                others[name] = terms
    side = LinearSidePaths(model, others)
    side.install()
    return side


# ---------------------------------------------------------------------------------------------- side paths


class LinearSidePaths:
    """Terms of ``nn.Linear`` layers that are not streamed, run beside the layer: ``y + c * (x @ down^T) @ up^T``
    (``+ c * x @ diff^T``, ``+ c * diff_b``), as forward hooks named ``weight_patch``.

    Used for the layers a layerwise offloader keeps on the device outside its blocks (embeddings, the output
    projection): their device copy is the only copy there is (read straight from the file, or moved from host
    memory), so merging a LoRA into it could not be undone exactly. A side path leaves the weight as it is; it costs
    two thin matmuls per call on layers that run once per forward. Factors are cast to the layer's dtype and moved
    to its device on first use, and dropped by :meth:`release_device`.
    """

    def __init__(self, model: nn.Module, terms: Mapping[str, Sequence[tuple[Term, float]]]):
        """``terms``: model tensor name (``proj_out.weight``, ``proj_out.bias``) -> its terms."""
        self._layers: dict[str, list[tuple[str, Term, float]]] = {}
        for name, entries in terms.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
                raise ValueError(
                    f"cannot apply a LoRA to {name}: outside the streamed blocks only the weight and bias of Linear "
                    f"layers can be patched ({module_name or type(model).__name__} is a {type(module).__name__})"
                )
            self._layers.setdefault(module_name, []).extend((attr, term, strength) for term, strength in entries)
        self._modules = {name: model.get_submodule(name) for name in self._layers}
        self._ready: dict[str, list[tuple[torch.Tensor, torch.Tensor | None, float, str]]] = {}
        self._handles: list = []

    def install(self) -> None:
        """Register the hooks. Idempotent."""
        if self._handles:
            return
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def weight_patch(module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            for a, b, c, attr in self._device_terms(name, module.weight):
                if attr == "bias":
                    output = output + c * a
                elif b is None:
                    output = output + c * F.linear(x, a)
                else:
                    output = output + c * F.linear(F.linear(x, b), a)
            return output

        return weight_patch

    def _device_terms(self, name: str, weight: torch.Tensor):
        ready = self._ready.get(name)
        if ready is None or (ready and ready[0][0].device != weight.device):
            ready = []
            for attr, term, strength in self._layers[name]:
                factors = [t.to(weight.device) for t in factor_tensors(term, weight.dtype)]
                ready.append((factors[0], factors[1] if len(factors) == 2 else None, coefficient(term, strength), attr))
            self._ready[name] = ready
        return ready

    def release_device(self) -> None:
        self._ready.clear()

    def remove(self) -> None:
        """Remove the hooks and drop the device factors. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._ready.clear()
