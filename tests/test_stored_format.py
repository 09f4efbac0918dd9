"""fp8 stays fp8 until the device: the host arena holds the stored bytes, those are what the slot pipeline copies,
and the widening (ComfyUI's rule: cast, then times the per-tensor scale) happens in the slot - with outputs bit for
bit those of a resident model whose weights were widened the same way. CPU: the same slot code as on a GPU."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from video_offload.offload.core.layerwise import LayerwiseOffloader
from video_offload.offload.core.spec import find_block_list
from video_offload.offload.core.stored_format import dequantize
from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan
from video_offload.offload.weights.tensor_source import SafetensorsWeights, build_empty_model

NUM_LAYERS = 4
FP8 = torch.float8_e4m3fn


def comfyui_dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI 0.3.64's arithmetic, written from comfy/ops.py (scaled_fp8_op.forward_comfy_cast_weights): the fp8
    weight is cast to the compute dtype by cast_bias_weight, then ``weight * scale_weight.to(weight.dtype)``."""
    weight = weight.to(dtype)
    if scale is None:
        return weight
    return weight * scale.to(device=weight.device, dtype=weight.dtype)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def scale_key(key: str) -> str | None:
    return key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None


def quantize_linears(state: dict[str, torch.Tensor], scaled: bool) -> dict[str, torch.Tensor]:
    """Every 2-D ``.weight`` to float8_e4m3fn (with a per-tensor amax scale when ``scaled``), as ComfyUI's files."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2:
            if scaled:
                scale = (value.float().abs().max() / 448.0).clamp(min=1e-12)
                out[key] = (value.float() / scale).to(FP8)
                out[scale_key(key)] = scale.reshape(())
            else:
                out[key] = value.to(FP8)
        else:
            out[key] = value.contiguous()
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny"), seed=5, spec=TinyWanSpec(num_layers=NUM_LAYERS)) / "transformer"


@pytest.fixture(scope="module", params=[True, False], ids=["scaled", "plain"])
def fp8_file(request, transformer_dir, tmp_path_factory):
    model = WanTransformer3DModel.from_pretrained(transformer_dir, dtype=torch.float32)
    path = tmp_path_factory.mktemp("fp8") / "dit_fp8.safetensors"
    save_file(quantize_linears(model.state_dict(), scaled=request.param), str(path))
    return path


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 8, 8, generator=gen), torch.tensor([500.0]), torch.randn(1, 7, 32, generator=gen)


def open_weights(path, dtype):
    return SafetensorsWeights([path], dtype, WanTransformer3DModel._keep_in_fp32_modules, scale_key_for=scale_key,
                              describe=str(path))


def empty_model(transformer_dir, weights, dtype):
    config = dict(WanTransformer3DModel.load_config(str(transformer_dir)))
    model = build_empty_model(WanTransformer3DModel, config, dtype)
    weights.apply_dtypes(model)
    return model


def resident_widened(transformer_dir, path, dtype):
    """The reference: every weight widened once on load (the same rule), the whole model in memory."""
    with open_weights(path, dtype) as weights:
        model = empty_model(transformer_dir, weights, dtype)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            dest = torch.empty(tensor.shape, dtype=tensor.dtype)
            weights(name, tensor, dest)
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(dest, requires_grad=False)
            else:
                module._buffers[attr] = dest
    return model


def streamed(transformer_dir, path, dtype, device="cpu", pin=False, **options):
    with open_weights(path, dtype) as weights:
        model = empty_model(transformer_dir, weights, dtype)
        _, blocks = find_block_list(model)
        return LayerwiseOffloader(model, blocks, device, pin_cpu_memory=pin, weights=weights, **options)


def forward(model, inputs, dtype, device="cpu"):
    x, t, text = inputs
    with torch.inference_mode():
        out = model(x.to(device, dtype), t.to(device), text.to(device, dtype), return_dict=False)[0]
    return out.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("resident, depth", [(0, 1), (0, 2), (2, 1), (NUM_LAYERS, 1)])
def test_streamed_from_fp8_equals_resident_widened_bit_for_bit(transformer_dir, fp8_file, inputs, dtype, resident, depth):
    reference = forward(resident_widened(transformer_dir, fp8_file, dtype), inputs, dtype)
    off = streamed(transformer_dir, fp8_file, dtype, resident_blocks=resident, prefetch_depth=depth)
    try:
        for _ in range(2):
            assert bit_equal(forward(off.model, inputs, dtype), reference)
        stats = off.stats()
        assert stats.stored_narrow and stats.resident_blocks == resident
    finally:
        off.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_host_arena_holds_fp8_and_the_pipeline_copies_the_stored_bytes(transformer_dir, fp8_file, inputs, dtype):
    off = streamed(transformer_dir, fp8_file, dtype)
    try:
        block = off.blocks[0]
        linear_params = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        stored = {slot.name: slot for slot in off.staged.stored.slots}
        for name in linear_params:
            slot = stored[f"{name}.weight"]
            numel = block.get_submodule(name).weight.numel()
            assert slot.dtype == FP8 and slot.nbytes == numel, name  # 1 byte per parameter in host memory
        # The arena is exactly the stored layout (fp8 linears, other tensors in their compute dtype, the scales),
        # one block after another; the host views the arena was filled through have the stored dtypes.
        stats = off.stats()
        assert stats.host_bytes == NUM_LAYERS * off.staged.stored.nbytes == NUM_LAYERS * stats.block_bytes
        assert stats.block_bytes < stats.device_block_bytes
        assert {v.dtype for v in off._host_views[0]} >= {FP8}
        before = stats.transfers
        forward(off.model, inputs, dtype)
        after = off.stats()
        assert after.transferred_bytes - stats.transferred_bytes == (after.transfers - before) * off.staged.stored.nbytes
        assert after.transfers - before == NUM_LAYERS
        # The device side: one raw buffer of stored bytes plus the compute-dtype slots.
        assert after.slot_bytes == 2 * stats.device_block_bytes + off.staged.stored.nbytes
    finally:
        off.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slot_weights_equal_comfyui_dequantisation_elementwise(transformer_dir, fp8_file, inputs, dtype):
    """While each block runs, its weights are in a slot and equal ComfyUI's computation on the file's tensors."""
    from safetensors import safe_open

    off = streamed(transformer_dir, fp8_file, dtype)
    seen = {}

    def check(index, module, args):
        assert off.block_location(index) == "slot"
        seen[index] = {n: p.detach().clone() for n, p in module.named_parameters()}

    handles = [b.register_forward_pre_hook(functools.partial(check, i)) for i, b in enumerate(off.blocks)]
    try:
        forward(off.model, inputs, dtype)
        assert sorted(seen) == list(range(NUM_LAYERS))
        with safe_open(str(fp8_file), "pt") as f:
            keys = set(f.keys())
            for index, params in seen.items():
                for name, value in params.items():
                    key = f"blocks.{index}.{name}"
                    stored = f.get_tensor(key)
                    if stored.dtype != FP8:
                        continue
                    scale_name = scale_key(key)
                    scale = f.get_tensor(scale_name) if scale_name in keys else None
                    assert bit_equal(value, comfyui_dequantize(stored, scale, dtype)), key
                    assert bit_equal(value, dequantize(stored, scale, dtype)), key
        # Between forwards the fp8 tensors point at a NaN placeholder that takes no memory, not at a widened copy.
        weight = off.blocks[0].attn1.to_q.weight
        assert weight.stride() == (0, 0) and torch.isnan(weight[0, 0])
        assert off.block_location(0) == "host"
    finally:
        for h in handles:
            h.remove()
        off.close()


def test_non_block_tensors_are_widened_once_at_placement(transformer_dir, fp8_file):
    from safetensors import safe_open

    off = streamed(transformer_dir, fp8_file, torch.float32)
    try:
        weight = off.model.condition_embedder.text_embedder.linear_1.weight
        key = "condition_embedder.text_embedder.linear_1.weight"
        with safe_open(str(fp8_file), "pt") as f:
            scale = f.get_tensor(scale_key(key)) if scale_key(key) in set(f.keys()) else None
            assert bit_equal(weight, comfyui_dequantize(f.get_tensor(key), scale, torch.float32))
    finally:
        off.close()


def test_pinned_prefix_is_whole_blocks_within_the_budget(transformer_dir, fp8_file, inputs):
    """Only CUDA can pin; here the request is checked (the arena rounds the budget down to whole blocks)."""
    off = streamed(transformer_dir, fp8_file, torch.float32)
    block = off.stats().block_bytes
    off.close()
    from video_offload.offload.core.host_memory import HostArena

    arena = HostArena(4 * block, pin=False, pin_bytes=int(2.5 * block))
    assert arena.pinned_bytes == 0 and not arena.pinned  # nothing pins without CUDA, whatever the budget


@pytest.mark.gpu
@pytest.mark.parametrize("resident, depth", [(0, 1), (0, 2), (2, 1), ("auto", 1)])
def test_gpu_fp8_streaming_equals_resident_widened_bit_for_bit(transformer_dir, fp8_file, inputs, resident, depth):
    """On CUDA: copies of fp8 bytes on the copy stream, widening on the copy stream, compute on the default stream,
    all ordered by events - the output is the resident widened model's, bit for bit, forward after forward."""
    dtype = torch.bfloat16
    reference = forward(resident_widened(transformer_dir, fp8_file, dtype).cuda(), inputs, dtype, "cuda")
    off = streamed(transformer_dir, fp8_file, dtype, device="cuda", pin=True, resident_blocks=resident,
                   prefetch_depth=depth)
    try:
        for _ in range(3):
            assert bit_equal(forward(off.model, inputs, dtype, "cuda"), reference)
        stats = off.stats()
        assert stats.stored_narrow and stats.pinned_bytes == stats.host_bytes
    finally:
        off.close()


