import math

import pytest
import torch

from pp_plugin.baselines import (
    calibration_mean_square,
    flap_decisions,
    magnitude_scores,
    probe_snapshot_scores,
    taylor_scores,
    uniform_decisions,
    wanda_sp_scores,
)
from pp_plugin.comparison import summarise_row
from pp_plugin.evaluation import MethodResult
from pp_plugin.flops import dense_model_flops
from pp_plugin.importance import column_fourth_power_norm, pp_head_scores
from pp_plugin.methods import METHODS, Calibration, StaticMethod, create_method
from pp_plugin.pruner import ProbePruner, ProbePruningConfig


@pytest.fixture
def calibrated(tiny_llama, token_ids):
    model = tiny_llama(9, 3)
    pruner = ProbePruner(model, ProbePruningConfig(pruning_ratio=0.4, skip_layers=[0], round_to=8))
    windows = token_ids(6, 16)
    history = pruner.calibrate(windows, batch_size=3)
    return model, pruner, history, windows


def test_calibration_mean_square_weights_positions(calibrated):
    _, _, history, _ = calibrated
    channel = history.mlp[1]
    expected = channel.squared_mean.mean(dim=0)  # every position saw the same number of samples
    torch.testing.assert_close(calibration_mean_square(channel), expected)


def test_wanda_sp_scores_match_definition(calibrated):
    _, pruner, history, _ = calibrated
    scores = wanda_sp_scores(pruner, history)[2]
    layer = pruner.groups[2].layer
    statistic = calibration_mean_square(history.mlp[2])
    weight = layer.mlp.down_proj.weight.detach()
    torch.testing.assert_close(scores.channels, weight.abs().sum(dim=0) * statistic.sqrt())

    attention = calibration_mean_square(history.attention[2])
    o_weight = layer.self_attn.o_proj.weight.detach()
    per_channel = o_weight.abs().sum(dim=0) * attention.sqrt()
    torch.testing.assert_close(scores.heads, per_channel.view(9, 8).sum(dim=1))


def test_probe_snapshot_uses_history_only(calibrated):
    _, pruner, history, _ = calibrated
    scores = probe_snapshot_scores(pruner, history)[1]
    layer = pruner.groups[1].layer
    expected = pp_head_scores(
        history.attention[1].squared_mean.sum(dim=0),
        column_fourth_power_norm(layer.self_attn.o_proj.weight.detach()),
        pruner.groups[1].attention.o_cols,
    )
    torch.testing.assert_close(scores.heads, expected)


def test_uniform_decisions_keep_top_scores(calibrated):
    _, pruner, history, _ = calibrated
    scores = wanda_sp_scores(pruner, history)
    decisions = uniform_decisions(pruner, scores)
    for index, decision in decisions.items():
        assert decision.heads.numel() == pruner.settings.kept_heads
        assert decision.channels.numel() == pruner.settings.kept_channels
        threshold = scores[index].channels[decision.channels].min()
        dropped = [c for c in range(96) if c not in decision.channels.tolist()]
        assert bool((scores[index].channels[dropped] <= threshold).all())


def test_flap_meets_budget_and_compensates(calibrated):
    _, pruner, history, _ = calibrated
    decisions, compensation = flap_decisions(pruner, history)
    head_weight = 2 * 8 * (1 + 3 / 9) / 3
    uniform = len(pruner.pruned_layers) * ((9 - pruner.settings.kept_heads) * head_weight
                                           + 96 - pruner.settings.kept_channels)
    removed = sum((9 - d.heads.numel()) * head_weight + 96 - d.channels.numel() for d in decisions.values())
    assert removed >= uniform - 8  # rounding kept MLP widths up to 8 gives back at most 7 channels a layer
    assert removed <= uniform + head_weight + 8 * len(decisions)

    for index, decision in decisions.items():
        assert decision.heads.numel() >= 1
        assert decision.channels.numel() % 8 == 0
        down = pruner.groups[index].layer.mlp.down_proj.weight.detach()
        pruned = [c for c in range(96) if c not in decision.channels.tolist()]
        expected = down[:, pruned].double() @ history.mlp[index].channel_mean[pruned]
        torch.testing.assert_close(compensation[index][1], expected.float())


