"""Coupled attention-head and MLP-channel groups from torch-pruning's DependencyGraph.

Each decoder layer yields two groups: the attention heads, rooted at the input
channels of ``o_proj``, and the MLP intermediate channels, rooted at the input
channels of ``down_proj``. The graph finds the output rows of q/k/v and
gate/up that are coupled to those columns. This module turns the graph's items
into the index tensors that the pruning runtime gathers weights with.

Tracing a Hugging Face decoder with torch-pruning 1.6.1 needs three changes
while it runs, all undone afterwards by :func:`traceable`. The KV cache is
turned off. Attention is eager, because the SDPA path maps GQA indices wrongly.
The rotary step is replaced by identity, because its slice/cat in
``rotate_half`` makes tracing hang for some head layouts (heads = 2 x kv heads,
for example). Rotary acts within one head, so the coupling between heads is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import UnsupportedModelError

logger = logging.getLogger(__name__)

#: ``config.model_type`` values whose decoder layers have the pre-norm LLaMA
#: layout that the runtime rewrites: input_layernorm, self_attn (q/k/v/o_proj),
#: post_attention_layernorm and a gated MLP (gate/up/down_proj).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class AttentionGroup:
    """Index layout of one layer's attention heads.

    Attributes:
        num_heads: query heads (H).
        num_kv_heads: key/value heads; equal to ``num_heads`` for MHA.
        head_dim: channels per head.
        q_rows: ``[H, head_dim]`` output rows of q_proj for each query head.
        o_cols: ``[H, head_dim]`` input columns of o_proj for each query head.
        kv_rows: ``[num_kv_heads, head_dim]`` output rows of k_proj and v_proj.
        kv_of_head: ``[H]`` key/value head used by each query head.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_rows: torch.Tensor
    o_cols: torch.Tensor
    kv_rows: torch.Tensor
    kv_of_head: torch.Tensor


@dataclass(frozen=True)
class MLPGroup:
    """Index layout of one layer's MLP intermediate channels.

    Attributes:
        num_channels: intermediate size (I).
        gate_rows: ``[I]`` output rows of gate_proj for each channel.
        up_rows: ``[I]`` output rows of up_proj for each channel.
        down_cols: ``[I]`` input columns of down_proj for each channel.
    """

    num_channels: int
    gate_rows: torch.Tensor
    up_rows: torch.Tensor
    down_cols: torch.Tensor


@dataclass(frozen=True)
class LayerGroups:
    """The coupled groups of one decoder layer and the modules they index."""

    layer_index: int
    layer: nn.Module
    attention: AttentionGroup
    mlp: MLPGroup


