"""Layerwise DiT offload: every mode against the resident model, bit for bit.

CPU tests run the same slot/view/hook logic as on a GPU (copies are then synchronous). Tests marked ``gpu`` check
the real thing on CUDA: Wan 1.3B- and 14B-shaped blocks in bf16, memory after close and over repeated forwards.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn
from video_offload.offload.errors import ConfigError, ModelLoadError
from video_offload.offload.core.layerwise import LayerwiseOffloader
from video_offload.offload.core.residency import plan_auto_resident, spread_resident
from video_offload.offload.weights.streaming import layerwise_from_pretrained
from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan
from video_offload.offload.families.wan.shapes import WAN_DIT, WAN_DIT_COMMON

NUM_LAYERS = 5
LOGGER = LayerwiseOffloader.__module__


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bit_equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return (
        build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), seed=3, spec=TinyWanSpec(num_layers=NUM_LAYERS))
        / "transformer"
    )


@pytest.fixture(scope="module")
def wan_inputs():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 16, 3, 8, 8, generator=gen),
        torch.tensor([637.0]),
        torch.randn(1, 7, 32, generator=gen),
    )


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def reference(wan_dir, wan_inputs):
    model = WanTransformer3DModel.from_pretrained(wan_dir, dtype=torch.float32)
    return forward(model, wan_inputs)


def load(wan_dir) -> nn.Module:
    return WanTransformer3DModel.from_pretrained(wan_dir, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("pin", [False, True])
@pytest.mark.parametrize("resident", [0, 2, NUM_LAYERS - 1, NUM_LAYERS])
@pytest.mark.parametrize("depth", [1, 2])
def test_offloaded_equals_resident(wan_dir, wan_inputs, reference, depth, resident, pin):
    model = load(wan_dir)
    with LayerwiseOffloader(
        model, model.blocks, "cpu", pin_cpu_memory=pin, prefetch_depth=depth, resident_blocks=resident
    ) as off:
        for _ in range(3):
            assert bit_equal(forward(model, wan_inputs), reference)
        stats = off.stats()
        assert (stats.resident_blocks, stats.streamed_blocks) == (resident, NUM_LAYERS - resident)
        assert stats.host_bytes == NUM_LAYERS * stats.block_bytes
        assert stats.slot_bytes == (0 if resident == NUM_LAYERS else (depth + 1) * stats.block_bytes)
        assert all(off.block_location(i) in ("host", "resident") for i in range(NUM_LAYERS))


@pytest.mark.parametrize("resident", [0, 2])
def test_streamed_blocks_compute_from_their_slot_not_from_host_memory(wan_dir, wan_inputs, reference, resident):
    """On a CPU a block that reads host memory gives the same numbers as one that reads its slot: assert where
    each block's weights are while it runs, not only the output."""
    model = load(wan_dir)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks=resident)
    where: dict[int, str] = {}

    def record(index, *_):
        where[index] = off.block_location(index)

    # Registered after the offloader's own hooks, so these run once the block has been placed for its forward.
    handles = [block.register_forward_pre_hook(functools.partial(record, i)) for i, block in enumerate(model.blocks)]
    assert bit_equal(forward(model, wan_inputs), reference)
    mask = spread_resident(NUM_LAYERS, resident)
    assert where == {i: "resident" if mask[i] else "slot" for i in range(NUM_LAYERS)}
    assert all(off.block_location(i) in ("host", "resident") for i in range(NUM_LAYERS))
    for handle in handles:
        handle.remove()
    off.close()


def test_each_forward_copies_each_streamed_block_once(wan_dir, wan_inputs, reference):
    model = load(wan_dir)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks=2)
    streamed = off.stats().streamed_blocks
    forward(model, wan_inputs)
    before = off.stats().transfers
    for _ in range(4):
        assert bit_equal(forward(model, wan_inputs), reference)
    # The wrap-around prefetch means no forward after the first restarts the pipeline.
    assert off.stats().transfers - before == 4 * streamed
    assert off.stats().recoveries == 0
    off.close()


