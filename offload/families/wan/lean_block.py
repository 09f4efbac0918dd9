"""A Wan block's forward over slices of the sequence: the same numbers as diffusers', a fraction of the memory.

At 480x832x81 a 14B block sees 32,760 tokens of width 5,120. diffusers' ``WanTransformerBlock.forward`` computes
every token-wise step over the whole sequence at once, in float32 where the block asks for it: the norm and
modulation of each sub-layer (``norm1(x.float()) * (1 + scale) + shift``: three 0.67 GB float32 temporaries), the
query/key RMS norms and the rotary embedding (float32 again), the residual updates, and the feed-forward's
13,824-wide intermediate (0.9 GB twice). Only attention itself needs every token at once. Chunking the feed-forward
alone (``core.chunking``) leaves the rest, which is why the whole run did not fit 6 GiB (issue 10).

Here every token-wise step runs over slices of ``max_tokens`` tokens and writes into preallocated full-sequence
tensors in the block's dtype; attention runs whole, through diffusers' own ``dispatch_attention_fn``. Each token
goes through the same operations in the same order as in diffusers' block (``transformer_wan.py``:
``WanTransformerBlock.forward`` and ``WanAttnProcessor``), so the output is the same bit for bit on the CPU; on a
GPU it is as long as the kernels compute each row alike for every row count (checked on the H200 by
``tests/test_activation_memory.py`` and ``tests/test_lean_block.py``). On CUDA the element-wise chains - the
modulations, the gated residuals, the rotary embedding - each run as one Triton pass with the same float32
arithmetic (``pointwise``): with them the sliced block takes 0.93x the time of diffusers' (H200, 480p81, slices
of 8,192 tokens) where the same block as PyTorch operations took 1.05x.

Installed through diffusers' own extension points, nothing patched: a ``HookRegistry`` hook on each block (named
:data:`HOOK_NAME`, idempotent, removable) and ``WanAttention.set_processor`` for the attention's token-wise parts
(the original processor is put back on removal). Blocks whose attention diffusers has fused (``to_qkv``) or
prepared for context parallelism keep their own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .pointwise import gated_residual_into, modulate, rotate_into

HOOK_NAME = "video_offload.lean_wan_block"


def _slices(tokens: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, tokens)) for start in range(0, tokens, size)]


class LeanWanAttnProcessor:
    """``WanAttnProcessor`` with the per-token parts (projections, q/k norms, rotary, output projection) run over
    slices of the query tokens; the attention over the whole sequence is diffusers' own call."""

    def __init__(self, original: Any, max_tokens: int, fused_pointwise: bool = True):
        self.original = original
        """The processor this one replaced, put back by :func:`remove_lean_blocks`."""
        self.max_tokens = max_tokens
        self.fused_pointwise = fused_pointwise
        """Rotary embedding in one Triton pass where it can run (``pointwise``); False: PyTorch operations."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        backend = getattr(self.original, "_attention_backend", None)
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - 512  # diffusers' constant: the text length
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
        self_attention = encoder_hidden_states is None
        batch, tokens, _ = hidden_states.shape
        slices = _slices(tokens, self.max_tokens)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(2, (attn.heads, -1))

        # The value projection and (below) the output projection run whole: a linear layer's only transient is
        # its output, which is the whole-sequence tensor anyway. The query and key pass float32 RMS norms and the
        # rotary embedding, so they run per slice and land in place.
        value = heads(attn.to_v(hidden_states)) if self_attention else None
        query = key = None
        for sl in slices:
            piece = hidden_states[:, sl]
            q = heads(attn.norm_q(attn.to_q(piece)))
            k = heads(attn.norm_k(attn.to_k(piece))) if self_attention else None
            if query is None:
                query = q.new_empty((batch, tokens) + tuple(q.shape[2:]))
                if self_attention:
                    key = k.new_empty(query.shape)
            if rotary_emb is not None:
                cos, sin = rotary_emb[0][:, sl], rotary_emb[1][:, sl]
                rotate_into(query[:, sl], q, cos, sin, self.fused_pointwise)
                rotate_into(key[:, sl], k, cos, sin, self.fused_pointwise)
            else:
                query[:, sl] = q
                if self_attention:
                    key[:, sl] = k
            del q, k
        if not self_attention:
            key = heads(attn.norm_k(attn.to_k(encoder_hidden_states)))
            value = heads(attn.to_v(encoder_hidden_states))
        query_dtype = query.dtype

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img = heads(attn.norm_added_k(attn.add_k_proj(encoder_hidden_states_img)))
            value_img = heads(attn.add_v_proj(encoder_hidden_states_img))
            hidden_states_img = dispatch_attention_fn(query, key_img, value_img, attn_mask=None, dropout_p=0.0,
                                                      is_causal=False, backend=backend, parallel_config=None)
            hidden_states_img = hidden_states_img.flatten(2, 3).to(query.dtype)

        attended = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                         backend=backend, parallel_config=None)
        del query, key, value
        attended = attended.flatten(2, 3).to(query_dtype)
        if hidden_states_img is not None:
            attended.add_(hidden_states_img)  # diffusers: hidden_states + hidden_states_img, the same sum in place
            del hidden_states_img
        return attn.to_out[1](attn.to_out[0](attended))


def _hook_class():
    from diffusers.hooks import ModelHook

    class LeanWanBlockHook(ModelHook):
        """Replaces a ``WanTransformerBlock``'s forward by :func:`lean_block_forward`."""

        def __init__(self, max_tokens: int, fused_pointwise: bool):
            super().__init__()
            self.max_tokens = max_tokens
            self.fused_pointwise = fused_pointwise

        def new_forward(self, module: nn.Module, hidden_states, encoder_hidden_states, temb, rotary_emb):
            return lean_block_forward(module, hidden_states, encoder_hidden_states, temb, rotary_emb, self.max_tokens,
                                      self.fused_pointwise)

    return LeanWanBlockHook


