import copy

import pytest
import torch

from conftest import HEAD_LAYOUTS
from pp_plugin.history import ChannelHistory
from pp_plugin.probe import ProbeConfig, select_probe
from pp_plugin.pruner import ProbePruner, ProbePruningConfig
from pp_plugin.runtime import _causal_probe_mask, kept_count


def _pruner(model, ratio, **overrides):
    config = ProbePruningConfig(
        pruning_ratio=ratio, skip_layers=[0], round_to=8, probe=ProbeConfig(sample_ratio=0.5), **overrides
    )
    return ProbePruner(model, config)


def _calibrated(model, ratio, token_ids, **overrides):
    pruner = _pruner(model, ratio, **overrides)
    pruner.calibrate(token_ids(6, 16), batch_size=3)
    return pruner


def _masked_dense(model, pruner):
    """Return a copy of the dense model with pruned heads' and channels' weights zeroed."""
    masked = copy.deepcopy(model)
    for runtime in pruner._runtimes:
        index = runtime.groups.layer_index
        layer = masked.model.layers[index]
        attention, mlp = runtime.groups.attention, runtime.groups.mlp
        decision = runtime.decision
        pruned_heads = [h for h in range(attention.num_heads) if h not in decision.heads.tolist()]
        pruned_channels = [c for c in range(mlp.num_channels) if c not in decision.channels.tolist()]
        with torch.no_grad():
            layer.self_attn.o_proj.weight[:, attention.o_cols[pruned_heads].flatten()] = 0
            layer.mlp.down_proj.weight[:, mlp.down_cols[pruned_channels]] = 0
    return masked


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_ratio_zero_equals_dense(tiny_llama, token_ids, heads, kv_heads):
    model = tiny_llama(heads, kv_heads)
    ids = token_ids(4, 12)
    with torch.no_grad():
        dense = model(ids).logits
        pruner = _calibrated(model, 0.0, token_ids)
        with pruner.attached():
            pruned = model(ids).logits
    torch.testing.assert_close(pruned, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_pruned_forward_equals_masked_dense(tiny_llama, token_ids, heads, kv_heads):
    model = tiny_llama(heads, kv_heads)
    ids = token_ids(4, 12)
    pruner = _calibrated(model, 0.5, token_ids)
    with torch.no_grad(), pruner.attached():
        pruned = model(ids).logits
    assert all(r.decision.heads.numel() < heads for r in pruner._runtimes)

    with torch.no_grad():
        masked = _masked_dense(model, pruner)(ids).logits
        dense = model(ids).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4)
    assert (pruned - dense).abs().max() > 1e-2


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 1)])
def test_gqa_drops_kv_heads_without_queries(tiny_llama, token_ids, heads, kv_heads):
    model = tiny_llama(heads, kv_heads)
    pruner = _calibrated(model, 0.5, token_ids)
    with torch.no_grad(), pruner.attached():
        model(token_ids(4, 12))
    layout = pruner.groups[1].attention
    for runtime in pruner._runtimes:
        decision = runtime.decision
        assert torch.equal(decision.kv_heads, torch.unique(layout.kv_of_head[decision.heads]))


def test_padding_keeps_decisions_and_logits(tiny_llama, token_ids):
    model = tiny_llama(9, 3)
    ids = token_ids(4, 12)
    padded = torch.cat([ids, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(4, 12), torch.zeros(4, 5)], dim=1).long()
    pruner = _calibrated(model, 0.5, token_ids)

    with torch.no_grad(), pruner.attached():
        plain_logits = model(ids).logits
        plain = [(r.decision.heads.clone(), r.decision.channels.clone()) for r in pruner._runtimes]
        pruner.reset_history()
        padded_logits = model(padded, attention_mask=mask).logits
        with_padding = [(r.decision.heads, r.decision.channels) for r in pruner._runtimes]

    for (heads, channels), (padded_heads, padded_channels) in zip(plain, with_padding):
        assert torch.equal(heads, padded_heads)
        assert torch.equal(channels, padded_channels)
    torch.testing.assert_close(padded_logits[:, :12], plain_logits, rtol=1e-4, atol=1e-4)


def test_detach_restores_dense_forward(tiny_llama, token_ids):
    model = tiny_llama(8, 4)
    ids = token_ids(2, 10)
    with torch.no_grad():
        dense = model(ids).logits
        pruner = _calibrated(model, 0.5, token_ids)
        with pruner.attached():
            model(ids)
        assert not pruner.is_attached
        assert all("forward" not in vars(layer) for layer in model.model.layers)
        assert torch.equal(model(ids).logits, dense)