def test_resident_blocks_are_spread_with_compute_before_each_streamed_block():
    assert spread_resident(4, 2) == (True, False, True, False)
    assert spread_resident(5, 0) == (False,) * 5
    assert spread_resident(5, 5) == (True,) * 5
    assert spread_resident(5, 9) == (True,) * 5
    mask = spread_resident(40, 30)
    streamed = [i for i, r in enumerate(mask) if not r]
    assert len(streamed) == 10 and streamed[-1] == 39
    assert {b - a for a, b in zip(streamed, streamed[1:])} == {4}


def test_plan_auto_resident():
    kw = dict(margin_bytes=10, block_bytes=100, slot_bytes=200, num_blocks=8)
    assert plan_auto_resident(available_bytes=50, activation_bytes=30, **kw) == 0
    assert plan_auto_resident(available_bytes=900, activation_bytes=300, **kw) == 5
    # 8 blocks need 800; the 200 of slots come back when nothing streams.
    assert plan_auto_resident(available_bytes=1000, activation_bytes=390, **kw) == 8
    assert plan_auto_resident(available_bytes=10_000, activation_bytes=0, **kw) == 8


def test_auto_residency_promotes_after_measuring_and_remeasures_on_bigger_inputs(
    wan_dir, wan_inputs, reference, monkeypatch, caplog
):
    model = load(wan_dir)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks="auto")
    assert off.stats().resident_blocks == 0
    block = off.stats().block_bytes
    # The margin is max(1 GiB, 5% of total): add 1 GiB to what is "available" and report a total of 0.
    figures = {"available": 8 * block, "activation": 6 * block}
    monkeypatch.setattr(
        off._auto, "memory_figures", lambda base: (figures["available"] + 2**30, 0, figures["activation"])
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert bit_equal(forward(model, wan_inputs), reference)
    # 2 blocks of budget; all 5 would need 5 (3 more than the 2 the slots would give back): 2 resident.
    assert off.stats().resident_blocks == 2
    assert "resident_blocks=auto" in caplog.text
    assert bit_equal(forward(model, wan_inputs), reference)
    assert off.stats().resident_blocks == 2  # same inputs: no new measurement

    figures["activation"] = 7 * block
    x, t, text = wan_inputs
    bigger = (torch.cat([x, x], dim=2), t, text)
    expected = forward(load(wan_dir), bigger)
    assert bit_equal(forward(model, bigger), expected)
    assert off.stats().resident_blocks == 1
    assert bit_equal(forward(model, wan_inputs), reference)
    off.close()


def test_set_resident_blocks_between_forwards(wan_dir, wan_inputs, reference):
    model = load(wan_dir)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks=NUM_LAYERS)
    assert bit_equal(forward(model, wan_inputs), reference)
    for count in (0, 3, NUM_LAYERS, 1):
        off.set_resident_blocks(count)
        assert off.stats().resident_blocks == count
        assert bit_equal(forward(model, wan_inputs), reference)
    off.set_resident_blocks("auto")
    assert off.stats().resident_blocks == 0 and off.resident_option == "auto"
    assert bit_equal(forward(model, wan_inputs), reference)
    with pytest.raises(ConfigError, match="resident_blocks=-2"):
        off.set_resident_blocks(-2)
    off.close()
    with pytest.raises(RuntimeError, match="closed"):
        off.set_resident_blocks(1)


@pytest.mark.parametrize("how", ["adopt", "adopt_loaded_in_inference_mode", "from_pretrained"])
def test_inference_mode_everywhere_as_comfyui_runs_nodes(wan_dir, wan_inputs, reference, how):
    """ComfyUI loads and runs models inside torch.inference_mode(): tensors made there are inference tensors."""
    model = load(wan_dir) if how == "adopt" else None
    with torch.inference_mode():
        if how == "from_pretrained":
            off = layerwise_from_pretrained(wan_dir, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False, dtype=torch.float32)
            model = off.model
        else:
            model = model or load(wan_dir)
            off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, prefetch_depth=2)
        for _ in range(2):
            assert bit_equal(model(*wan_inputs, return_dict=False)[0], reference)
        off.set_resident_blocks(2)
        assert bit_equal(model(*wan_inputs, return_dict=False)[0], reference)
    assert bit_equal(forward(model, wan_inputs), reference)  # and outside it
    off.close()
    # Block tensors live in the offloader's arena, made outside inference mode; the rest is as the caller made it.
    assert not any(t.is_inference() for t in model.blocks.parameters())
    assert bit_equal(forward(model, wan_inputs), reference)