def every_fp8_value(dtype: torch.dtype, repeat: int) -> torch.Tensor:
    """All 256 bit patterns of an fp8 dtype except its NaNs (they stay NaN either way and NaN != NaN), repeated."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype)
    values = values[~values.float().isnan()]
    return values.repeat(repeat)


@pytest.mark.gpu
@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_one_pass_widening_equals_the_eager_rule_for_every_fp8_value(stored, compute):
    """The Triton kernel the slots use on CUDA (one read, one write per weight) gives the eager rule's numbers -
    cast, then times the scale rounded to the compute dtype - for every fp8 value, scaled (small and large scales,
    so products land in the compute dtype's subnormals and near its top) and unscaled, next to a tensor stored
    in its compute dtype; in a staged block's real layout, and on a stream other than the default one."""
    from video_offload.offload.core.host_memory import FlatLayout
    from video_offload.offload.core.stored_format import StagedLayout, StoredFormat
    from video_offload.offload.core.widen_kernel import TritonWidener, decoder_for

    pytest.importorskip("triton")
    values = every_fp8_value(stored, 41)  # odd sizes: the last program is partly masked
    scales = [torch.tensor(s, dtype=torch.float32) for s in (3.0517578125e-05, 0.0123, 1.0, 57.3)]
    named = [(f"w{i}", torch.empty(values.shape, dtype=compute, device="meta")) for i in range(len(scales) + 1)]
    named.append(("norm", torch.empty(1000, dtype=compute, device="meta")))
    formats = [StoredFormat(stored, s) for s in scales] + [StoredFormat(stored, None), None]
    staged = StagedLayout.of(FlatLayout.of(named), formats)
    host = torch.zeros(staged.stored.nbytes, dtype=torch.uint8)
    for step, fmt in zip(staged.steps, formats):
        step.stored.view_into(host).copy_(values if fmt is not None else torch.randn(1000).to(compute))
    staged.fill_scales(host, formats)
    raw = host.cuda()
    eager = torch.full((staged.compute.nbytes,), 0xAB, dtype=torch.uint8, device="cuda")
    fused = eager.clone()
    StagedLayout.decode(staged.views(raw, eager))
    assert isinstance(decoder_for(torch.device("cuda"), staged), TritonWidener)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        decoder_for(torch.device("cuda"), staged)(staged.views(raw, fused))
    stream.synchronize()
    assert torch.equal(fused, eager)  # every byte, padding included
    for programs, block, warps in ((1, 4096, 4), (7, 4096, 4), (0, 16384, 8), (66, 16384, 8)):
        looped = torch.full_like(eager, 0xAB)  # bounded programs looping over their pieces; larger pieces
        TritonWidener(programs, block, warps)(staged.views(raw, looped))
        assert torch.equal(looped, eager)
    for step, fmt in zip(staged.steps[:-1], formats[:-1]):  # and the eager rule is ComfyUI's
        expected = comfyui_dequantize(values.cuda(), None if fmt.scale is None else fmt.scale.cuda(), compute)
        assert bit_equal(step.compute.view_into(fused), expected)
