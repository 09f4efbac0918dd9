"""Token-wise modules run over the sequence in chunks: bounded activation memory, the same output.

A DiT's feed-forward network is applied to every token independently, and at 81 frames it holds the largest
activations of a block: the 13,824-wide intermediate over 32,760 tokens is 0.9 GB in bf16, twice (the projection and
its GELU). Running it over slices of the sequence and writing each slice's result into one preallocated output
bounds that to a slice, and each token's arithmetic is unchanged: the same weights, the same kernels over rows.

Installed as a diffusers hook (``HookRegistry``, named :data:`HOOK_NAME`): ``apply_sequence_chunking`` is idempotent
(a second call only changes the chunk size), ``remove_sequence_chunking`` restores the module's own forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

HOOK_NAME = "video_offload.sequence_chunking"


@dataclass(frozen=True)
class ChunkingConfig:
    """How a token-wise module is chunked."""

    max_tokens: int
    """Tokens per chunk; the sequence is split into ceil(tokens / max_tokens) slices."""
    dim: int = 1
    """The sequence dimension of the module's first input and of its output."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be at least 1")


def _hook_class():
    from diffusers.hooks import ModelHook

    class SequenceChunkingHook(ModelHook):
        """Replaces a token-wise module's forward by the same forward over slices of its first input."""

        def __init__(self, config: ChunkingConfig):
            super().__init__()
            self.config = config
            self.chunked_calls = 0

        def new_forward(self, module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
            original = self.fn_ref.original_forward
            dim, size = self.config.dim, self.config.max_tokens
            tokens = hidden_states.shape[dim]
            if tokens <= size:
                return original(hidden_states, *args, **kwargs)
            self.chunked_calls += 1
            output = None
            for start in range(0, tokens, size):
                piece = original(hidden_states.narrow(dim, start, min(size, tokens - start)), *args, **kwargs)
                if output is None:
                    shape = list(piece.shape)
                    shape[dim] = tokens
                    output = piece.new_empty(shape)
                output.narrow(dim, start, piece.shape[dim]).copy_(piece)
                del piece  # free the slice's activations before the next one is computed
            return output

    return SequenceChunkingHook


def apply_sequence_chunking(module: nn.Module, config: ChunkingConfig) -> None:
    """Run ``module`` over slices of at most ``config.max_tokens`` tokens (idempotent: updates the size)."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = registry.get_hook(HOOK_NAME)
    if hook is not None:
        hook.config = config
        return
    registry.register_hook(_hook_class()(config), HOOK_NAME)


def remove_sequence_chunking(module: nn.Module) -> None:
    """Restore the module's own forward. Idempotent."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)


def chunking_of(module: nn.Module) -> ChunkingConfig | None:
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return None if hook is None else hook.config


def tokenwise_bytes_per_token(module: nn.Module) -> int:
    """A conservative estimate of the activation bytes one token costs inside ``module``: every linear layer's
    output, twice (an activation function keeps a copy), in the module's dtype."""
    outputs = sum(m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    return 2 * outputs * dtype.itemsize


CHUNK_BUDGET_ON = 256 * 2**20
"""Bytes of activations per chunk when chunking is forced on."""


def plan_chunking(mode: str, tokens: int, bytes_per_token: int, available_bytes: int | None,
                  floor: int = 1024) -> int | None:
    """Tokens per chunk for a token-wise module, or None to run it whole.

    ``on`` chunks to :data:`CHUNK_BUDGET_ON` per chunk; ``auto`` chunks only when the whole sequence's activations
    would take more than a fifth of what the device has free (unknown on a CPU: never), to a twentieth of it per chunk.
    ``auto`` never takes fewer than ``floor`` tokens per chunk (a family's measured size below which slices cost
    time); ``on`` is the forced, smallest setting.
    """
    if mode == "off" or tokens <= 0:
        return None
    if mode == "on":
        size = chunk_tokens(tokens, bytes_per_token, CHUNK_BUDGET_ON)
        return size if size < tokens else None
    if available_bytes is None or tokens * bytes_per_token <= available_bytes // 5:
        return None
    size = chunk_tokens(tokens, bytes_per_token, available_bytes // 20, floor)
    return size if size < tokens else None


def configure_chunking(modules: list[nn.Module], max_tokens: int | None) -> None:
    """Chunk every module of ``modules`` to ``max_tokens`` per slice, or run them whole when None."""
    for module in modules:
        if max_tokens is None:
            remove_sequence_chunking(module)
        else:
            apply_sequence_chunking(module, ChunkingConfig(max_tokens))


def chunk_tokens(tokens: int, bytes_per_token: int, budget_bytes: int, floor: int = 1024) -> int:
    """Tokens per chunk so one chunk's activations stay within ``budget_bytes`` (at least ``floor`` tokens, so the
    matrix products stay large enough to run at full speed), or ``tokens`` when the whole sequence fits."""
    if bytes_per_token <= 0 or tokens * bytes_per_token <= budget_bytes:
        return tokens
    per_chunk = max(floor, budget_bytes // bytes_per_token)
    chunks = -(-tokens // per_chunk)
    return -(-tokens // chunks)  # equal chunks: the last one is not a sliver