def test_more_resident_blocks_than_blocks_warns_and_keeps_all(wan_dir, wan_inputs, reference, caplog):
    model = load(wan_dir)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks=50)
    assert "resident_blocks=50" in caplog.text
    assert off.stats().streamed_blocks == 0 and off.stats().slot_bytes == 0
    assert bit_equal(forward(model, wan_inputs), reference)
    off.close()


# ------------------------------------------------------------------------------------------------ robustness


class Boom(RuntimeError):
    pass


def raise_once(where: list):
    def hook(*args):
        if where:
            where.pop()
            raise Boom("injected")

    return hook


@pytest.mark.parametrize("kind", ["inside_block", "pre_hook", "post_hook", "keyboard_interrupt", "between_blocks"])
@pytest.mark.parametrize("resident", [0, 2])
def test_exception_mid_forward_leaves_model_consistent(wan_dir, wan_inputs, reference, kind, resident):
    model = load(wan_dir)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks=resident)
    assert bit_equal(forward(model, wan_inputs), reference)
    pending = [1]
    target = model.blocks[3]
    if kind == "inside_block":
        original = target.forward

        def failing(*args, **kwargs):
            if pending:
                pending.pop()
                raise Boom("injected")
            return original(*args, **kwargs)

        target.forward = failing
        expected = Boom
    elif kind == "keyboard_interrupt":
        original = target.forward

        def interrupted(*args, **kwargs):
            if pending:
                pending.pop()
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        target.forward = interrupted
        expected = KeyboardInterrupt
    elif kind == "pre_hook":
        target.register_forward_pre_hook(raise_once(pending))  # runs after the offloader's pre-hook
        expected = Boom
    elif kind == "post_hook":
        target.register_forward_hook(raise_once(pending))
        expected = Boom
    else:  # an interrupt between blocks (before the offloader's pre-hook), as ComfyUI raises between steps
        target.register_forward_pre_hook(raise_once(pending), prepend=True)
        expected = Boom
    with pytest.raises(expected):
        forward(model, wan_inputs)
    if kind != "keyboard_interrupt":  # always_call hooks do not see BaseException; the next forward recovers
        assert all(off.block_location(i) in ("host", "resident") for i in range(NUM_LAYERS))
    for _ in range(2):
        assert bit_equal(forward(model, wan_inputs), reference)
    assert all(off.block_location(i) in ("host", "resident") for i in range(NUM_LAYERS))
    off.close()


def test_blocks_called_out_of_order_still_compute_correctly(wan_dir, wan_inputs, reference):
    """A caller that runs blocks itself, skipping and repeating some (as block-caching tricks do)."""
    model = load(wan_dir)
    plain = load(wan_dir)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False)
    h = torch.randn(1, 12, 24)
    text = torch.randn(1, 7, 24)
    temb = torch.randn(1, 6, 24)
    rope = plain.rope(torch.zeros(1, 16, 3, 4, 4))
    with torch.no_grad():
        for order in ([0, 1, 2, 3, 4], [3, 1, 1, 4], [2]):
            a, b = h, h
            for i in order:
                a = model.blocks[i](a, text, temb, rope)
                b = plain.blocks[i](b, text, temb, rope)
            assert bit_equal(a, b)
    assert bit_equal(forward(model, wan_inputs), reference)
    off.close()


def test_close_restores_the_plain_cpu_module(wan_dir, wan_inputs, reference):
    model = load(wan_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=True, resident_blocks=2)
    forward(model, wan_inputs)
    off.detach()
    off.close()  # idempotent
    assert off.closed
    assert all(p is params[name] for name, p in model.named_parameters())  # identity kept
    assert state_equal(model.state_dict(), before)
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)
    assert bit_equal(forward(model, wan_inputs), reference)
    assert off.stats().slot_bytes == 0 and off.stats().resident_bytes == 0


