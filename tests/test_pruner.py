import pytest
import torch
from pydantic import ValidationError

from pp_plugin.errors import CacheError, PPPluginError, RecipeError
from pp_plugin.history import CalibrationHistory, history_cache_path, load_or_collect_history
from pp_plugin.methods import METHODS, create_method
from pp_plugin.pruner import ProbePruner, ProbePruningConfig, layer_pruning_ratio


def test_layer_ratio_raised_for_skipped_layers():
    assert layer_pruning_ratio(0.4, 32, 3) == 0.44
    assert layer_pruning_ratio(0.4, 30, 3) == 0.44
    assert layer_pruning_ratio(0.2, 30, 0) == 0.2


def test_layer_ratio_rejects_impossible_settings():
    with pytest.raises(PPPluginError, match="all 4 decoder layers are in skip_layers"):
        layer_pruning_ratio(0.4, 4, 4)
    with pytest.raises(PPPluginError, match="per-layer ratio of 1.0"):
        layer_pruning_ratio(0.5, 2, 1)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_config_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValidationError, match="pruning_ratio"):
        ProbePruningConfig(pruning_ratio=ratio)


def test_skip_layers_must_exist(tiny_llama):
    with pytest.raises(PPPluginError, match=r"skip_layers \[7\] do not exist: the model has 4 decoder layers"):
        ProbePruner(tiny_llama(4, 4), ProbePruningConfig(skip_layers=[0, 7]))


def test_attach_without_history_is_rejected(tiny_llama):
    pruner = ProbePruner(tiny_llama(4, 4), ProbePruningConfig(skip_layers=[0]))
    with pytest.raises(PPPluginError, match="call calibrate"):
        pruner.attach()
    assert not pruner.is_attached


def test_calibrate_while_attached_is_rejected(tiny_llama, token_ids):
    pruner = ProbePruner(tiny_llama(4, 4), ProbePruningConfig(skip_layers=[0], history={"enabled": False}))
    with pruner.attached():
        with pytest.raises(PPPluginError, match="detach"):
            pruner.calibrate(token_ids(2, 8), batch_size=2)


def test_static_step_is_rejected(tiny_llama):
    pruner = ProbePruner(tiny_llama(4, 4), ProbePruningConfig(skip_layers=[0]))
    with pytest.raises(PPPluginError, match="per batch"):
        pruner.step()


def test_pruner_is_a_torch_pruning_pruner(tiny_llama):
    import torch_pruning as tp

    pruner = ProbePruner(tiny_llama(4, 2), ProbePruningConfig(skip_layers=[0]))
    assert isinstance(pruner, tp.pruner.BasePruner)
    assert isinstance(pruner.DG, tp.DependencyGraph)
    assert pruner.pruned_layers == [1, 2, 3]


def test_random_decisions_are_seeded(tiny_llama):
    pruner = ProbePruner(tiny_llama(9, 3), ProbePruningConfig(skip_layers=[0], round_to=8))
    first, second = pruner.random_decisions(3), pruner.random_decisions(3)
    other = pruner.random_decisions(4)
    assert all(torch.equal(first[i].heads, second[i].heads) for i in first)
    assert any(not torch.equal(first[i].channels, other[i].channels) for i in first)
    assert all(d.heads.numel() == pruner.settings.kept_heads for d in first.values())


def test_history_cache_round_trip(tiny_llama, token_ids, tmp_path, monkeypatch):
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path))
    model = tiny_llama(4, 4)
    pruner = ProbePruner(model, ProbePruningConfig(skip_layers=[0]))
    windows = token_ids(4, 8)
    key = {"model": "tiny", "windows": 4}

    collected = load_or_collect_history(model, pruner.groups, windows, 2, key)
    path = history_cache_path({**key, "format_version": 1})
    assert path.exists()
    loaded = load_or_collect_history(model, pruner.groups, windows, 2, key)
    assert torch.equal(loaded.mlp[2].squared_mean, collected.mlp[2].squared_mean)
    assert torch.equal(loaded.attention[1].channel_var, collected.attention[1].channel_var)
    assert loaded.attention[0].squared_mean.shape == (8, 32)


def test_history_matches_direct_statistics(tiny_llama, token_ids):
    model = tiny_llama(4, 4, layers=2)
    pruner = ProbePruner(model, ProbePruningConfig(skip_layers=[0]))
    windows = token_ids(4, 8)
    captured = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(windows)
    handle.remove()
    history = pruner.calibrate(windows, batch_size=3)

    inputs = captured[0].double()
    expected = inputs.square().mean(dim=0).float()
    torch.testing.assert_close(history.mlp[1].squared_mean, expected)
    torch.testing.assert_close(history.mlp[1].channel_var, inputs.flatten(0, 1).var(dim=0, unbiased=False))


def test_corrupt_history_cache_names_file(tmp_path):
    path = tmp_path / "history.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CacheError, match="delete the file") as error:
        CalibrationHistory.load(path)
    assert str(path) in str(error.value)
    assert path.read_bytes() == b"not a torch file"


def test_history_cache_for_other_settings_is_rejected(tmp_path):
    path = tmp_path / "history.pt"
    CalibrationHistory(metadata={"windows": 4}).save(path)
    with pytest.raises(CacheError, match="other settings"):
        CalibrationHistory.load(path, expected_metadata={"windows": 8})


def test_unknown_method_lists_valid_names():
    with pytest.raises(RecipeError, match="unknown method name 'wanda'") as error:
        create_method({"name": "wanda"})
    for name in METHODS:
        assert name in str(error.value)
