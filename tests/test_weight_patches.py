"""The model-agnostic LoRA machinery (``core.weight_patches``): a streamed model with patches equals the resident
model with the same terms merged, on any placement; the host master copy is never written; misuse is refused."""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import WanTransformer3DModel

from test_layerwise import WAN_SHAPES, _random_wan_folder, bit_equal, forward
from video_offload.offload.core.placement import ModulePlacer
from video_offload.offload.core.weight_patches import (
    Delta,
    LowRank,
    PatchFile,
    PatchSet,
    merge_into_resident,
    patch_tensor,
)
from video_offload.offload.families.wan.shapes import WAN_DIT_COMMON
from video_offload.offload.families.wan.tiny import TinyWanSpec, build_tiny_wan
from video_offload.offload.weights.streaming import layerwise_from_pretrained


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny"), seed=4, spec=TinyWanSpec(num_layers=4)) / "transformer"


def inputs(device="cpu", dtype=torch.float32, text_dim=32, channels=16):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, channels, 3, 8, 8, generator=gen).to(device, dtype), torch.tensor([500.0], device=device),
            torch.randn(1, 7, text_dim, generator=gen).to(device, dtype))


def random_patches(model, rank=3, seed=0, scale=0.1, dtype=torch.float32, name="random") -> PatchSet:
    """Low-rank terms on every Linear, a full delta on one block norm and one bias."""
    gen = torch.Generator().manual_seed(seed)
    targets = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            up = (torch.randn(module.out_features, rank, generator=gen) * scale).to(dtype)
            down = (torch.randn(rank, module.in_features, generator=gen) * scale).to(dtype)
            targets[module_name + ".weight"] = (LowRank(up, down, 0.5),)
    norm = model.blocks[1].norm2.weight
    targets["blocks.1.norm2.weight"] = (Delta((torch.randn(norm.shape, generator=gen) * scale).to(dtype)),)
    bias = model.blocks[2].ffn.net[2].bias
    targets["blocks.2.ffn.net.2.bias"] = (Delta((torch.randn(bias.shape, generator=gen) * scale).to(dtype)),)
    return PatchSet(((PatchFile(name, targets), 1.0),))


def merged_reference(folder, patches, device, dtype):
    """The resident model with the block terms merged and the same side paths outside the blocks."""
    model = WanTransformer3DModel.from_pretrained(folder, dtype=dtype).to(device)
    merge_into_resident(model, patches)
    return model


@pytest.mark.parametrize("options", [dict(), dict(resident_blocks=2), dict(prefetch_depth=2)],
                         ids=["streamed", "two_resident", "depth2"])
def test_streamed_with_patches_equals_resident_with_them_merged(wan_dir, options):
    off = layerwise_from_pretrained(wan_dir, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False,
                                    dtype=torch.float32, **options)
    master = off._arena.buffer.clone()
    plain = forward(off.model, inputs())
    a = random_patches(off.model, seed=1, name="a")
    b = PatchSet(((a.entries[0][0], -0.5), (random_patches(off.model, seed=2, name="b").entries[0][0], 2.0)))
    for patches in (a, b):
        off.set_weight_patches(patches)
        expected = forward(merged_reference(wan_dir, patches, "cpu", torch.float32), inputs())
        for _ in range(2):  # slots cycle: every copy is patched again from the host bytes
            assert bit_equal(forward(off.model, inputs()), expected)
        assert off.stats().weight_patches == patches.describe()
    off.set_weight_patches(None)
    assert bit_equal(forward(off.model, inputs()), plain)
    assert torch.equal(off._arena.buffer, master)
    off.close()


