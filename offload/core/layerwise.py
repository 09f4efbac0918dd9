"""Layerwise DiT offload: transformer blocks live in host memory and stream through the GPU one step ahead of compute.

What it does, for any model whose blocks are an ``nn.ModuleList`` of identically shaped modules (Wan's ``blocks``):

- Host side: every block's parameters and buffers are laid out in one flat, page-aligned ``HostArena`` (one
  ``FlatLayout`` shared by all blocks), page-locked with ``pin_cpu_memory`` by registering that one buffer: exact
  bytes, no power-of-two rounding. Between forwards the blocks' tensors are views into it, so the module is a valid
  CPU module whenever no forward is running.
- GPU side: ``prefetch_depth + 1`` fixed slots of one block each (``block_slots.BlockSlots``). Before a streamed
  block runs, its tensors are pointed at the slot its bytes were copied into (``param.data = view``: parameter
  identity is kept); after it runs they are pointed back at the host views and the slot is handed to the next copy.
- Overlap: copies run on a dedicated stream, in streamed-block order with wrap-around, as soon as a slot is free:
  the copy of block ``j + depth + 1`` starts when block ``j`` has finished reading its slot, and the last block of a
  forward prefetches the first block of the next. Events order everything on the GPU; the host never waits.
- Partial residency: ``resident_blocks=N`` keeps N blocks on the GPU for good, spread evenly so every streamed
  block has compute in front of it to hide its copy behind. ``"auto"`` streams everything in the first forward
  while measuring its activation peak, then keeps as many blocks as fit in free memory minus that peak minus a
  margin; it measures again if a later forward has larger inputs.
- Robustness: a block's post-hook runs even when the block raises (``always_call``), and every forward starts by
  recovering from whatever an interrupted one left, so an exception or an interrupt anywhere leaves the model
  consistent and the next forward correct.
- Parameters and buffers outside the blocks are moved to the GPU and stay there.
- Narrow storage: when the weight source keeps a block tensor narrower than it computes (fp8, with a per-tensor
  scale: ``stored_format``), the host arena holds the stored bytes, those are what cross PCIe, and they are widened
  on the device into the slot the block computes from (``block_slots``: a raw buffer, then a decode on the copy
  stream). Between forwards such tensors point at a zero-memory NaN placeholder instead of host memory (there is
  no host copy in the compute dtype); resident blocks and tensors outside the blocks are widened once, at
  placement. The same code with ``device="cpu"`` computes on the CPU from fp8 storage.
- Host-RAM budget: ``max_pinned_bytes`` page-locks only the first whole blocks of the arena; the rest stays
  pageable and still streams (each copy from it then blocks the host for its duration). On a CPU device,
  ``host_copy=False`` keeps no arena of the blocks at all: each block is read from its file just before it runs
  (the OS page cache, which the kernel may reclaim, holds the file instead of the process).
- Experts: offloaders given one ``shared_slots`` (a model's DiTs that take turns, Wan2.2 A14B's two experts) stream
  through one set of slots, and ``hand_over`` makes the last forward of one prefetch the next one's first blocks
  instead of its own (``slot_sharing``): one expert's slots on the device, no stall at the switch.
- Weight patches (LoRAs, :meth:`LayerwiseOffloader.set_weight_patches`): a streamed block's terms are added to the
  slot right after its copy (and fp8 widening), on the copy stream (``weight_patches.BlockPatcher``): the slot is
  a fresh copy of the untouched host bytes every time, so the host master copy is never written, no second copy
  of any weight exists, and a new LoRA or strength takes effect at the next copy - no reload. Merging costs one
  thin matmul per patched weight per copy, beside the compute stream; a side path instead would cost two thin
  matmuls over every token on the compute stream. Resident blocks are copied from the host again and patched
  once; the Linear layers outside the blocks get a side path (``weight_patches.LinearSidePaths``), because their
  device copy is their only copy and a merge into it could not be undone exactly.

Loading lives in ``weights.streaming`` and the residency policy in ``residency.py``; this module is the pipeline.

Inference only: weights move under autograd's feet, so run forwards under ``torch.no_grad()`` or
``torch.inference_mode()``. Weights are read-only while offloaded (the GPU may hold prefetched copies of a block's
host bytes at any time): change them after ``close()``, then offload again.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import option_spec
from ..errors import ConfigError
from .block_checks import check_ownership, common_layout, stored_formats
from .block_slots import BlockSlots
from .host_memory import HostArena
from .residency import AutoResidency, spread_resident
from .slot_sharing import SharedSlots
from .stored_format import StagedLayout, StoredFormat
from .tensors import TensorRef, tensor_refs
from .weight_patches import NO_PATCHES, BlockPatcher, LinearSidePaths, PatchSet, check_targets

logger = logging.getLogger(__name__)

GiB = 2**30

WeightSource = Callable[[str, torch.Tensor, torch.Tensor], None]
"""``fill(name, current, dest)``: write the value of the model's tensor ``name`` (now ``current``, which may be on
the meta device) into ``dest``, a host arena view or GPU memory of the same shape and dtype. A source may also have
``fill_many(items)`` taking a list of such triples, used for each block's tensors (to read them concurrently), and
``stored_format(name, current) -> StoredFormat | None`` saying that a tensor is kept narrower than ``current``'s
dtype; it is then filled in its stored dtype (``dest`` of that dtype) and widened on the device."""


def _copy_current(name: str, current: torch.Tensor, dest: torch.Tensor) -> None:
    dest.copy_(current)


@dataclass(frozen=True)
class LayerwiseStats:
    """A snapshot of where the offloaded DiT's weights are and how much has moved."""

    num_blocks: int
    resident_blocks: int
    """Blocks kept on the GPU for good."""
    streamed_blocks: int
    """Blocks copied into a GPU slot before each use."""
    prefetch_depth: int
    block_bytes: int
    """Bytes of one block as kept in host memory (its flat layout, alignment included): one transfer."""
    device_block_bytes: int
    """Bytes of one block in its compute dtypes: one slot, one resident block (``block_bytes`` unless stored narrow)."""
    stored_narrow: bool
    """Whether blocks are kept narrower than they compute (fp8) and widened on the device."""
    host_bytes: int
    """Host memory holding the blocks' master copy (every block, resident ones included)."""
    pinned_bytes: int
    """Of ``host_bytes``, how much is page-locked (0 without ``pin_cpu_memory`` or without CUDA)."""
    slot_bytes: int
    """GPU memory of the streaming slots."""
    resident_bytes: int
    """GPU memory of the resident blocks."""
    non_block_bytes: int
    """GPU memory of the parameters and buffers outside the blocks."""
    transfers: int
    """Block copies issued since construction."""
    transferred_bytes: int
    forwards: int
    recoveries: int
    """Forwards that found a block left on the GPU by an exception or interrupt and put it back."""
    weight_patches: str = ""
    """The LoRAs applied, with their strengths (empty: none)."""


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", str(device), "no CUDA device is available", "run on a GPU machine or use 'cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ConfigError(
            "device", str(device), "layerwise offload streams to a CUDA device", "use 'cuda' (or 'cpu' in tests)"
        )
    return device