class RMSNormPruner(tp.pruner.function.BasePruningFunc):
    """Prunes the weight of an RMSNorm, which torch-pruning 1.6.1 does not know.

    The plugin never prunes the hidden size, but the dependency graph needs a
    pruner for every layer type it meets on the residual stream.
    """

    TARGET_MODULES = ()

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = torch.ones(layer.weight.shape[0], dtype=torch.bool)
        keep[torch.as_tensor(idxs, dtype=torch.long)] = False
        layer.weight = nn.Parameter(layer.weight.data[keep])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]

    get_in_channels = get_out_channels


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder layers of a supported causal LM (``model.model.layers``).

    Raises:
        UnsupportedModelError: the model type is not one of
            :data:`SUPPORTED_MODEL_TYPES` or lacks the expected modules.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; the pruning runtime handles "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA-style decoders). Use one of those "
            "architectures, or add a layer runtime for this one."
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers at model.layers; load it with "
            "AutoModelForCausalLM so the causal-LM wrapper is present."
        )
    required = (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
    for name in required:
        try:
            layers[0].get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(
                f"decoder layer of {type(model).__name__} has no submodule {name!r}; "
                "the runtime needs the LLaMA layer layout."
            ) from None
    return layers


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Make a Hugging Face decoder traceable by torch-pruning for the block's duration.

    Switches to eager attention, turns the KV cache off and replaces the
    rotary embedding of the model's attention module by identity. Everything is
    restored on exit, also when tracing raises.
    """
    layers = decoder_layers(model)
    attention_module = sys.modules[type(layers[0].self_attn).__module__]
    original_rotary = getattr(attention_module, "apply_rotary_pos_emb", None)
    if original_rotary is None:
        raise UnsupportedModelError(
            f"{attention_module.__name__} has no apply_rotary_pos_emb to neutralise while tracing."
        )
    config = model.config
    original_attention = config._attn_implementation
    original_use_cache = config.use_cache

    def identity_rotary(query, key, *args, **kwargs):
        return query, key

    attention_module.apply_rotary_pos_emb = identity_rotary
    config._attn_implementation = "eager"
    config.use_cache = False
    try:
        yield
    finally:
        attention_module.apply_rotary_pos_emb = original_rotary
        config._attn_implementation = original_attention
        config.use_cache = original_use_cache


def dependency_graph_kwargs(model: nn.Module) -> dict:
    """Return the keyword arguments that build a dependency graph of ``model``.

    They fit both ``DependencyGraph.build_dependency`` and the tracing part of
    ``tp.pruner.BasePruner``; call either inside :func:`traceable`.
    """
    layers = decoder_layers(model)
    norm_type = type(layers[0].input_layernorm)
    device = next(model.parameters()).device
    return {
        "example_inputs": torch.ones(1, 8, dtype=torch.long, device=device),
        "output_transform": lambda output: output.logits,
        "customized_pruners": {norm_type: RMSNormPruner()},
    }


def build_dependency_graph(model: nn.Module) -> tp.DependencyGraph:
    """Trace ``model`` into a torch-pruning DependencyGraph."""
    kwargs = dependency_graph_kwargs(model)
    with traceable(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, verbose=False, **kwargs)


def _coupled_indices(group: tp.dependency.Group, module: nn.Module, handler) -> list[int]:
    """Return the indices that ``group`` prunes in ``module`` with ``handler``."""
    for item in group.items:
        if item.dep.target.module is module and item.dep.handler == handler:
            return [int(i) for i in item.idxs]
    raise UnsupportedModelError(
        f"the dependency graph does not couple {type(module).__name__} to the group rooted at "
        f"{group.items[0].dep.target.name}; the layer is not a standard attention/MLP block."
    )


def extract_layer_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[LayerGroups]:
    """Resolve each decoder layer's head and channel groups from a traced graph.

    Query rows come from the graph's index mapping onto q_proj. Under GQA the
    graph's k/v indices are coarse (a query head maps onto a whole k/v head with
    no root indices), so k/v membership is computed as ``kv = head // n_rep``
    and checked against the graph's k/v indices.
    """
    config = model.config
    result = []
    for layer_index, layer in enumerate(decoder_layers(model)):
        attention, mlp = layer.self_attn, layer.mlp
        head_dim = getattr(attention, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_heads = attention.o_proj.in_features // head_dim
        num_kv_heads = attention.k_proj.out_features // head_dim
        if num_heads % num_kv_heads != 0:
            raise UnsupportedModelError(
                f"layer {layer_index}: {num_heads} query heads are not a multiple of "
                f"{num_kv_heads} key/value heads."
            )

        group = graph.get_pruning_group(
            attention.o_proj, tp.prune_linear_in_channels, idxs=list(range(attention.o_proj.in_features))
        )
        q_rows = _coupled_indices(group, attention.q_proj, tp.prune_linear_out_channels)
        k_rows = _coupled_indices(group, attention.k_proj, tp.prune_linear_out_channels)
        v_rows = _coupled_indices(group, attention.v_proj, tp.prune_linear_out_channels)
        if len(q_rows) != num_heads * head_dim:
            raise UnsupportedModelError(
                f"layer {layer_index}: the graph couples {len(q_rows)} q_proj rows to "
                f"{num_heads * head_dim} o_proj columns."
            )
        n_rep = num_heads // num_kv_heads
        kv_of_head = torch.arange(num_heads) // n_rep
        kv_rows = torch.arange(num_kv_heads * head_dim).view(num_kv_heads, head_dim)
        for head in range(num_heads):
            span = slice(head * head_dim, (head + 1) * head_dim)
            expected = set(kv_rows[kv_of_head[head]].tolist())
            if not set(k_rows[span]) <= expected or not set(v_rows[span]) <= expected:
                raise UnsupportedModelError(
                    f"layer {layer_index}: query head {head} is coupled to k/v rows outside "
                    f"key/value head {int(kv_of_head[head])}; the head layout is not the GQA "
                    "layout head // n_rep."
                )

        mlp_group = graph.get_pruning_group(
            mlp.down_proj, tp.prune_linear_in_channels, idxs=list(range(mlp.down_proj.in_features))
        )
        gate_rows = _coupled_indices(mlp_group, mlp.gate_proj, tp.prune_linear_out_channels)
        up_rows = _coupled_indices(mlp_group, mlp.up_proj, tp.prune_linear_out_channels)

        result.append(
            LayerGroups(
                layer_index=layer_index,
                layer=layer,
                attention=AttentionGroup(
                    num_heads=num_heads,
                    num_kv_heads=num_kv_heads,
                    head_dim=head_dim,
                    q_rows=torch.tensor(q_rows).view(num_heads, head_dim),
                    o_cols=torch.arange(num_heads * head_dim).view(num_heads, head_dim),
                    kv_rows=kv_rows,
                    kv_of_head=kv_of_head,
                ),
                mlp=MLPGroup(
                    num_channels=mlp.down_proj.in_features,
                    gate_rows=torch.tensor(gate_rows),
                    up_rows=torch.tensor(up_rows),
                    down_cols=torch.arange(mlp.down_proj.in_features),
                ),
            )
        )
    logger.debug("extracted head and channel groups of %d decoder layers", len(result))
    return result
