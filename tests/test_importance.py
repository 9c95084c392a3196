import torch
import torch_pruning as tp

from pp_plugin.graph import build_dependency_graph
from pp_plugin.importance import (
    PPImportance,
    column_fourth_power_norm,
    flap_channel_scores,
    fuse_probe_with_history,
    pp_channel_scores,
    pp_head_scores,
    wanda_sp_channel_scores,
)


def _random(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_fusion_matches_formula():
    probe, history = _random(5, 7, seed=1), _random(5, 7, seed=2)
    fused = fuse_probe_with_history(probe, history)

    expected = torch.zeros(7)
    for t in range(5):
        for j in range(7):
            p = probe[t, j] / (probe[t, j] + history[t, j] + 1e-6)
            expected[j] += (1 - p) * history[t, j] + p * probe[t, j]
    torch.testing.assert_close(fused, expected)


def test_fusion_without_history_sums_probe():
    probe = _random(4, 3)
    torch.testing.assert_close(fuse_probe_with_history(probe, None), probe.sum(dim=0))


def test_fusion_skips_invalid_positions():
    probe, history = _random(4, 3, seed=3), _random(4, 3, seed=4)
    valid = torch.tensor([True, False, True, False])
    expected = fuse_probe_with_history(probe[valid], history[valid])
    torch.testing.assert_close(fuse_probe_with_history(probe, history, valid), expected)


def test_pp_channel_score_matches_definition():
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    statistic = _random(4, seed=6)
    scores = pp_channel_scores(statistic, column_fourth_power_norm(weight))
    expected = torch.stack([torch.linalg.vector_norm(statistic[j] * weight[:, j] ** 2) for j in range(4)])
    torch.testing.assert_close(scores, expected)


def test_pp_score_is_fp32_for_fp16_weights():
    weight = torch.full((4, 2), 1e-2, dtype=torch.float16)
    norm = column_fourth_power_norm(weight)
    assert norm.dtype == torch.float32
    assert bool((norm > 0).all())


def test_pp_head_score_matches_definition():
    weight = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    statistic = _random(8, seed=8)
    columns = torch.arange(8).view(2, 4)
    scores = pp_head_scores(statistic, column_fourth_power_norm(weight), columns)
    for head in range(2):
        block = statistic[columns[head]] * weight[:, columns[head]] ** 2
        torch.testing.assert_close(scores[head], torch.linalg.vector_norm(block))


def test_wanda_sp_and_flap_match_definitions():
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))
    statistic = _random(3, seed=10)
    wanda = wanda_sp_channel_scores(statistic, weight)
    flap = flap_channel_scores(statistic, weight)
    for j in range(3):
        torch.testing.assert_close(wanda[j], weight[:, j].abs().sum() * statistic[j].sqrt())
        torch.testing.assert_close(flap[j], statistic[j] * weight[:, j].pow(2).sum())


def test_pp_importance_scores_graph_group(tiny_llama):
    model = tiny_llama(4, 2, layers=1)
    graph = build_dependency_graph(model)
    down_proj = model.model.layers[0].mlp.down_proj
    statistic = _random(96, seed=11)
    importance = PPImportance({down_proj: statistic})

    group = graph.get_pruning_group(down_proj, tp.prune_linear_in_channels, idxs=list(range(96)))
    scores = importance(group)
    expected = pp_channel_scores(statistic, column_fourth_power_norm(down_proj.weight.detach())) ** 2
    torch.testing.assert_close(scores, expected)


def test_pp_importance_ignores_unknown_roots(tiny_llama):
    model = tiny_llama(4, 2, layers=1)
    graph = build_dependency_graph(model)
    o_proj = model.model.layers[0].self_attn.o_proj
    group = graph.get_pruning_group(o_proj, tp.prune_linear_in_channels, idxs=list(range(8)))
    assert PPImportance({})(group) is None
