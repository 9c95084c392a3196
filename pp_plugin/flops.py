"""Analytic FLOP counts of decoder forward passes.

A multiply-add counts as two FLOPs. Counted: every linear projection, the two
attention matrix products (scores and weighted values, over all key positions,
masked or not) and the LM head. Norms, activations, softmax and rotary
embeddings are left out; they are a small share at the sizes used here.
"""

from __future__ import annotations


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """Return the FLOPs of a linear layer applied to ``tokens`` tokens."""
    return 2 * tokens * in_features * out_features


def attention_block_flops(
    batch: int,
    query_length: int,
    key_length: int,
    hidden_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> int:
    """Return the FLOPs of q/k/v projections, attention products and o_proj."""
    tokens = batch * query_length
    projections = linear_flops(tokens, hidden_size, heads * head_dim)
    projections += 2 * linear_flops(tokens, hidden_size, kv_heads * head_dim)
    products = 4 * batch * heads * query_length * key_length * head_dim
    output = linear_flops(tokens, heads * head_dim, hidden_size)
    return projections + products + output


def mlp_block_flops(tokens: int, hidden_size: int, channels: int) -> int:
    """Return the FLOPs of gate_proj, up_proj and down_proj."""
    return 3 * linear_flops(tokens, hidden_size, channels)


def dense_layer_flops(config, batch: int, query_length: int, key_length: int) -> int:
    """Return the FLOPs of one dense decoder layer of a Hugging Face ``config``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attention = attention_block_flops(
        batch, query_length, key_length, config.hidden_size, config.num_attention_heads, kv_heads, head_dim
    )
    return attention + mlp_block_flops(batch * query_length, config.hidden_size, config.intermediate_size)


def dense_model_flops(config, batch: int, length: int) -> int:
    """Return the FLOPs of a dense forward pass over a ``[batch, length]`` batch without cache."""
    layers = config.num_hidden_layers * dense_layer_flops(config, batch, length, length)
    head = linear_flops(batch * length, config.hidden_size, config.vocab_size)
    return layers + head


def model_flops(model, batch: int, length: int) -> int:
    """Return the FLOPs of a forward pass over ``[batch, length]`` from the modules' actual widths.

    Unlike :func:`dense_model_flops` this counts a statically pruned model, whose
    layers may differ in head count and MLP width, as it is.
    """
    config = model.config
    tokens = batch * length
    total = linear_flops(tokens, config.hidden_size, config.vocab_size)
    for layer in model.model.layers:
        attention = layer.self_attn
        head_dim = attention.head_dim
        heads = attention.q_proj.out_features // head_dim
        kv_heads = attention.k_proj.out_features // head_dim
        total += attention_block_flops(batch, length, length, config.hidden_size, heads, kv_heads, head_dim)
        total += mlp_block_flops(tokens, config.hidden_size, layer.mlp.down_proj.in_features)
    return total