def lean_block_forward(block: nn.Module, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rotary_emb,
                       max_tokens: int, fused_pointwise: bool = True) -> torch.Tensor:
    """``WanTransformerBlock.forward`` with every token-wise step over slices of ``max_tokens`` tokens, the
    element-wise ones each in one pass where ``pointwise`` can (``fused_pointwise``)."""
    tokens = x.shape[1]
    slices = _slices(tokens, max_tokens)
    if temb.ndim == 4:  # one modulation per token (Wan2.2 TI2V): computed per slice, never for the whole sequence
        table = block.scale_shift_table.unsqueeze(0)

        def modulation(sl: slice) -> list[torch.Tensor]:
            return [m.squeeze(2) for m in (table + temb[:, sl].float()).chunk(6, dim=2)]
    else:
        shared = (block.scale_shift_table + temb.float()).chunk(6, dim=1)

        def modulation(sl: slice) -> list[torch.Tensor]:
            return shared

    # 1. Self-attention: norm and modulation per slice, attention whole, residual per slice.
    normed = torch.empty_like(x)
    for sl in slices:
        shift, scale = modulation(sl)[:2]
        modulate(block.norm1(x[:, sl].float()), scale, shift, x.dtype, normed[:, sl], fused_pointwise)
    attended = block.attn1(normed, None, None, rotary_emb)
    del normed
    out = torch.empty_like(x)
    for sl in slices:
        gated_residual_into(out[:, sl], x[:, sl], attended[:, sl], modulation(sl)[2], fused_pointwise)
    del attended
    x = out  # the caller's tensor is never written

    # 2. Cross-attention.
    normed = torch.empty_like(x)
    for sl in slices:
        normed[:, sl] = block.norm2(x[:, sl].float()).type_as(x)
    attended = block.attn2(normed, context, None, None)
    del normed
    x.add_(attended)  # diffusers: hidden_states + attn_output, the same sum in place (x is this forward's own)
    del attended

    # 3. Feed-forward, wholly per slice.
    for sl in slices:
        c_shift, c_scale, c_gate = modulation(sl)[3:6]
        normed = modulate(block.norm3(x[:, sl].float()), c_scale, c_shift, x.dtype, fused=fused_pointwise)
        ff = block.ffn(normed)
        del normed
        gated_residual_into(x[:, sl], x[:, sl], ff, c_gate, fused_pointwise)
        del ff
    return x


def _can_lean(block: nn.Module) -> bool:
    for attn in (block.attn1, block.attn2):
        if getattr(attn, "fused_projections", False):
            return False
        processor = attn.processor if not isinstance(attn.processor, LeanWanAttnProcessor) else attn.processor.original
        if getattr(processor, "_parallel_config", None) is not None:
            return False
    return True