def _check_options(pin_cpu_memory: bool, prefetch_depth: int, resident_blocks: int | str) -> None:
    """The same checks, with the same bounds, as ``OffloadConfig`` (one declaration: ``config.option``)."""
    option_spec("pin_cpu_memory").validate(pin_cpu_memory)
    option_spec("prefetch_depth").validate(prefetch_depth)
    option_spec("resident_blocks").validate(resident_blocks)


def _check_file_backed(device: torch.device, weights: WeightSource | None, resident_blocks) -> None:
    """``host_copy=False`` reads each block into one host buffer right before its (synchronous) load: only a CPU
    device loads synchronously, only a file can be read again, and a resident block would need a copy of its own."""
    if device.type != "cpu":
        raise ValueError("host_copy=False is for a CPU device: a GPU copy may still read the buffer the next block "
                         "would be read into")
    if weights is None:
        raise ValueError("host_copy=False needs weights to read the blocks from (their files)")
    if resident_blocks != 0:
        raise ValueError(f"host_copy=False keeps no block resident; got resident_blocks={resident_blocks!r}")


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _inputs_to_host(module: nn.Module, args, kwargs):
    cpu = torch.device("cpu")
    return _to(args, cpu), {k: _to(v, cpu) for k, v in kwargs.items()}


def _output_to(device: torch.device, module: nn.Module, args, output):
    return _to(output, device)


