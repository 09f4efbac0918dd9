"""The one tensor walker and the one rebinder: every module the pack moves goes through these two functions.

Weights move by re-pointing a module's parameters and buffers at other memory (a host arena view, a GPU slot, a
resident copy) rather than by ``module.to()``, which would allocate a whole new copy. Where a tensor may be
re-pointed in place (``param.data = view``) it is, so parameter identity, hooks and ties survive; a meta tensor
(a model built without memory) or an inference tensor (a model built under ``torch.inference_mode()``, as ComfyUI
builds models) cannot take ordinary data that way and is replaced, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TensorRef:
    """Where one parameter or buffer is registered: ``owner._parameters[attr]`` or ``owner._buffers[attr]``."""

    name: str
    """Qualified name relative to the walked module (``blocks.0.attn1.to_q.weight``)."""
    owner: nn.Module
    attr: str
    is_param: bool

    def get(self) -> torch.Tensor:
        return self.owner._parameters[self.attr] if self.is_param else self.owner._buffers[self.attr]

    def rebind(self, new: torch.Tensor) -> torch.Tensor:
        """Point this parameter/buffer at ``new``; returns the tensor now registered."""
        return rebind(self.owner, self.attr, self.is_param, new)


def tensor_refs(module: nn.Module, unique: bool = True) -> list[TensorRef]:
    """Every parameter, then every buffer, of ``module`` (in ``named_modules`` order), each tensor once: a tensor
    shared by two modules (tied embeddings) appears under its first name only (``unique=False``: under every name).
    This order is the order of every flat layout the pack builds, so two identically built modules lay out
    identically."""
    seen: set[int] = set()
    params: list[TensorRef] = []
    buffers: list[TensorRef] = []
    for module_name, sub in module.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, tensor in sub._parameters.items():
            if tensor is not None and (id(tensor) not in seen or not unique):
                seen.add(id(tensor))
                params.append(TensorRef(prefix + attr, sub, attr, True))
        for attr, tensor in sub._buffers.items():
            if tensor is not None and (id(tensor) not in seen or not unique):
                seen.add(id(tensor))
                buffers.append(TensorRef(prefix + attr, sub, attr, False))
    return params + buffers


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(ref.name, ref.get()) for ref in tensor_refs(module)]


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in named_tensors(module))


def rebind(owner: nn.Module, attr: str, is_param: bool, new: torch.Tensor) -> torch.Tensor:
    """Point ``owner``'s parameter/buffer ``attr`` at ``new`` (see the module docstring for when it is replaced)."""
    store = owner._parameters if is_param else owner._buffers
    old = store[attr]
    if is_param:
        if old.is_meta or old.is_inference() or old.dtype != new.dtype:
            store[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            old.data = new
    elif old.is_meta or old.is_inference() or old.dtype != new.dtype:
        store[attr] = new
    else:
        old.data = new
    return store[attr]


def rebind_named(module: nn.Module, name: str, new: torch.Tensor) -> torch.Tensor:
    """:func:`rebind` by qualified name (``blocks.0.norm2.weight``)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return rebind(owner, attr, attr in owner._parameters, new)


def materialize(module: nn.Module, fill_many, device: torch.device | str = "cpu") -> nn.Module:
    """Give every meta tensor of ``module`` memory on ``device`` and fill it with ``fill_many(items)`` (a weight
    source's batch fill: ``(name, current, dest)`` triples); a tensor tied under several names is filled once and
    stays shared. Loading a whole module, into host memory or straight onto a GPU, goes through here. Returns the
    module (eval, no grad)."""
    groups: dict[int, list[TensorRef]] = {}
    for ref in tensor_refs(module, unique=False):  # a tied tensor under every name it has, filled once
        groups.setdefault(id(ref.get()), []).append(ref)
    items = []
    # Ordinary tensors whatever the caller's mode: ComfyUI runs nodes inside torch.inference_mode(), which is
    # thread-local, and a source's reader threads fill these outside it (an inference tensor refuses that).
    with torch.inference_mode(False):
        for refs in groups.values():
            tensor = refs[0].get()
            if tensor.is_meta:
                dest = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                items.append((refs[0].name, tensor, dest))
                registered = refs[0].rebind(dest)
                for ref in refs[1:]:  # the same object under every name, as the tie had it
                    (ref.owner._parameters if ref.is_param else ref.owner._buffers)[ref.attr] = registered
    fill_many(items)
    return module.eval().requires_grad_(False)