def apply_lean_blocks(blocks: list[nn.Module], max_tokens: int, fused_pointwise: bool = True) -> int:
    """Run every block of ``blocks`` over slices of ``max_tokens`` tokens (idempotent: a second call only changes
    the size), the element-wise steps in one Triton pass each where they can (``fused_pointwise``; False is for
    measuring them). Returns how many blocks run lean (those with fused or context-parallel attention keep their
    own)."""
    from diffusers.hooks import HookRegistry

    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be at least 1")
    lean = 0
    for block in blocks:
        if not _can_lean(block):
            continue
        for attn in (block.attn1, block.attn2):
            if isinstance(attn.processor, LeanWanAttnProcessor):
                attn.processor.max_tokens = max_tokens
                attn.processor.fused_pointwise = fused_pointwise
            else:
                attn.set_processor(LeanWanAttnProcessor(attn.processor, max_tokens, fused_pointwise))
        registry = HookRegistry.check_if_exists_or_initialize(block)
        hook = registry.get_hook(HOOK_NAME)
        if hook is not None:
            hook.max_tokens = max_tokens
            hook.fused_pointwise = fused_pointwise
        else:
            registry.register_hook(_hook_class()(max_tokens, fused_pointwise), HOOK_NAME)
        lean += 1
    return lean


def remove_lean_blocks(blocks: list[nn.Module]) -> None:
    """Give every block its own forward and attention processors back. Idempotent."""
    for block in blocks:
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
        for attn in (block.attn1, block.attn2):
            if isinstance(attn.processor, LeanWanAttnProcessor):
                attn.set_processor(attn.processor.original)


def lean_tokens(block: nn.Module) -> int | None:
    """The slice size ``block`` runs with, or None when it runs diffusers' own forward."""
    registry = getattr(block, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return None if hook is None else hook.max_tokens


COMPILE_SLICE = 4
"""Tokens per slice of :func:`lean_kernel_compile`'s meta forward (of eight tokens: two slices, as a real run has)."""


def lean_kernel_compile(config: dict, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """The compile, running nothing, of the one-pass kernels (``pointwise``) that lean forwards of the blocks of a
    Wan DiT with ``config``, computing in ``dtype``, launch on CUDA ``device``: built here, returned to be run later
    (in the background: ``core.background``).

    On a machine that has never compiled them (Triton keeps them on disk after), the first denoising step of a 14B
    model spent 1.9 s compiling (H200, 480p81, 6 GiB cap: 7.79 s against 5.82 s for the second step). The kernels
    specialise on their operands' dtypes and strides, not on the token count (``pointwise_kernels``), so one block's
    lean forward over eight tokens in two slices, on meta tensors, asks for every variant a real sequence of any
    length will: the self-attention's norm, modulation, rotary embedding and gated residual into slices of
    whole-sequence tensors, the feed-forward's in place; and once more with one modulation per token (Wan2.2
    TI2V's). The weightless one-block model is built here, in the caller's thread: building a model under the meta
    device touches process-wide state (``torch.device``'s context sets the default device) that another thread
    must not see change under it; the returned compile only runs a forward under thread-local modes."""
    from diffusers import WanTransformer3DModel

    from .pointwise import compiling_only

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    meta = torch.device("meta")
    with meta:
        one_layer = WanTransformer3DModel.from_config({**config, "num_layers": 1}).eval()
    inner = one_layer.config.num_attention_heads * one_layer.config.attention_head_dim
    p_t, p_h, p_w = one_layer.config.patch_size
    latents = torch.empty((1, one_layer.config.in_channels, 2 * p_t, 2 * p_h, 2 * p_w), device=meta)
    rotary = one_layer.rope(latents)  # float32, as diffusers keeps the rotary table (`_keep_in_fp32_modules`)
    tokens = rotary[0].shape[1]
    block = nn.Module.to(one_layer.blocks[0], dtype)
    apply_lean_blocks([block], COMPILE_SLICE)
    x = torch.empty((1, tokens, inner), dtype=dtype, device=meta)
    image_tokens = 257 if block.attn2.add_k_proj is not None else 0  # CLIP's, ahead of the text's 512
    context = torch.empty((1, 512 + image_tokens, inner), dtype=dtype, device=meta)
    tembs = (torch.empty((1, 6, inner), dtype=dtype, device=meta),
             torch.empty((1, tokens, 6, inner), dtype=dtype, device=meta))

    def compile_kernels() -> None:
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), on_device, compiling_only():
            for temb in tembs:
                block(x, context, temb, rotary)

    return compile_kernels