def test_adoption_moves_block_tensors_into_one_host_arena(wan_dir):
    model = load(wan_dir)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False)
    arena = off._arena.buffer
    # No block tensor keeps its original storage: that memory is released as the arena fills.
    for p in model.blocks.parameters():
        assert arena.data_ptr() <= p.data_ptr() < arena.data_ptr() + arena.numel()
    assert off.stats().host_bytes == arena.numel()
    off.close()


def test_failed_construction_leaves_a_working_cpu_module(wan_dir, wan_inputs, reference):
    model = load(wan_dir)
    calls = []

    def flaky(name, current, dest):
        calls.append(name)
        if name.startswith("blocks.2."):
            raise OSError("disk went away")
        dest.copy_(current)

    with pytest.raises(OSError, match="disk went away"):
        LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=True, weights=flaky)
    assert calls and not model._forward_pre_hooks and all(not b._forward_pre_hooks for b in model.blocks)
    assert bit_equal(forward(model, wan_inputs), reference)
    off = LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False)  # and it can be adopted again
    assert bit_equal(forward(model, wan_inputs), reference)
    off.close()


# ------------------------------------------------------------------------------------------------ direct loading


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_loader_equals_from_pretrained_bit_for_bit(wan_dir, dtype):
    ref = WanTransformer3DModel.from_pretrained(wan_dir, dtype=dtype)
    off = layerwise_from_pretrained(wan_dir, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False, dtype=dtype, resident_blocks=1)
    got = off.model
    assert type(got) is WanTransformer3DModel and not got.training
    assert state_equal(got.state_dict(), ref.state_dict())  # dtypes included: fp32 modules stay float32
    if dtype == torch.bfloat16:
        assert got.blocks[0].scale_shift_table.dtype == torch.float32
        assert got.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    ref_buffers, got_buffers = dict(ref.named_buffers()), dict(got.named_buffers())
    assert ref_buffers.keys() == got_buffers.keys() and ref_buffers  # rope's non-persistent tables
    assert all(bit_equal(ref_buffers[k], got_buffers[k]) for k in ref_buffers)
    assert [p.requires_grad for p in got.parameters()] == [p.requires_grad for p in ref.parameters()]
    off.close()
    assert state_equal(got.state_dict(), ref.state_dict())


def test_direct_loader_output_equals_resident(wan_dir, wan_inputs, reference):
    off = layerwise_from_pretrained(wan_dir, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=True, dtype=torch.float32)
    assert bit_equal(forward(off.model, wan_inputs), reference)
    off.close()


def test_direct_loader_reads_sharded_folders(wan_dir, tmp_path, wan_inputs, reference):
    WanTransformer3DModel.from_pretrained(wan_dir).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    off = layerwise_from_pretrained(tmp_path, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False, dtype=torch.float32)
    assert bit_equal(forward(off.model, wan_inputs), reference)
    off.close()


def test_direct_loader_without_positional_reads(wan_dir, wan_inputs, reference, monkeypatch):
    """The Windows path: no os.preadv, one handle per read."""
    from video_offload.offload.weights import safetensors_file

    monkeypatch.setattr(safetensors_file, "_HAS_PREADV", False)
    off = layerwise_from_pretrained(wan_dir, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False, dtype=torch.float32)
    assert bit_equal(forward(off.model, wan_inputs), reference)
    off.close()