class LayerwiseOffloader:
    """Streams the blocks of a DiT through a GPU; see the module docstring.

    Construct it on a model that lives on the CPU (for instance loaded by diffusers with no device), or load
    straight from its files with ``weights.streaming.layerwise_from_pretrained``. Then call the model as usual. :meth:`close`
    (alias :meth:`detach`) removes every hook and returns the model to a plain CPU module.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        device: torch.device | str,
        *,
        pin_cpu_memory: bool,
        prefetch_depth: int = 1,
        resident_blocks: int | Literal["auto"] = 0,
        weights: WeightSource | None = None,
        host_modules: tuple[str, ...] = (),
        max_pinned_bytes: int | None = None,
        shared_slots: SharedSlots | None = None,
        host_copy: bool = True,
    ):
        """Adopt ``model``: lay its blocks out in host memory, move everything else to ``device``, install hooks.

        ``weights`` says where tensor values come from; None (the default) means the model's own CPU tensors,
        whose memory is released block by block as it is copied into the arena, so host memory peaks at about one
        model plus one tensor. ``layerwise_from_pretrained`` passes a reader of the model's safetensors files instead.

        ``host_modules`` (names of submodules outside the blocks) stay in host memory and run on the CPU, their
        inputs brought over and their outputs sent to ``device``: for large lookup tables (a text encoder's 256k-row
        embedding is 2 GB, of which a prompt reads 512 rows).

        ``max_pinned_bytes`` (with ``pin_cpu_memory``): page-lock at most this much of the arena, whole blocks from
        the first; None pins all of it.

        ``shared_slots``: stream through slots shared with other offloaders that take turns with this one (the
        experts of one model: ``slot_sharing``), instead of slots of its own.

        ``host_copy=False`` (a CPU device, with ``weights``): no host copy of the blocks; each block is read from
        ``weights`` into one block-sized buffer just before it runs, so host memory holds one block instead of all
        of them - for a text encoder computed on the CPU when RAM is short (a 4.6 GB fp8 UMT5-XXL then costs one
        280 MB block, and re-reading it from the page cache costs about a second per encode). The offloader then
        owns ``weights`` and closes it when it is closed.
        """
        _check_options(pin_cpu_memory, prefetch_depth, resident_blocks)
        self.device = _resolve_device(device)
        if not host_copy:
            _check_file_backed(self.device, weights, resident_blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"blocks must be a non-empty nn.ModuleList, got {type(blocks).__name__}")
        blocks_name = next((name for name, m in model.named_modules() if m is blocks), None)
        if blocks_name is None:
            raise ValueError(f"blocks is not a submodule of {type(model).__name__}: pass the model's own ModuleList")
        self.model = model
        self.blocks = blocks
        self.prefetch_depth = prefetch_depth
        self.resident_option = resident_blocks
        self._blocks_name = blocks_name

        refs = [tensor_refs(block) for block in blocks]
        self.layout = common_layout(self._blocks_name, refs)
        check_ownership(self.model, self._blocks_name, refs, weights is not None)
        num_blocks = len(blocks)
        formats = stored_formats(self._blocks_name, refs, weights)
        if not host_copy:
            # A tensor not in the files (a buffer computed at construction) would have nowhere to come back from.
            absent = [f"{blocks_name}.{i}.{ref.name}" for i, block_refs in enumerate(refs) for ref in block_refs
                      if f"{blocks_name}.{i}.{ref.name}" not in weights]
            if absent:
                raise ValueError(f"host_copy=False needs every block tensor in the files; not there: {absent[:4]}")
        self.staged: StagedLayout | None = StagedLayout.of(self.layout, formats[0]) if formats else None
        """The blocks' stored layout and how it is widened, when they are kept narrower than they compute."""
        host_layout = self.staged.stored if self.staged else self.layout
        nbytes = host_layout.nbytes

        # Streaming state. Positions index the streamed blocks in forward order; an issued copy is (position, slot).
        self._resident_mask: tuple[bool, ...] = (False,) * num_blocks
        self._resident_flat: dict[int, torch.Tensor] = {}
        self._position = [-1] * num_blocks  # block index -> streamed position, -1 when resident
        self._streamed: list[int] = []  # streamed position -> block index
        self._slots: BlockSlots | None = None
        self._slot_views: list[list[torch.Tensor]] = []
        self._free: deque[int] = deque()
        self._queue: deque[tuple[int, int]] = deque()
        self._active: tuple[int, int] | None = None  # (block index, slot) while a streamed block runs
        self._next_issue = 0
        self._transfers = 0
        self._forwards = 0
        self._recoveries = 0
        self._auto = AutoResidency(self.device, logger)
        self._handles: list = []
        self._non_block: list[torch.Tensor] = []
        self._closed = False
        self._released = False
        self._host_modules = [model.get_submodule(name) for name in host_modules]
        self._shared = shared_slots
        self._handoff: tuple[LayerwiseOffloader, int] | None = None  # (next offloader, forwards until its turn)
        self._handing_over: LayerwiseOffloader | None = None  # this forward's wrap-around prefetches go to it
        self._handoff_live: LayerwiseOffloader | None = None  # armed for this forward's wrap-around
        self._patches: PatchSet = NO_PATCHES
        self._patcher: BlockPatcher | None = None
        self._side_paths: LinearSidePaths | None = None
        self._reader: tuple[list[list[TensorRef]], WeightSource, list | None] | None = None
        """With ``host_copy=False``: the blocks' tensor refs, their source and stored formats, read per block."""
        self._read_index = -1
        """The block whose bytes the one host buffer holds now (``host_copy=False``)."""
        self._weights_owned = None if host_copy else weights

        # Build host views and GPU copies outside inference mode, so they are ordinary tensors whatever the caller's
        # mode (ComfyUI loads models inside torch.inference_mode()).
        pin_bytes = None if max_pinned_bytes is None else max(0, max_pinned_bytes) // nbytes * nbytes
        host_blocks = num_blocks if host_copy else 1
        with torch.inference_mode(False), torch.no_grad():
            self._arena = HostArena(nbytes * host_blocks, pin=pin_cpu_memory and host_copy, pin_bytes=pin_bytes)
        # Unpin even if the offloader is dropped without close(); must not reference self. Not at interpreter exit:
        # the CUDA context may be gone by then, and the process's memory goes with it anyway.
        self._finalizer = weakref.finalize(self, HostArena.release, self._arena)
        self._finalizer.atexit = False
        try:
            with torch.inference_mode(False), torch.no_grad():
                # Without a host copy every block's "host bytes" are the one buffer, refilled before each load.
                self._host_flat = [self._arena.buffer[(i % host_blocks) * nbytes : (i % host_blocks + 1) * nbytes]
                                   for i in range(num_blocks)]
                self._host_views = [[s.view_into(flat) for s in host_layout.slots] for flat in self._host_flat]
                # What each block's tensors point at between forwards: their host copy, or (stored narrow) the
                # host copy where the dtype is the compute dtype and a zero-memory placeholder where it is not.
                self._resting_views = (
                    [self.staged.resting_views(flat) for flat in self._host_flat] if self.staged else self._host_views
                )
                if host_copy:
                    self._fill_host_copies(refs, weights, formats)
                else:
                    self._reader = (refs, weights, formats)
                    for i, block_refs in enumerate(refs):
                        for ref, view in zip(block_refs, self._resting_views[i]):
                            ref.rebind(view)
                self._fill_host_modules(weights)
                # Identities after rebinding, which replaces meta tensors with new objects.
                block_ids = {id(ref.get()) for block_refs in refs for ref in block_refs}
                block_ids |= {id(ref.get()) for m in self._host_modules for ref in tensor_refs(m, unique=False)}
                self._non_block = self._place_non_block(block_ids, weights or _copy_current)
            # The tensor objects to re-point, per block, in layout order.
            self._tensors = [[ref.get() for ref in block_refs] for block_refs in refs]
            if resident_blocks == "auto":
                initial = 0
            else:
                initial = min(resident_blocks, num_blocks)
                if resident_blocks > num_blocks:
                    logger.warning(
                        "resident_blocks=%d but %s has %d blocks: all %d stay on the GPU (nothing streams)",
                        resident_blocks,
                        blocks_name,
                        num_blocks,
                        num_blocks,
                    )
            self._apply_placement(spread_resident(num_blocks, initial))
            self._handles = self._install_hooks()
        except BaseException:
            self._abandon()
            raise
        logger.info(
            "layerwise offload of %s.%s on %s: %d blocks x %.1f MiB%s, %d streamed through %d slots (prefetch depth %d), "
            "%d resident%s; host copy %.2f GiB (%s); %.2f GiB of other weights on %s",
            type(model).__name__,
            blocks_name,
            self.device,
            num_blocks,
            nbytes / 2**20,
            f" stored narrow, widened on {self.device} to {self.layout.nbytes / 2**20:.1f} MiB" if self.staged else "",
            len(self._streamed),
            self._slots.count if self._slots else 0,
            prefetch_depth,
            num_blocks - len(self._streamed),
            " (auto: decided after the first forward)" if resident_blocks == "auto" else "",
            self._arena.nbytes / GiB,
            self._pinning_description(),
            sum(t.numel() * t.element_size() for t in self._non_block) / GiB,
            self.device,
        )

    def _pinning_description(self) -> str:
        pinned, total = self._arena.pinned_bytes, self._arena.nbytes
        if pinned == 0:
            return "pageable"
        if pinned == total:
            return "pinned"
        return f"{pinned // self._host_flat[0].numel()} of {len(self._host_flat)} blocks pinned, the rest pageable (max_pinned_bytes)"

    def _fill_host_copies(
        self, refs: list[list[TensorRef]], weights: WeightSource | None, formats: list[list[StoredFormat | None]] | None
    ) -> None:
        for i, block_refs in enumerate(refs):
            self._write_host_block(i, block_refs, weights, formats)
            # Block by block, so an adopted model's own CPU copy is released as the arena fills: host memory peaks
            # at one model plus one block, not two models.
            for ref, view in zip(block_refs, self._resting_views[i]):
                ref.rebind(view)

    def _write_host_block(
        self, i: int, block_refs: list[TensorRef], weights: WeightSource | None, formats: list | None
    ) -> None:
        """Write block ``i``'s values (stored narrow: its stored bytes and scales) into its host bytes."""
        prefix = f"{self._blocks_name}.{i}."
        # Stored narrow: the views have the stored dtypes, and the source writes the stored bytes as they are.
        items = [(prefix + ref.name, ref.get(), view) for ref, view in zip(block_refs, self._host_views[i])]
        fill_many = getattr(weights, "fill_many", None)
        if fill_many is not None:
            fill_many(items)  # e.g. concurrent file reads
        else:
            for item in items:
                (weights or _copy_current)(*item)
        if self.staged is not None:
            self.staged.fill_scales(self._host_flat[i], formats[i])

    def _read_block(self, index: int) -> None:
        """``host_copy=False``: bring block ``index``'s bytes from its file into the one host buffer. Loads are
        synchronous on a CPU device, so the buffer is free again once the previous block's load returned."""
        if self._read_index != index:
            refs, weights, formats = self._reader
            self._read_index = -1  # a failed read leaves no block claimed
            self._write_host_block(index, refs[index], weights, formats)
            self._read_index = index

    def _fill_host_modules(self, weights: WeightSource | None) -> None:
        """Host modules of a model built on the meta device get host memory filled from ``weights`` (widened, if
        stored narrow: they compute on the CPU); those of an adopted model keep their tensors. A tensor shared by
        several (tied embeddings) is filled once, under its first name, and stays shared."""
        if weights is None:
            return
        names = {id(m): n for n, m in self.model.named_modules()}
        groups: dict[int, list[tuple[str, TensorRef]]] = {}
        for module in self._host_modules:
            for ref in tensor_refs(module, unique=False):
                groups.setdefault(id(ref.get()), []).append((f"{names[id(module)]}.{ref.name}", ref))
        for group in groups.values():
            name, first = group[0]
            current = first.get()
            if current.is_meta:
                dest = torch.empty(current.shape, dtype=current.dtype)
                weights(name, current, dest)
                registered = first.rebind(dest)
                for _, ref in group[1:]:
                    (ref.owner._parameters if ref.is_param else ref.owner._buffers)[ref.attr] = registered

    def _abandon(self) -> None:
        """Undo a construction that failed half-way: no hook, nothing on the GPU, nothing pinned. Blocks already
        copied point at the (then pageable) arena, which is an ordinary CPU tensor; the rest keeps its tensors."""
        self._stop_streaming()
        with torch.inference_mode(False), torch.no_grad():
            for _, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
                if not t.is_meta and t.device.type != "cpu":
                    t.data = t.data.to("cpu")
        self._free_device_memory()

    def _stop_streaming(self) -> None:
        """Mark closed, remove every hook, and wait once for the device: no copy may still read the arena we are
        about to unpin or write a slot we are about to free (never done in steady state)."""
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free_device_memory(self) -> None:
        """Drop resident blocks and slots, and unpin (the host views stay valid as pageable memory)."""
        self._resident_flat.clear()
        self._drop_patches()
        self._drop_slots()
        self._finalizer()  # HostArena.release

    # ----------------------------------------------------------------------------------------------- construction

    def _place_non_block(self, block_ids: set[int], fill: WeightSource) -> list[torch.Tensor]:
        """Move every tensor outside the blocks to the device (once per tensor, every registration re-pointed)."""
        groups: dict[int, list[TensorRef]] = {}
        for ref in tensor_refs(self.model, unique=False):
            if id(ref.get()) not in block_ids:
                groups.setdefault(id(ref.get()), []).append(ref)
        placed = []
        for group in groups.values():
            t = group[0].get()
            if t.is_meta or t.device != self.device or fill is not _copy_current:
                dest = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                fill(group[0].name, t, dest)
                for ref in group:
                    ref.rebind(dest)
            placed.append(group[0].get())
        return placed

    def _install_hooks(self) -> list:
        handles = [
            self.model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
            self.model.register_forward_hook(self._on_forward_end),
            # always_call: also runs when the forward raises, so an aborted measurement is dropped.
            self.model.register_forward_hook(self._on_forward_exit, always_call=True),
        ]
        for module in self._host_modules:
            handles.append(module.register_forward_pre_hook(_inputs_to_host, with_kwargs=True))
            handles.append(module.register_forward_hook(functools.partial(_output_to, self.device)))
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(functools.partial(self._before_block, i)))
            # always_call: a block that raises still gives its slot back and returns to host views.
            handles.append(block.register_forward_hook(functools.partial(self._after_block, i), always_call=True))
        return handles

    # ----------------------------------------------------------------------------------------------- placement

    def _point(self, index: int, views: list[torch.Tensor]) -> None:
        for t, v in zip(self._tensors[index], views):
            t.data = v

    def _apply_placement(self, mask: tuple[bool, ...]) -> None:
        """Make exactly the blocks in ``mask`` resident; (re)build the streamed order and the slots."""
        self._reset_pipeline()
        nbytes = self.layout.nbytes
        demoted = [i for i, r in enumerate(mask) if not r and i in self._resident_flat]
        if demoted and self.device.type == "cuda":
            # Resident buffers may be in use on any stream; this is a one-off placement change, not steady state.
            torch.cuda.synchronize(self.device)
        with torch.inference_mode(False), torch.no_grad():
            for i in demoted:
                self._point(i, self._resting_views[i])
                del self._resident_flat[i]
            for i, resident in enumerate(mask):
                if resident and i not in self._resident_flat:
                    flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                    # Current stream, async from pinned memory; the arena is never written after construction.
                    if self.staged is not None:
                        self.staged.decode_copy(self._host_flat[i], flat)  # widened once, here
                    else:
                        flat.copy_(self._host_flat[i], non_blocking=True)
                    self._resident_flat[i] = flat
                    views = [s.view_into(flat) for s in self.layout.slots]
                    if self._patcher is not None:
                        self._patcher.apply_now(i, views)
                    self._point(i, views)
            self._resident_mask = tuple(mask)
            self._streamed = [i for i, r in enumerate(mask) if not r]
            self._position = [-1] * len(mask)
            for position, i in enumerate(self._streamed):
                self._position[i] = position
            if self._streamed and self._slots is None:
                self._slots = self._new_slots(nbytes)
                self._slot_views = [[s.view_into(buf) for s in self.layout.slots] for buf in self._slots.buffers]
            elif not self._streamed and self._slots is not None:
                self._drop_slots()
        if self._slots is not None and self._shares_slots:
            self._shared.reset_free(self)
            self._free = self._shared.free
        else:
            self._free = deque(range(self._slots.count)) if self._slots else deque()
        for i, resident in enumerate(mask):
            logger.debug("%s.%d: %s", self._blocks_name, i, "resident" if resident else "streamed")
        self._fill()  # prefetch the first streamed block(s) of the next forward

    def _new_slots(self, nbytes: int) -> BlockSlots:
        count = self.prefetch_depth + 1
        if self._shared is not None:
            slots = self._shared.acquire(self, nbytes, count, self.device, self.staged)
            if slots is not None:
                return slots
        return BlockSlots(nbytes, count, self.device, staged=self.staged)

    @property
    def _shares_slots(self) -> bool:
        return self._shared is not None and self._slots is not None and self._shared.slots is self._slots

    def _drop_slots(self) -> None:
        """Give up the slots: free them, or (shared) leave them to the other holders."""
        if self._slots is None:
            return
        if self._shares_slots:
            self._shared.release(self)
        else:
            self._slots.close()
        self._slots = None
        self._slot_views = []
        self._free = deque()

    def yield_slots(self) -> None:
        """Another offloader sharing these slots takes its turn: forget the copies queued for this one's next
        forward (their slots return to the shared free list). Never called while this one runs a forward."""
        self._handoff = None
        self._handing_over = None
        self._reset_pipeline()

    def hand_over(self, following: LayerwiseOffloader, after_forwards: int = 1) -> None:
        """Tell this offloader that ``following`` (sharing its slots) runs after its next ``after_forwards``
        forwards: the last of those, instead of prefetching this model's first blocks for a forward that will not
        come, prefetches ``following``'s first blocks into the free slots, so they cross while this model's last
        blocks compute. Does nothing when the two do not share slots."""
        if after_forwards < 1:
            raise ValueError(f"after_forwards={after_forwards}: must be 1 or more")
        if following is self or not self._shares_slots or following._slots is not self._slots:
            return
        self._handoff = (following, after_forwards)

    def queued_blocks(self) -> tuple[int, ...]:
        """Blocks whose copies are issued into slots ahead of their use, in the order they will run (what a test
        asks to see that the next expert's first blocks arrived before its turn)."""
        return tuple(self._streamed[position] for position, _ in self._queue)

    @property
    def slot_set(self) -> BlockSlots | None:
        """The streaming slots in use (shared with other offloaders, or its own), None when nothing streams."""
        return self._slots

    def _reset_pipeline(self) -> None:
        """Forget queued copies and put back a block an aborted forward left in a slot. Safe at any point: a copy
        still in flight is ordered before any later copy into its slot (same stream), and compute only ever waits
        on the latest copy into a slot."""
        if self._active is not None:
            self._recover()
        self._discard_queue()
        self._next_issue = 0

    # ----------------------------------------------------------------------------------------------- streaming

    def _fill(self) -> None:
        """Issue copies into every free slot, in streamed order with wrap-around, at most one per streamed block
        ahead (with few streamed blocks, more would only copy the same block twice)."""
        if self._handing_over is not None:
            self._handing_over._fill()  # this forward's wrap-around belongs to the next expert
            return
        slots, queue, free = self._slots, self._queue, self._free
        limit = len(self._streamed)
        while free and len(queue) < limit:
            position = self._next_issue
            if position == 0 and self._handoff_live:
                # The wrap-around of this model's last forward: the next expert's first blocks go in instead.
                self._handing_over, self._handoff_live = self._handoff_live, None
                self._handing_over._fill()
                return
            slot = free.popleft()
            index = self._streamed[position]
            transform = None
            if self._patcher is not None:
                transform = functools.partial(self._patcher.apply, index, self._slot_views[slot])
            if self._reader is not None:
                self._read_block(index)
            slots.load(slot, self._host_flat[index], transform)
            queue.append((position, slot))
            self._next_issue = (position + 1) % limit
            self._transfers += 1

    def _discard_queue(self) -> None:
        for _, slot in self._queue:
            self._free.append(slot)
        self._queue.clear()

    def _recover(self) -> None:
        index, slot = self._active
        self._active = None
        self._point(index, self._resting_views[index])
        # Kernels of the aborted block may still read the slot: record "free" after everything enqueued so far.
        self._slots.release(slot)
        self._free.append(slot)
        self._recoveries += 1
        logger.debug("%s.%d: recovered from an aborted forward", self._blocks_name, index)

    def _before_block(self, index: int, module: nn.Module, args) -> None:
        position = self._position[index]
        if position < 0:
            return  # resident
        if self._active is not None:  # an exception the post-hook did not see (KeyboardInterrupt)
            self._recover()
        queue = self._queue
        if not queue or queue[0][0] != position:
            # Out of the expected order (first forward, after an interrupt, or a caller that skips blocks):
            # restart the pipeline here. Correct, just not overlapped for this one block.
            self._handing_over = None
            self._discard_queue()
            self._next_issue = position
            self._fill()
        _, slot = queue.popleft()
        # Compute waits (on the GPU) for this block's copy; the host goes straight on.
        self._slots.wait_loaded(slot)
        self._active = (index, slot)
        self._point(index, self._slot_views[slot])
        self._fill()

    def _after_block(self, index: int, module: nn.Module, args, output) -> None:
        active = self._active
        if active is None or active[0] != index:
            return
        self._active = None
        self._point(index, self._resting_views[index])
        # "Slot free" once this block's kernels, all enqueued by now, have run; the next copy into it waits for that.
        self._slots.release(active[1])
        self._free.append(active[1])
        self._fill()

    # ----------------------------------------------------------------------------------------------- forward hooks

    def _on_forward_start(self, module: nn.Module, args, kwargs) -> None:
        self._forwards += 1
        self._handoff_live = None
        self._handing_over = None
        if self._released:
            self._restore_device()
        if self._shares_slots:
            self._shared.take_turn(self)
        if self._active is not None:
            self._recover()
        if self.resident_option == "auto":
            numel = sum(t.numel() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
            if self._auto.needs_measurement(numel):
                if any(self._resident_mask):
                    logger.info(
                        "resident_blocks=auto: inputs grew (%d -> %d elements); streaming every block for one forward "
                        "to measure again", self._auto.measured_numel, numel,
                    )
                    self._apply_placement((False,) * len(self.blocks))
                self._auto.begin(numel)
        if self._streamed and (not self._queue or self._queue[0][0] != 0):
            self._discard_queue()
            self._next_issue = 0
            self._fill()
        if self._handoff is not None:
            following, remaining = self._handoff
            self._handoff = (following, remaining - 1) if remaining > 1 else None
            if remaining == 1 and following._slots is self._slots and not following._closed:
                self._handoff_live = following  # armed after this forward's own first block is queued

    def _on_forward_end(self, module: nn.Module, args, output) -> None:
        count = self._auto.finish(
            block_bytes=self.layout.nbytes,
            slot_bytes=self._slots.total_bytes if self._slots else 0,
            num_blocks=len(self.blocks),
            name=self._blocks_name,
        )
        if count:
            self._apply_placement(spread_resident(len(self.blocks), count))

    def _on_forward_exit(self, module: nn.Module, args, output) -> None:
        # Runs after _on_forward_end on success, and alone when the forward raised: an unfinished measurement is
        # dropped (the next forward measures again) and a block left in a slot goes back to host memory.
        self._auto.abort()
        self._handoff_live = None
        self._handing_over = None
        if self._active is not None:
            self._recover()

    # ----------------------------------------------------------------------------------------------- public

    @property
    def closed(self) -> bool:
        return self._closed

    def set_resident_blocks(self, resident_blocks: int | Literal["auto"]) -> None:
        """Change how many blocks stay on the GPU, between forwards (e.g. to make room for a VAE decode).

        An int takes effect at once (GPU copies of demoted blocks are freed, promoted ones copied in); ``"auto"``
        streams everything until the next forward has measured what fits again. Synchronizes the device once.
        """
        _check_options(True, self.prefetch_depth, resident_blocks)
        if self._closed:
            raise RuntimeError("this LayerwiseOffloader is closed; create a new one")
        num_blocks = len(self.blocks)
        count = 0 if resident_blocks == "auto" else min(resident_blocks, num_blocks)
        self.resident_option = resident_blocks
        self._auto.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # one-off: prefetches in flight land before slots may be freed
        self._apply_placement(spread_resident(num_blocks, count))
        logger.info(
            "%s: resident_blocks=%r -> %d of %d blocks resident", self._blocks_name, resident_blocks, count, num_blocks
        )

    @property
    def weight_patches(self) -> PatchSet:
        """The LoRAs (weight patches) applied now."""
        return self._patches

    def set_weight_patches(self, patches: PatchSet | None) -> None:
        """Apply ``patches`` (LoRAs with strengths; None or empty: none) from the next block copy on, between
        forwards. Nothing is reloaded: copies already prefetched are issued again, resident blocks are copied again
        from the untouched host bytes and patched, and the layers outside the blocks get side paths. A set equal to
        the current one (same files, same strengths) costs nothing. Synchronizes the device once when it changes."""
        patches = patches or NO_PATCHES
        if self._closed:
            raise RuntimeError("this LayerwiseOffloader is closed; create a new one")
        if patches == self._patches:
            return
        block_terms: dict[int, dict[int, list]] = {}
        other_terms: dict[str, list] = {}
        slot_of = {s.name: k for k, s in enumerate(self.layout.slots)}
        prefix = self._blocks_name + "."
        for name, terms in patches.targets().items():
            index, _, rest = name.removeprefix(prefix).partition(".")
            if name.startswith(prefix) and index.isdigit() and int(index) < len(self.blocks) and rest in slot_of:
                block_terms.setdefault(int(index), {})[slot_of[rest]] = terms
            else:
                other_terms[name] = terms
        shapes = {f"{prefix}{i}.{s.name}": s.shape for i in range(len(self.blocks)) for s in self.layout.slots}
        shapes.update({n: tuple(t.shape) for n, t in self.model.named_parameters() if not n.startswith(prefix)})
        check_targets(patches, shapes, type(self.model).__name__)
        side_paths = LinearSidePaths(self.model, other_terms) if other_terms else None  # refuses what it cannot run
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever the caller's mode
            patcher = BlockPatcher(block_terms, self.layout, self.device, pin=self._arena.pinned) if block_terms else None
        self._reset_pipeline()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # one-off: no copy in flight still reads the old factors
        self._drop_patches()
        self._patches, self._patcher, self._side_paths = patches, patcher, side_paths
        if side_paths is not None:
            side_paths.install()
        if not self._released:
            with torch.inference_mode(False), torch.no_grad():
                for i, flat in self._resident_flat.items():  # from the host bytes again, then the new terms
                    if self.staged is not None:
                        self.staged.decode_copy(self._host_flat[i], flat)
                    else:
                        flat.copy_(self._host_flat[i], non_blocking=True)
                    if patcher is not None:
                        patcher.apply_now(i, [s.view_into(flat) for s in self.layout.slots])
            if self._streamed:
                self._fill()
        logger.info("%s.%s: weight patches: %s (%d blocks, %d other tensors)", type(self.model).__name__,
                    self._blocks_name, patches.describe(), len(block_terms), len(other_terms))

    def _drop_patches(self) -> None:
        if self._patcher is not None:
            self._patcher.close()
        if self._side_paths is not None:
            self._side_paths.remove()
        self._patcher, self._side_paths, self._patches = None, None, NO_PATCHES

    def block_location(self, index: int) -> Literal["host", "slot", "resident", "elsewhere"]:
        """Where block ``index``'s tensors point now: its host copy (between forwards, and always once closed), a
        streaming slot (while it runs), its resident GPU copy, or somewhere else (someone replaced them)."""

        def inside(t: torch.Tensor, flat: torch.Tensor) -> bool:
            return t.device == flat.device and flat.data_ptr() <= t.data_ptr() < flat.data_ptr() + flat.numel()

        tensors = self._tensors[index]
        if not tensors:
            return "host"
        first = tensors[0]
        if inside(first, self._host_flat[index]) or first.data_ptr() == self._resting_views[index][0].data_ptr():
            return "host"
        if index in self._resident_flat and inside(first, self._resident_flat[index]):
            return "resident"
        if self._slots is not None and any(inside(first, buf) for buf in self._slots.buffers):
            return "slot"
        return "elsewhere"

    def release_device(self) -> None:
        """Free every device allocation between uses - slots, resident blocks, the weights outside the blocks (back
        to host memory) - and keep the pinned host arena and the hooks: the next forward places them again. For a
        component used once per prompt (a streamed text encoder), so its slots do not sit beside the DiT's."""
        if self._closed or self._released:
            return
        self._reset_pipeline()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # one-off: nothing in flight may still read what is freed
        with torch.inference_mode(False), torch.no_grad():
            for i in list(self._resident_flat):
                self._point(i, self._resting_views[i])
            for t in self._non_block:
                if t.device.type != "cpu":
                    t.data = t.data.to("cpu")
        self._resident_flat.clear()
        self._drop_slots()
        if self._patcher is not None:
            self._patcher.release_device()
        if self._side_paths is not None:
            self._side_paths.release_device()
        self._released = True

    def _restore_device(self) -> None:
        self._released = False
        with torch.inference_mode(False), torch.no_grad():
            for t in self._non_block:
                t.data = t.data.to(self.device)
        self._apply_placement(self._resident_mask)

    @property
    def host_copy(self) -> bool:
        """Whether host memory holds every block (False: each is read from its file as it runs)."""
        return self._reader is None

    @property
    def released(self) -> bool:
        return self._released

    def stats(self) -> LayerwiseStats:
        num_blocks = len(self.blocks)
        return LayerwiseStats(
            num_blocks=num_blocks,
            resident_blocks=num_blocks - len(self._streamed),
            streamed_blocks=len(self._streamed),
            prefetch_depth=self.prefetch_depth,
            block_bytes=self._host_flat[0].numel(),
            device_block_bytes=self.layout.nbytes,
            stored_narrow=self.staged is not None,
            host_bytes=self._arena.nbytes,
            pinned_bytes=self._arena.pinned_bytes,
            slot_bytes=(self._slots.total_bytes if self._slots else 0) + (self._patcher.device_bytes if self._patcher else 0),
            resident_bytes=len(self._resident_flat) * self.layout.nbytes,
            non_block_bytes=0 if self._closed or self._released else sum(t.numel() * t.element_size() for t in self._non_block),
            transfers=self._transfers,
            transferred_bytes=self._transfers * self._host_flat[0].numel(),
            forwards=self._forwards,
            recoveries=self._recoveries,
            weight_patches=self._patches.describe() if self._patches else "",
        )

    def close(self) -> None:
        """Remove the hooks, point every block at its host copy, move the other weights back to the CPU, free the
        GPU slots and resident blocks, and unpin. The model is then a plain CPU module - except for blocks stored
        narrow, whose tensors keep their NaN placeholders (there is no compute-dtype host copy to return to: load
        the model again to run it). Idempotent."""
        if self._closed:
            return
        self._stop_streaming()
        if self._active is not None:  # slots go back to the free list (shared slots stay usable by the others)
            self._free.append(self._active[1])
        self._active = None
        self._discard_queue()
        with torch.inference_mode(False), torch.no_grad():
            for i in range(len(self.blocks)):
                self._point(i, self._resting_views[i])
            for t in self._non_block:
                if t.device.type != "cpu":
                    t.data = t.data.to("cpu")
        self._slot_views = []
        self._free = deque()
        self._streamed = []
        self._position = [-1] * len(self.blocks)
        self._non_block = []
        self._free_device_memory()
        if self._weights_owned is not None and hasattr(self._weights_owned, "close"):
            self._weights_owned.close()
        self._weights_owned = self._reader = None
        logger.info(
            "layerwise offload of %s.%s closed; the model is back on the CPU",
            type(self.model).__name__,
            self._blocks_name,
        )

    detach = close

    def __enter__(self) -> LayerwiseOffloader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