def test_group_importances_cover_every_unit(calibrated):
    model, pruner, _, windows = calibrated
    for scores in (magnitude_scores(pruner), taylor_scores(pruner, windows, 3, max_batches=1)):
        assert set(scores) == set(pruner.pruned_layers)
        for layer_scores in scores.values():
            assert layer_scores.heads.shape == (9,)
            assert layer_scores.channels.shape == (96,)
            assert bool(torch.isfinite(layer_scores.channels).all())
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("name", sorted(n for n, (_, cls) in METHODS.items() if issubclass(cls, StaticMethod)))
def test_static_methods_shrink_a_copy(tiny_llama, token_ids, name):
    model = tiny_llama(9, 3)
    dense_parameters = sum(p.numel() for p in model.parameters())
    method = create_method({"name": name, "pruning_ratio": 0.4, "skip_layers": [0], "round_to": 8})
    method.prepare(model, Calibration(token_ids(6, 16), 3))

    assert sum(p.numel() for p in model.parameters()) == dense_parameters
    assert sum(p.numel() for p in method.pruned_model.parameters()) < dense_parameters
    assert method.batch_flops(model, 2, 16) < dense_model_flops(model.config, 2, 16)
    logits = method.forward(model, token_ids(2, 16))
    assert logits.shape == (2, 16, 128)
    assert bool(torch.isfinite(logits).all())


def test_comparison_row_prr_and_paired_interval():
    dense = MethodResult("dense", 0.0, perplexity=10.0, latency_ms=100, latency_ratio=1.0, flops_ratio=1.0,
                         tokens=30, batch_perplexities=[9.0, 10.0, 11.0])
    pruned = MethodResult("probe", 0.4, perplexity=12.0, latency_ms=80, latency_ratio=0.8, flops_ratio=0.7,
                          tokens=30, batch_perplexities=[10.8, 12.0, 13.2])
    row = summarise_row(pruned, dense)
    assert row.perplexity_increase == pytest.approx(2.0)
    assert row.prr == pytest.approx(2.0 / 0.2)
    assert row.ratio_to_dense_ci95 == pytest.approx([1.2, 1.2])
    low, high = row.perplexity_ci95
    assert low < 12.0 < high

    slower = MethodResult("probe", 0.4, perplexity=12.0, latency_ratio=1.05, tokens=30, batch_perplexities=[12.0] * 3)
    assert summarise_row(slower, dense).prr is None


def test_comparison_row_of_failed_method():
    dense = MethodResult("dense", 0.0, perplexity=10.0, latency_ratio=1.0, tokens=30, batch_perplexities=[10.0] * 3)
    failed = MethodResult("flap", 0.4, error="RuntimeError: boom")
    row = summarise_row(failed, dense)
    assert row.error == "RuntimeError: boom"
    assert row.perplexity is None
    assert row.prr is None


def test_t_quantile_table():
    from pp_plugin.comparison import t_quantile_95

    assert t_quantile_95(1) == 12.706
    assert t_quantile_95(7) == 2.365
    assert t_quantile_95(11) == 2.228  # degrees of freedom rounded down: a wider interval
    assert t_quantile_95(500) == 1.980


def test_magnitude_keeps_large_weight_channels(tiny_llama, token_ids):
    model = tiny_llama(4, 4)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 5] *= 100
        mlp.gate_proj.weight[7] *= 0.0
        mlp.up_proj.weight[7] *= 0.0
        mlp.down_proj.weight[:, 7] *= 0.0
    pruner = ProbePruner(model, ProbePruningConfig(pruning_ratio=0.4, skip_layers=[0], round_to=8))
    decision = uniform_decisions(pruner, magnitude_scores(pruner))[1]
    assert 5 in decision.channels.tolist()
    assert 7 not in decision.channels.tolist()