def test_direct_loader_rejects_incomplete_folders(wan_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        layerwise_from_pretrained(tmp_path, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False)
    (tmp_path / "config.json").write_text((wan_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no diffusion_pytorch_model.safetensors"):
        layerwise_from_pretrained(tmp_path, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False)
    config = json.loads((wan_dir / "config.json").read_text())
    config["num_layers"] = NUM_LAYERS + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (wan_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(ModelLoadError, match=rf"missing: blocks\.{NUM_LAYERS}\."):
        layerwise_from_pretrained(tmp_path, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        layerwise_from_pretrained(tmp_path, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False)


# ------------------------------------------------------------------------------------------------ misuse


def test_mismatching_block_shapes_raise_naming_block_and_tensor(wan_dir):
    model = load(wan_dir)
    model.blocks[3].ffn.net[2] = nn.Linear(32, 20)
    with pytest.raises(
        ValueError, match=r"blocks\.3 is not shaped like blocks\.0: .*'ffn\.net\.2\.weight' is \(20, 32\)"
    ):
        LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False)


def test_misuse_fails_early(wan_dir):
    model = load(wan_dir)
    with pytest.raises(ConfigError, match="prefetch_depth=0"):
        LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, prefetch_depth=0)
    with pytest.raises(ConfigError, match="resident_blocks='most'"):
        LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks="most")
    with pytest.raises(ConfigError, match="resident_blocks=-1"):
        LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=False, resident_blocks=-1)
    with pytest.raises(ConfigError, match="pin_cpu_memory"):
        LayerwiseOffloader(model, model.blocks, "cpu", pin_cpu_memory=1)
    with pytest.raises(ValueError, match="not a submodule"):
        LayerwiseOffloader(model, nn.ModuleList([nn.Linear(2, 2)]), "cpu", pin_cpu_memory=False)
    with torch.device("meta"):
        meta = WanTransformer3DModel.from_config(model.config)
    with pytest.raises(ValueError, match="meta device"):
        LayerwiseOffloader(meta, meta.blocks, "cpu", pin_cpu_memory=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            LayerwiseOffloader(model, model.blocks, "cuda", pin_cpu_memory=False)
    # Nothing was touched by the failed attempts.
    assert all(not b._forward_pre_hooks for b in model.blocks)


# ------------------------------------------------------------------------------------------------ generic DiT


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.rand(dim))
        self.register_buffer("shift", torch.rand(dim), persistent=False)
        self.register_buffer("steps", torch.tensor([3], dtype=torch.int64))

    def forward(self, x):
        return x + self.lin(self.norm(x)) * self.scale + self.shift * self.steps


class ToyDiT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 6):
        super().__init__()
        self.proj_in = nn.Linear(8, dim)
        self.register_buffer("pos", torch.randn(dim))
        self.layers = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, 8)

    def forward(self, x):
        h = self.proj_in(x) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.proj_out(h)


@pytest.mark.parametrize("resident", [0, 3, "auto"])
def test_any_dit_with_buffers_in_and_out_of_blocks(resident):
    torch.manual_seed(0)
    model = ToyDiT()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
    buffers_before = {k: v.clone() for k, v in model.named_buffers()}
    off = LayerwiseOffloader(model, model.layers, "cpu", pin_cpu_memory=False, resident_blocks=resident)
    with torch.no_grad():
        for _ in range(3):
            assert bit_equal(model(x), expected)
    off.close()
    buffers_after = dict(model.named_buffers())
    assert all(bit_equal(buffers_before[k], buffers_after[k]) for k in buffers_before)


# ------------------------------------------------------------------------------------------------ GPU


