"""Per-batch pruned forward of a LLaMA-style decoder layer.

For each pruned layer and each batch, :class:`PrunedLayerRuntime` runs the
four stages of Probe Pruning, first for the attention sub-block and then for
the MLP sub-block. It selects a probe by residual importance and runs the probe
through the sub-block at full width. It fuses the probe's statistic with
calibration history into PP scores, then runs the sub-block on the gathered
kept weights only.

With a KV cache the kept heads are decided at prefill and reused for every
decode step of the sequence, because the cache holds only the kept k/v heads.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flops import attention_block_flops, linear_flops, mlp_block_flops
from .graph import LayerGroups
from .history import ChannelHistory, HistoryConfig
from .importance import (
    column_fourth_power_norm,
    fuse_probe_with_history,
    pp_channel_scores,
    pp_head_scores,
)
from .probe import Probe, ProbeConfig, full_batch_probe, select_probe


@dataclass
class LayerDecision:
    """Kept heads, key/value heads and MLP channels of one layer, ascending."""

    heads: torch.Tensor
    kv_heads: torch.Tensor
    channels: torch.Tensor


@dataclass
class RuntimeCounters:
    """FLOPs, wall time and kept widths of the pruned layers since the last reset.

    The ``kept_*`` lists get one entry per pruned layer and prefill forward.

    ``dense_flops`` is what the same layers would cost at full width, so the
    model's pruned FLOPs are its dense FLOPs minus ``dense_flops`` plus
    ``kept_flops`` and ``probe_flops``.
    """

    dense_flops: int = 0
    kept_flops: int = 0
    probe_flops: int = 0
    probe_seconds: float = 0.0
    kept_heads: list = field(default_factory=list)
    kept_kv_heads: list = field(default_factory=list)
    kept_channels: list = field(default_factory=list)

    def reset(self) -> None:
        """Zero every counter."""
        self.__init__()


@dataclass
class SubBlockSettings:
    """Kept counts and scoring settings shared by the pruned layers."""

    probe: ProbeConfig
    full_batch: bool
    history: HistoryConfig
    kept_heads: int
    kept_channels: int
    prune_attention: bool
    prune_mlp: bool


def _positions_like(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    return position_ids[:, -length:].expand(batch, length)


def _masked_position_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``[P, C]`` mean over real samples of ``[S, P, C]`` values, and ``[P]`` validity."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    counts = weights.sum(dim=0)
    mean = (values * weights).sum(dim=0) / counts.clamp(min=1)
    return mean, counts.squeeze(-1) > 0


def _causal_probe_mask(positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Return the ``[S, 1, P, P]`` boolean mask of causal attention among probe tokens.

    Query i may attend to key j when j is real and its absolute position is not
    after i's. The diagonal is always allowed, so a padded query row still has
    one key and yields no NaN; its output is masked out of every statistic.
    """
    allowed = (positions.unsqueeze(1) <= positions.unsqueeze(2)) & real.unsqueeze(1)
    allowed |= torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
    return allowed.unsqueeze(1)


