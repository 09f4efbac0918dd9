"""Offloaders that take turns in one set of slots (``core.slot_sharing``), below any model family: plain stacks of
linear blocks. Each turn gives the same outputs as resident models, the slots are one allocation, a hand-over queues
the next model's first blocks as its own, and misfits fall back to slots of their own."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from video_offload.offload.core.layerwise import LayerwiseOffloader
from video_offload.offload.core.slot_sharing import SharedSlots


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.linear(x)) + x


class Stack(nn.Module):
    def __init__(self, width: int = 8, blocks: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


def pair(shared: SharedSlots, depth: int = 1, widths=(8, 8)):
    models = [Stack(width, seed=seed) for seed, width in enumerate(widths)]
    resident = [Stack(width, seed=seed) for seed, width in enumerate(widths)]
    offloaders = [LayerwiseOffloader(m, m.blocks, "cpu", pin_cpu_memory=False, prefetch_depth=depth,
                                     shared_slots=shared) for m in models]
    return offloaders, resident


@torch.no_grad()
def test_turns_in_shared_slots_equal_resident_models():
    shared = SharedSlots()
    (a, b), (ra, rb) = pair(shared)
    assert a.slot_set is b.slot_set is shared.slots  # one allocation for both
    x = torch.randn(2, 8)
    for model, reference in ((a, ra), (b, rb), (b, rb), (a, ra), (b, rb)):  # any order of turns
        assert torch.equal(model.model(x), reference(x))


@torch.no_grad()
def test_a_hand_over_queues_the_next_models_first_blocks_during_the_last_forward():
    shared = SharedSlots()
    (a, b), (ra, rb) = pair(shared, depth=2)
    x = torch.randn(2, 8)
    a.model(x)
    a.hand_over(b, after_forwards=2)
    a.model(x)
    assert b.queued_blocks() == ()  # not yet: one more forward of a comes first
    before = b.stats().transfers
    assert torch.equal(a.model(x), ra(x))
    assert a.queued_blocks() == () and b.queued_blocks() == (0, 1, 2)  # all three slots hold b's first blocks
    assert b.stats().transfers - before == 3
    during = []
    hook = b.blocks[0].register_forward_pre_hook(lambda *_: during.append(b.stats().transfers))
    assert torch.equal(b.model(x), rb(x))
    hook.remove()
    assert during == [before + 3]  # b's first block found in place: no copy issued at its start
    with pytest.raises(ValueError, match="after_forwards=0: must be 1 or more"):
        a.hand_over(b, after_forwards=0)


@torch.no_grad()
def test_release_and_close_leave_the_other_holder_streaming():
    shared = SharedSlots()
    (a, b), (_, rb) = pair(shared)
    x = torch.randn(2, 8)
    a.model(x)
    a.release_device()
    assert shared.slots is not None and b.slot_set is shared.slots
    assert torch.equal(b.model(x), rb(x))
    a.close()
    assert torch.equal(b.model(x), rb(x))
    b.close()
    assert shared.slots is None  # freed with the last holder


@torch.no_grad()
def test_blocks_of_another_layout_get_slots_of_their_own(caplog):
    shared = SharedSlots("test pair")
    with caplog.at_level(logging.WARNING):
        (a, b), (ra, rb) = pair(shared, widths=(8, 16))
    assert a.slot_set is shared.slots and b.slot_set is not shared.slots
    assert "do not fit the shared slots" in caplog.text
    x8, x16 = torch.randn(2, 8), torch.randn(2, 16)
    a.hand_over(b)  # not sharing: nothing to hand over
    assert torch.equal(a.model(x8), ra(x8))
    assert a.queued_blocks() == (0, 1)  # its own next forward's first blocks, as without a hand-over
    assert torch.equal(b.model(x16), rb(x16))
