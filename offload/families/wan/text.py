"""Prompt -> UMT5 embeddings, exactly as diffusers' ``WanPipeline`` computes them.

Same cleaning (ftfy when installed, HTML unescape, whitespace), same tokenisation (padded to 512 tokens), and the
padding positions zeroed after the encoder - Wan was trained on zero padding, not on the encoder's output there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512
"""Wan2.1's text context length."""


def clean_prompt(text: str) -> str:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


@torch.no_grad()
def encode_prompt(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    prompt: str,
    compute_device: torch.device,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> torch.Tensor:
    """Return the ``[1, max_sequence_length, dim]`` embedding of one prompt, on ``compute_device``.

    A prompt longer than the encoder's context is truncated (as diffusers does) with a warning that says so.
    """
    cleaned = clean_prompt(prompt)
    full_length = len(tokenizer(cleaned, add_special_tokens=True).input_ids)
    if full_length > max_sequence_length:
        logger.warning(
            "prompt is %d tokens; the text encoder reads the first %d and ignores the rest",
            full_length,
            max_sequence_length,
        )
    inputs = tokenizer(
        [cleaned],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs.input_ids.to(compute_device), inputs.attention_mask.to(compute_device)
    seq_len = int(mask.gt(0).sum())
    hidden = text_encoder(ids, mask).last_hidden_state
    embeds = torch.zeros_like(hidden)
    embeds[:, :seq_len] = hidden[:, :seq_len]
    return embeds


def tokenizer_from_sentencepiece(data: bytes):
    """The UMT5 tokenizer from the sentencepiece model ComfyUI stores in the text encoder's file (``spiece_model``).

    Built as transformers builds a T5 tokenizer from a ``spiece.model`` (``T5Converter``: the pieces and scores as
    a Unigram model, the model's own normaliser, ``</s>`` appended), so it tokenizes as the Diffusers folder's
    tokenizer does - and, as ``tests/test_single_files.py`` checks, as ComfyUI's ``SPieceTokenizer``
    (sentencepiece with ``add_eos``) does. No sentinel ``<extra_id_N>`` tokens are added: ComfyUI adds none.
    """
    from transformers import T5Tokenizer

    from ...weights.sentencepiece_model import UNIGRAM, read_sentencepiece_model

    model = read_sentencepiece_model(data)
    specials = [p for p, _, _ in model.pieces[:3]]
    if model.model_type != UNIGRAM or specials != ["<pad>", "</s>", "<unk>"] or model.unk_id != 2:
        raise ValueError(f"not a T5-style unigram sentencepiece model (first pieces {specials}, unk id {model.unk_id})")
    return T5Tokenizer(
        vocab=[(piece, score) for piece, score, _ in model.pieces],
        _spm_precompiled_charsmap=model.precompiled_charsmap or None,
        extra_ids=0,
    )