def _random_wan_folder(folder: Path, config: dict, dtype=torch.bfloat16) -> Path:
    """A Diffusers-format folder with N(0, 0.02) weights tiled from a seeded pool (fast for GiB-sized models)."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        meta = WanTransformer3DModel.from_config(config)
    meta.save_config(str(folder))
    keep = WanTransformer3DModel._keep_in_fp32_modules
    pool = torch.randn(2**22 + 997, generator=torch.Generator().manual_seed(0)) * 0.02
    tensors = {}
    for i, (name, t) in enumerate(meta.state_dict().items()):
        numel = t.numel()
        reps = math.ceil((numel + 997) / pool.numel())
        start = (i * 131) % 997
        values = pool.repeat(reps)[start : start + numel] if reps > 1 else pool[start : start + numel]
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        tensors[name] = values.reshape(t.shape).to(target, copy=True)  # own storage: safetensors refuses views
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


WAN_SHAPES = {name: dict(num_attention_heads=c["num_attention_heads"], ffn_dim=c["ffn_dim"]) for name, c in WAN_DIT.items()}


@pytest.fixture(scope="module", params=list(WAN_SHAPES))
def big_wan_dir(request, tmp_path_factory):
    config = dict(WAN_DIT_COMMON, num_layers=4, **WAN_SHAPES[request.param])
    return _random_wan_folder(tmp_path_factory.mktemp(f"wan_{request.param}"), config)


def _big_inputs(device):
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, 16, 2, 16, 16, generator=gen).to(device, torch.bfloat16),
        torch.tensor([999.0], device=device),
        torch.randn(1, 64, 4096, generator=gen).to(device, torch.bfloat16),
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mode",
    [
        dict(resident_blocks=0),
        dict(resident_blocks=2),
        dict(resident_blocks="auto"),
        dict(resident_blocks=0, prefetch_depth=2),
        dict(resident_blocks=0, pin=False),
    ],
)
def test_gpu_bit_exact_against_resident_wan_shapes(big_wan_dir, mode):
    device = torch.device("cuda")
    inputs = _big_inputs(device)
    resident = WanTransformer3DModel.from_pretrained(big_wan_dir, dtype=torch.bfloat16).to(device)
    expected = forward(resident, inputs)
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    mode = dict(mode)
    pin = mode.pop("pin", True)
    off = layerwise_from_pretrained(big_wan_dir, device, model_cls=WanTransformer3DModel, pin_cpu_memory=pin, dtype=torch.bfloat16, **mode)
    assert off.stats().pinned_bytes == (off.stats().host_bytes if pin else 0)
    for _ in range(3):
        assert bit_equal(forward(off.model, inputs), expected)
    # Interrupted forward, then exact again.
    pending = [1]
    off.model.blocks[2].register_forward_hook(raise_once(pending))
    with pytest.raises(Boom):
        forward(off.model, inputs)
    assert bit_equal(forward(off.model, inputs), expected)
    off.close()
    assert all(t.device.type == "cpu" for t in off.model.parameters())


@pytest.mark.gpu
def test_gpu_memory_returns_to_baseline_and_stays_flat(big_wan_dir):
    device = torch.device("cuda")
    inputs = _big_inputs(device)
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device)
    off = layerwise_from_pretrained(big_wan_dir, device, model_cls=WanTransformer3DModel, pin_cpu_memory=True, dtype=torch.bfloat16)
    stats = off.stats()
    # Never the full DiT on the GPU: other weights + slots only.
    # (each allocation is rounded up to 512 bytes)
    assert torch.cuda.memory_allocated(device) - baseline <= stats.non_block_bytes + stats.slot_bytes + 4 * 2**20
    out = forward(off.model, inputs)
    del out
    torch.cuda.synchronize()
    after_first = torch.cuda.memory_allocated(device)
    rss_first = _rss()
    for _ in range(19):
        out = forward(off.model, inputs)
        del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(device) == after_first
    assert _rss() - rss_first < 64 * 2**20
    off.close()
    model = off.model
    del off, model
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(device) == baseline


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.gpu
def test_gpu_auto_keeps_everything_resident_when_it_fits_under_inference_mode(wan_dir, wan_inputs):
    device = torch.device("cuda")
    inputs = tuple(t.to(device) for t in wan_inputs)
    expected = forward(load(wan_dir).to(device), inputs)
    with torch.inference_mode():  # as ComfyUI loads and runs models
        model = load(wan_dir)
        off = LayerwiseOffloader(model, model.blocks, device, pin_cpu_memory=True, resident_blocks="auto")
        assert bit_equal(model(*inputs, return_dict=False)[0], expected)
        assert off.stats().resident_blocks == NUM_LAYERS and off.stats().slot_bytes == 0
        assert bit_equal(model(*inputs, return_dict=False)[0], expected)
        off.set_resident_blocks(1)
        assert bit_equal(model(*inputs, return_dict=False)[0], expected)
    off.close()
    assert all(t.device.type == "cpu" for t in model.parameters())