class PrunedLayerRuntime:
    """Replaces one decoder layer's forward with the per-batch pruned forward.

    Weights are gathered with ``index_select``, which on CPU (torch 2.13) is
    several times faster than advanced indexing for column gathers.
    """

    def __init__(
        self,
        groups: LayerGroups,
        settings: SubBlockSettings,
        attention_history: ChannelHistory | None,
        mlp_history: ChannelHistory | None,
        counters: RuntimeCounters,
        padding_mask_source,
    ):
        self.groups = groups
        self.layer = groups.layer
        self.settings = settings
        self.attention_history = attention_history
        self.mlp_history = mlp_history
        self.counters = counters
        self.padding_mask_source = padding_mask_source
        self.decision: LayerDecision | None = None
        #: When set, every batch uses this decision and no probe runs (static pruning).
        self.fixed_decision: LayerDecision | None = None
        attention = self.layer.self_attn
        self.rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.o_proj_norm = column_fourth_power_norm(attention.o_proj.weight.detach())
        self.down_proj_norm = column_fourth_power_norm(self.layer.mlp.down_proj.weight.detach())

    # -- attaching ---------------------------------------------------------

    def attach(self) -> None:
        """Install the pruned forward as an instance attribute of the layer."""
        self.layer.forward = self.forward

    def detach(self) -> None:
        """Remove the pruned forward, so the class's dense forward runs again."""
        if "forward" in vars(self.layer):
            del self.layer.forward

    # -- the layer ---------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        cache_position: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        padding_mask = self.padding_mask_source(batch, length, hidden_states.device)
        if position_ids is None:
            start = 0 if cache_position is None else int(cache_position[0])
            position_ids = torch.arange(start, start + length, device=hidden_states.device).unsqueeze(0)
        positions = _positions_like(position_ids, batch, length)
        prefill = cache_position is None or int(cache_position[0]) == 0 or self.decision is None
        if self.fixed_decision is not None:
            self.decision = self.fixed_decision
            prefill = False

        residual = hidden_states
        normed = self.layer.input_layernorm(hidden_states)
        attention_output = self._attention(
            normed, residual, padding_mask, positions, attention_mask, position_embeddings,
            past_key_values, cache_position, prefill,
        )
        hidden_states = residual + attention_output

        residual = hidden_states
        normed = self.layer.post_attention_layernorm(hidden_states)
        hidden_states = residual + self._mlp(normed, residual, padding_mask, positions, prefill)
        return hidden_states

    # -- attention ---------------------------------------------------------

    def _select(self, residual: torch.Tensor, padding_mask: torch.Tensor) -> Probe:
        if self.settings.full_batch:
            return full_batch_probe(padding_mask)
        return select_probe(residual, padding_mask, self.settings.probe)

    def _fused_statistic(
        self,
        probe_output: torch.Tensor,
        probe: Probe,
        positions: torch.Tensor,
        history: ChannelHistory | None,
    ) -> torch.Tensor:
        probe_statistic, valid = _masked_position_mean(probe_output.float().square(), probe.mask)
        history_at_probe = None
        if history is not None and self.settings.history.enabled:
            history_at_probe, _ = _masked_position_mean(history.at_positions(probe.take(positions)), probe.mask)
        return fuse_probe_with_history(probe_statistic, history_at_probe, valid)

    def _probe_attention(
        self,
        normed: torch.Tensor,
        probe: Probe,
        positions: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Return the ``[S, P, H * head_dim]`` o_proj input of the probe at full width."""
        attention = self.layer.self_attn
        layout = self.groups.attention
        tokens = probe.take(normed)
        samples, length, _ = tokens.shape
        query = attention.q_proj(tokens).view(samples, length, layout.num_heads, layout.head_dim).transpose(1, 2)
        key = attention.k_proj(tokens).view(samples, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
        value = attention.v_proj(tokens).view(samples, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self.rotary(query, key, probe.take(cos), probe.take(sin))
        key = key.index_select(1, layout.kv_of_head.to(key.device))
        value = value.index_select(1, layout.kv_of_head.to(value.device))
        mask = _causal_probe_mask(probe.take(positions), probe.mask)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attention.scaling)

        hidden = normed.shape[-1]
        self.counters.probe_flops += attention_block_flops(
            samples, length, length, hidden, layout.num_heads, layout.num_kv_heads, layout.head_dim
        ) - linear_flops(samples * length, layout.num_heads * layout.head_dim, hidden)
        return context.transpose(1, 2).reshape(samples, length, layout.num_heads * layout.head_dim)

    def _decide_heads(
        self,
        normed: torch.Tensor,
        residual: torch.Tensor,
        padding_mask: torch.Tensor,
        positions: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.groups.attention
        if not self.settings.prune_attention or self.settings.kept_heads >= layout.num_heads:
            heads = torch.arange(layout.num_heads, device=normed.device)
        else:
            started = time.perf_counter()
            probe = self._select(residual, padding_mask)
            context = self._probe_attention(normed, probe, positions, position_embeddings)
            statistic = self._fused_statistic(context, probe, positions, self.attention_history)
            scores = pp_head_scores(statistic, self.o_proj_norm, layout.o_cols)
            heads = torch.topk(scores, self.settings.kept_heads, sorted=False).indices.sort().values
            self.counters.probe_seconds += time.perf_counter() - started
        kv_heads = torch.unique(layout.kv_of_head.to(heads.device)[heads])
        return heads, kv_heads

    def _attention(
        self,
        normed: torch.Tensor,
        residual: torch.Tensor,
        padding_mask: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values,
        cache_position: torch.Tensor | None,
        prefill: bool,
    ) -> torch.Tensor:
        attention = self.layer.self_attn
        layout = self.groups.attention
        batch, length, hidden = normed.shape
        if prefill:
            heads, kv_heads = self._decide_heads(normed, residual, padding_mask, positions, position_embeddings)
            self.decision = LayerDecision(heads=heads, kv_heads=kv_heads, channels=torch.empty(0))
        heads, kv_heads = self.decision.heads, self.decision.kv_heads

        q_rows = layout.q_rows.to(heads.device)[heads].flatten()
        kv_rows = layout.kv_rows.to(heads.device)[kv_heads].flatten()
        o_cols = layout.o_cols.to(heads.device)[heads].flatten()
        query = F.linear(normed, attention.q_proj.weight.index_select(0, q_rows), _rows(attention.q_proj.bias, q_rows))
        key = F.linear(normed, attention.k_proj.weight.index_select(0, kv_rows), _rows(attention.k_proj.bias, kv_rows))
        value = F.linear(normed, attention.v_proj.weight.index_select(0, kv_rows), _rows(attention.v_proj.bias, kv_rows))
        num_heads, num_kv = heads.numel(), kv_heads.numel()
        query = query.view(batch, length, num_heads, layout.head_dim).transpose(1, 2)
        key = key.view(batch, length, num_kv, layout.head_dim).transpose(1, 2)
        value = value.view(batch, length, num_kv, layout.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self.rotary(query, key, cos, sin)
        if past_key_values is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            key, value = past_key_values.update(key, value, attention.layer_idx, cache_kwargs)
        kv_index = torch.searchsorted(kv_heads, layout.kv_of_head.to(heads.device)[heads])
        key = key.index_select(1, kv_index)
        value = value.index_select(1, kv_index)

        key_length = key.shape[2]
        mask, causal = _sdpa_mask(attention_mask, length, key_length, normed.device)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=causal, scale=attention.scaling
        )
        context = context.transpose(1, 2).reshape(batch, length, num_heads * layout.head_dim)
        output = F.linear(context, attention.o_proj.weight.index_select(1, o_cols), attention.o_proj.bias)

        self.counters.dense_flops += attention_block_flops(
            batch, length, key_length, hidden, layout.num_heads, layout.num_kv_heads, layout.head_dim
        )
        self.counters.kept_flops += attention_block_flops(
            batch, length, key_length, hidden, num_heads, num_kv, layout.head_dim
        )
        if prefill:
            self.counters.kept_heads.append(num_heads)
            self.counters.kept_kv_heads.append(num_kv)
            self._update_history(self.attention_history, context, o_cols, padding_mask, positions)
        return output

    # -- MLP ---------------------------------------------------------------

    def _decide_channels(
        self, normed: torch.Tensor, residual: torch.Tensor, padding_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        mlp = self.layer.mlp
        layout = self.groups.mlp
        if not self.settings.prune_mlp or self.settings.kept_channels >= layout.num_channels:
            return torch.arange(layout.num_channels, device=normed.device)
        started = time.perf_counter()
        probe = self._select(residual, padding_mask)
        tokens = probe.take(normed)
        activation = mlp.act_fn(mlp.gate_proj(tokens)) * mlp.up_proj(tokens)
        statistic = self._fused_statistic(activation, probe, positions, self.mlp_history)
        scores = pp_channel_scores(statistic, self.down_proj_norm)
        channels = torch.topk(scores, self.settings.kept_channels, sorted=False).indices.sort().values
        self.counters.probe_flops += 2 * linear_flops(tokens.shape[0] * tokens.shape[1], normed.shape[-1],
                                                      layout.num_channels)
        self.counters.probe_seconds += time.perf_counter() - started
        return channels

    def _mlp(
        self,
        normed: torch.Tensor,
        residual: torch.Tensor,
        padding_mask: torch.Tensor,
        positions: torch.Tensor,
        prefill: bool,
    ) -> torch.Tensor:
        mlp = self.layer.mlp
        layout = self.groups.mlp
        if prefill or self.decision.channels.numel() == 0:
            self.decision.channels = self._decide_channels(normed, residual, padding_mask, positions)
        channels = self.decision.channels
        device = channels.device
        gate_rows = layout.gate_rows.to(device)[channels]
        up_rows = layout.up_rows.to(device)[channels]
        down_cols = layout.down_cols.to(device)[channels]
        gate = F.linear(normed, mlp.gate_proj.weight.index_select(0, gate_rows), _rows(mlp.gate_proj.bias, gate_rows))
        up = F.linear(normed, mlp.up_proj.weight.index_select(0, up_rows), _rows(mlp.up_proj.bias, up_rows))
        activation = mlp.act_fn(gate) * up
        output = F.linear(activation, mlp.down_proj.weight.index_select(1, down_cols), mlp.down_proj.bias)

        tokens = normed.shape[0] * normed.shape[1]
        self.counters.dense_flops += mlp_block_flops(tokens, normed.shape[-1], layout.num_channels)
        self.counters.kept_flops += mlp_block_flops(tokens, normed.shape[-1], channels.numel())
        if prefill:
            self.counters.kept_channels.append(channels.numel())
            self._update_history(self.mlp_history, activation, down_cols, padding_mask, positions)
        return output

    # -- history -----------------------------------------------------------

    def _update_history(
        self,
        history: ChannelHistory | None,
        inputs: torch.Tensor,
        channels: torch.Tensor,
        padding_mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Fold the batch's kept-channel inputs into the history at their absolute positions."""
        mode = self.settings.history.update
        if history is None or mode == "none" or not self.settings.history.enabled:
            return
        with torch.no_grad():
            squared = inputs.detach().float().square()
            sums = torch.zeros(history.max_length, channels.numel(), dtype=torch.float32, device=inputs.device)
            counts = torch.zeros(history.max_length, dtype=torch.float64, device=inputs.device)
            if bool(padding_mask.all()) and bool((positions == positions[:1]).all()):
                # Common case: no padding and one position per column, so summing over
                # the batch first makes the scatter B times smaller.
                inside = positions[0] < history.max_length
                sums.index_add_(0, positions[0][inside], squared.sum(dim=0)[inside])
                counts[positions[0][inside]] += positions.shape[0]
            else:
                inside = (positions < history.max_length) & padding_mask
                flat_positions = positions[inside]
                sums.index_add_(0, flat_positions, squared[inside])
                counts.index_add_(0, flat_positions, torch.ones_like(flat_positions, dtype=torch.float64))
            history.update(channels.cpu(), sums.cpu(), counts.cpu(), mode, self.settings.history.ema_decay)


def _rows(bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.index_select(0, rows)


def _sdpa_mask(
    attention_mask: torch.Tensor | None, query_length: int, key_length: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Return the mask and ``is_causal`` flag for SDPA from the model's 4-D layer mask.

    The model passes a boolean mask (SDPA), an additive float mask (eager) or
    None when the mask is plain causal with no padding.
    """
    if attention_mask is not None:
        return attention_mask[:, :, :, :key_length], False
    if query_length == key_length:
        return None, query_length > 1
    if query_length == 1:
        return None, False
    offset = key_length - query_length
    rows = torch.arange(query_length, device=device).unsqueeze(1) + offset
    return torch.arange(key_length, device=device).unsqueeze(0) <= rows, False


def kept_count(total: int, ratio: float, round_to: int = 1) -> int:
    """Return how many of ``total`` units are kept at pruning ``ratio``.

    ``floor(ratio * total)`` units are pruned; the kept count is then raised to
    a multiple of ``round_to`` (never above ``total``), so pruning only shrinks.
    """
    kept = total - math.floor(ratio * total)
    if round_to > 1:
        kept = min(total, math.ceil(kept / round_to) * round_to)
    return max(kept, 1)