def test_causal_probe_mask_uses_true_positions():
    positions = torch.tensor([[0, 3, 5]])
    real = torch.tensor([[True, False, True]])
    mask = _causal_probe_mask(positions, real)[0, 0]
    expected = torch.tensor([
        [True, False, False],
        [True, True, False],
        [True, False, True],
    ])
    assert torch.equal(mask, expected)


def test_probe_attention_equals_attention_on_probe_tokens(tiny_llama, token_ids):
    model = tiny_llama(8, 2, layers=2)
    pruner = _pruner(model, 0.3, history={"enabled": False})
    pruner.attach()
    runtime = pruner._runtimes[0]
    layer = model.model.layers[1]
    hidden = torch.randn(3, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10).unsqueeze(0).expand(3, 10)
    embeddings = model.model.rotary_emb(hidden, positions[:1])
    normed = layer.input_layernorm(hidden)
    probe = select_probe(hidden, torch.ones(3, 10, dtype=torch.bool), ProbeConfig(sample_ratio=0.4, token_ratio=0.5))

    with torch.no_grad():
        context = runtime._probe_attention(normed, probe, positions, embeddings)
        probe_output = layer.self_attn.o_proj(context)
        tokens = probe.take(normed)
        sub_embeddings = model.model.rotary_emb(tokens, probe.positions.unsqueeze(0))
        reference, _ = layer.self_attn(tokens, sub_embeddings, attention_mask=None)
    pruner.detach()
    # Without a mask HF attention is causal over the probe tokens, which are in position order.
    torch.testing.assert_close(probe_output, reference, rtol=1e-4, atol=1e-4)


def test_history_update_touches_kept_channels_only(tiny_llama, token_ids):
    model = tiny_llama(4, 4)
    pruner = _calibrated(model, 0.5, token_ids)
    before = pruner.history.mlp[1].squared_mean.clone()
    with torch.no_grad(), pruner.attached():
        model(token_ids(2, 16))
    after = pruner.history.mlp[1].squared_mean
    kept = pruner._runtimes[0].decision.channels
    pruned = torch.tensor([c for c in range(96) if c not in kept.tolist()])

    assert torch.equal(after[:, pruned], before[:, pruned])
    assert not torch.equal(after[:, kept], before[:, kept])
    assert torch.equal(pruner.calibrated_history.mlp[1].squared_mean, before)


def test_channel_history_ema_and_running_mean():
    def fresh():
        return ChannelHistory(
            squared_mean=torch.ones(3, 2), count=torch.full((3,), 4.0, dtype=torch.float64),
            channel_mean=torch.zeros(2, dtype=torch.float64), channel_var=torch.zeros(2, dtype=torch.float64),
        )

    sums = torch.tensor([[6.0], [0.0], [12.0]])
    counts = torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64)
    ema = fresh()
    ema.update(torch.tensor([1]), sums, counts, "ema", 0.9)
    assert torch.allclose(ema.squared_mean[:, 1], torch.tensor([0.9 + 0.1 * 3, 1.0, 0.9 + 0.1 * 4]))
    assert torch.equal(ema.squared_mean[:, 0], torch.ones(3))

    running = fresh()
    running.update(torch.tensor([1]), sums, counts, "running-mean", 0.9)
    assert torch.allclose(running.squared_mean[:, 1], torch.tensor([(4 + 6) / 6, 1.0, (4 + 12) / 7]))
    assert running.count.tolist() == [6.0, 4.0, 7.0]


def test_generate_with_cache_decides_at_prefill(tiny_llama, token_ids):
    model = tiny_llama(9, 3)
    pruner = _calibrated(model, 0.5, token_ids)
    ids = token_ids(2, 6)
    with torch.no_grad(), pruner.attached():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
    assert output.shape == (2, 10)
    assert len(pruner.counters.kept_heads) == len(pruner.pruned_layers)


def test_flop_counters(tiny_llama, token_ids):
    model = tiny_llama(4, 4)
    pruner = _calibrated(model, 0.5, token_ids)
    with torch.no_grad(), pruner.attached():
        model(token_ids(2, 16))
    counters = pruner.counters
    assert 0 < counters.kept_flops < counters.dense_flops
    assert counters.probe_flops > 0


@pytest.mark.parametrize(
    "total,ratio,round_to,expected",
    [(9, 0.44, 1, 6), (1536, 0.44, 64, 896), (1536, 0.0, 64, 1536), (96, 0.53, 8, 48), (4, 0.9, 1, 1)],
)
def test_kept_count(total, ratio, round_to, expected):
    assert kept_count(total, ratio, round_to) == expected