def test_an_equal_patch_set_costs_nothing_and_misuse_is_refused(wan_dir):
    off = layerwise_from_pretrained(wan_dir, "cpu", model_cls=WanTransformer3DModel, pin_cpu_memory=False,
                                    dtype=torch.float32)
    patches = random_patches(off.model)
    off.set_weight_patches(patches)
    transfers = off.stats().transfers
    off.set_weight_patches(PatchSet(patches.entries))  # equal: same file object, same strength
    assert off.stats().transfers == transfers

    conv = off.model.patch_embedding.weight
    bad = PatchSet(((PatchFile("conv", {"patch_embedding.weight": (Delta(torch.zeros(conv.shape)),)}), 1.0),))
    with pytest.raises(ValueError, match=r"only the weight and bias of Linear layers .*patch_embedding is a Conv3d"):
        off.set_weight_patches(bad)
    wrong = PatchSet(((PatchFile("wide", {"blocks.0.attn1.to_q.weight": (LowRank(torch.zeros(48, 2), torch.zeros(2, 24)),)}), 1.0),))
    with pytest.raises(ValueError, match=r"LoRA wide does not fit WanTransformer3DModel: it is \(48 x rank 2 x 24\)"):
        off.set_weight_patches(wrong)
    missing = PatchSet(((PatchFile("nowhere", {"blocks.9.attn1.to_q.weight": (Delta(torch.zeros(1)),)}), 1.0),))
    with pytest.raises(ValueError, match=r"LoRA nowhere: WanTransformer3DModel has no tensor blocks.9.attn1.to_q.weight"):
        off.set_weight_patches(missing)
    with pytest.raises(ValueError, match=r"strength must be a finite number"):
        PatchSet(((patches.entries[0][0], float("nan")),))
    assert off.weight_patches == patches  # a refused set changes nothing
    off.close()


def test_a_placed_module_carries_patches_in_its_device_copy_only(wan_dir):
    model = WanTransformer3DModel.from_pretrained(wan_dir, dtype=torch.float32)
    patches = random_patches(model)
    placer = ModulePlacer("dit", model, pin=False)
    master = placer.arena.buffer.clone()
    placer.set_weight_patches(patches)  # no device copy yet: applied when it is made
    placer.to_device(torch.device("cpu"))
    patched = forward(model, inputs())
    reference = WanTransformer3DModel.from_pretrained(wan_dir, dtype=torch.float32)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, terms in patches.targets().items():  # a placed module: merged everywhere, no side path
            patch_tensor(params[name].data, terms)
    assert bit_equal(patched, forward(reference, inputs()))
    placer.set_weight_patches(None)
    plain = forward(model, inputs())
    assert bit_equal(plain, forward(WanTransformer3DModel.from_pretrained(wan_dir, dtype=torch.float32), inputs()))
    placer.set_weight_patches(patches)
    assert bit_equal(forward(model, inputs()), patched)
    placer.to_host()
    assert bit_equal(forward(model, inputs()), plain)  # the host copy never had them
    assert torch.equal(placer.arena.buffer, master)
    placer.close()


@pytest.fixture(scope="module", params=list(WAN_SHAPES))
def big_wan_dir(request, tmp_path_factory):
    config = dict(WAN_DIT_COMMON, num_layers=4, **WAN_SHAPES[request.param])
    return _random_wan_folder(tmp_path_factory.mktemp(f"wan_{request.param}"), config)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(), dict(resident_blocks=2), dict(prefetch_depth=2)],
                         ids=["streamed", "two_resident", "depth2"])
def test_gpu_lora_merged_in_the_slot_equals_resident_merge_bit_for_bit(big_wan_dir, options):
    """bf16 on CUDA: the merge on the copy stream (pinned factors, one scratch buffer) equals the same arithmetic on
    the resident weights bit for bit; a strength change takes effect at once; the pinned host copy is untouched."""
    device = torch.device("cuda")
    x = inputs(device, torch.bfloat16, text_dim=4096)
    off = layerwise_from_pretrained(big_wan_dir, device, model_cls=WanTransformer3DModel, pin_cpu_memory=True,
                                    dtype=torch.bfloat16, **options)
    master = off._arena.buffer.clone()
    base = random_patches(off.model, rank=64, scale=0.02, dtype=torch.bfloat16)
    for strength in (1.0, 0.3):
        patches = PatchSet(((base.entries[0][0], strength),))
        off.set_weight_patches(patches)
        resident = merged_reference(big_wan_dir, patches, device, torch.bfloat16)
        expected = forward(resident, x)
        del resident
        gc.collect()
        torch.cuda.empty_cache()
        for _ in range(3):
            assert bit_equal(forward(off.model, x), expected)
    assert off.stats().pinned_bytes == off.stats().host_bytes
    torch.cuda.synchronize()
    assert torch.equal(off._arena.buffer, master)
    off.close()
