"""Shared fixtures: tiny random LLaMA models in the head layouts the runtime must handle."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

#: (query heads, key/value heads): MHA and the GQA layouts 9/3 (SmolLM2), 8/4 and 4/1.
HEAD_LAYOUTS = [(4, 4), (9, 3), (8, 4), (4, 1)]


def make_tiny_llama(heads: int = 4, kv_heads: int = 4, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """Return a random LLaMA with head_dim 8, hidden size 8 * heads and 96 MLP channels."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=8 * heads,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=128,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform logits; larger weights make pruning visible.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.mul_(8)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture
def token_ids():
    generator = torch.Generator().manual_seed(1)
    return lambda batch, length: torch.randint(0, 128, (batch, length), generator=generator)
