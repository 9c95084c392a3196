"""Tests of pp_plugin.recipe: shipped recipes, defaults, overrides and error messages."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pp_plugin.errors import PPPluginError, RecipeError
from pp_plugin.history import HistoryConfig
from pp_plugin.methods import METHODS
from pp_plugin.probe import ProbeConfig
from pp_plugin.recipe import DataConfig, Recipe, apply_overrides, load_recipe, parse_recipe

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED_RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
METHOD_NAMES = ", ".join(sorted(METHODS))
PRUNING_METHODS = sorted(name for name, (config, _) in METHODS.items() if "pruning_ratio" in config.model_fields)


def key_list(config) -> str:
    """Return the field names of a pydantic model as the error messages list them."""
    return ", ".join(sorted(config.model_fields))


def recipe_error(raw) -> str:
    """Return the message of the RecipeError that ``parse_recipe(raw)`` raises."""
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw, "test.yaml")
    return str(caught.value)


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Shipped recipes and defaults.


def test_recipes_folder_not_empty():
    assert SHIPPED_RECIPES


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda path: path.name)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)

    assert isinstance(recipe, Recipe)
    assert recipe.method.name in METHODS


@pytest.mark.parametrize("raw", [{}, None], ids=["empty-dict", "none"])
def test_defaults_from_empty_mapping(raw):
    recipe = parse_recipe(raw)

    assert recipe.model == "smollm2-135m"
    assert recipe.data.dataset == "brown"
    assert recipe.data.calibration_split == "calibration"
    assert recipe.data.test_split == "test"
    assert recipe.data.seq_len == 512
    assert recipe.data.calibration_windows == 64
    assert recipe.data.test_windows == 16
    assert recipe.data.batch_size == 8
    assert recipe.data.calibration_sampling == "random"
    assert recipe.data.test_sampling == "contiguous"
    assert recipe.data.seed == 0
    assert recipe.method.name == "probe"
    assert recipe.method.pruning_ratio == 0.4
    assert recipe.method.skip_layers == [0, 1, 2]
    assert recipe.method.round_to == 64
    assert recipe.method.history.enabled is True


def test_defaults_from_empty_file(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, ""))

    assert recipe == Recipe()


def test_partial_section_defaults():
    recipe = parse_recipe({"data": {"seq_len": 64}, "method": {"name": "random", "seed": 3}})

    assert recipe.data.seq_len == 64
    assert recipe.data.test_windows == 16
    assert recipe.method.name == "random"
    assert recipe.method.seed == 3


def test_parse_leaves_input_unchanged():
    raw = {"method": {"name": "probe", "skip_layers": [2, 0, 2]}}
    snapshot = copy.deepcopy(raw)

    recipe = parse_recipe(raw)

    assert recipe.method.skip_layers == [0, 2]
    assert raw == snapshot


# ---------------------------------------------------------------------------
# apply_overrides.


def test_override_dotted_path():
    raw = {"data": {"seq_len": 64, "dataset": "brown"}}

    result = apply_overrides(raw, ["data.test_windows=4"])

    assert result == {"data": {"seq_len": 64, "dataset": "brown", "test_windows": 4}}


def test_override_replaces_existing_value():
    result = apply_overrides({"data": {"seq_len": 64}}, ["data.seq_len=128"])

    assert result["data"]["seq_len"] == 128


def test_override_last_one_wins():
    result = apply_overrides({}, ["data.seq_len=8", "data.seq_len=16"])

    assert result["data"]["seq_len"] == 16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.2", 0.2),
        ("8", 8),
        ("true", True),
        ("false", False),
        ("[1, 2]", [1, 2]),
        ("null", None),
        ("brown", "brown"),
        ("'8'", "8"),
        ("{a: 1}", {"a": 1}),
    ],
)
def test_override_yaml_typed_value(text, expected):
    result = apply_overrides({}, [f"key={text}"])

    assert result["key"] == expected
    assert type(result["key"]) is type(expected)


def test_override_value_may_contain_equals():
    result = apply_overrides({}, ["data.dataset=text:a=b.txt"])

    assert result["data"]["dataset"] == "text:a=b.txt"


def test_override_invalid_yaml_kept_as_string():
    result = apply_overrides({}, ["key=[1, 2"])

    assert result["key"] == "[1, 2"


def test_override_strips_key_whitespace():
    result = apply_overrides({}, [" data.seq_len =8"])

    assert result == {"data": {"seq_len": 8}}


def test_override_creates_missing_mappings():
    result = apply_overrides({"model": "m"}, ["method.probe.sample_ratio=0.5"])

    assert result == {"model": "m", "method": {"probe": {"sample_ratio": 0.5}}}


@pytest.mark.parametrize("override", ["data.seq_len", "=3", " =3", ""])
def test_override_without_key_rejected(override):
    with pytest.raises(RecipeError) as caught:
        apply_overrides({}, [override])

    message = str(caught.value)
    assert repr(override) in message
    assert "KEY=VALUE" in message
    assert "--set data.test_windows=8" in message


def test_override_into_string_rejected():
    with pytest.raises(RecipeError) as caught:
        apply_overrides({"data": "brown"}, ["data.seq_len=8"])

    message = str(caught.value)
    assert "'data.seq_len=8'" in message
    assert "data is 'brown'" in message
    assert "not a mapping" in message
    assert "'seq_len'" in message


def test_override_into_list_rejected():
    with pytest.raises(RecipeError) as caught:
        apply_overrides({"method": {"skip_layers": [0, 1]}}, ["method.skip_layers.first=3"])

    message = str(caught.value)
    assert "method.skip_layers is [0, 1]" in message
    assert "not a mapping" in message
    assert "'first'" in message


def test_override_into_earlier_scalar():
    with pytest.raises(RecipeError, match="data.seq_len is 8, not a mapping"):
        apply_overrides({}, ["data.seq_len=8", "data.seq_len.x=1"])


def test_override_leaves_input_unchanged():
    raw = {"data": {"seq_len": 64}, "method": {"name": "probe", "skip_layers": [0]}}
    snapshot = copy.deepcopy(raw)

    result = apply_overrides(raw, ["data.seq_len=8", "method.skip_layers=[1, 2]", "method.probe.order=samples-first"])

    assert raw == snapshot
    assert result["data"] is not raw["data"]
    assert result["method"]["skip_layers"] == [1, 2]


def test_failed_override_leaves_input_unchanged():
    raw = {"data": {"seq_len": 64}, "method": "probe"}
    snapshot = copy.deepcopy(raw)

    with pytest.raises(RecipeError):
        apply_overrides(raw, ["data.seq_len=8", "data.extra.deep=1", "method.name=random"])

    assert raw == snapshot


def test_override_without_overrides_copies():
    raw = {"data": {"seq_len": 64}}

    result = apply_overrides(raw, [])

    assert result == raw
    assert result is not raw
    assert result["data"] is not raw["data"]


def test_override_fixes_invalid_recipe(tmp_path):
    path = write_recipe(tmp_path, "method:\n  name: probe\n  pruning_ratio: 1.0\n")

    with pytest.raises(RecipeError, match="method.pruning_ratio"):
        load_recipe(path)
    recipe = load_recipe(path, ["method.pruning_ratio=0.2"])

    assert recipe.method.pruning_ratio == 0.2


def test_override_changes_method(tmp_path):
    path = write_recipe(tmp_path, "method:\n  name: probe\n  pruning_ratio: 0.3\n  skip_layers: [0]\n")

    recipe = load_recipe(path, ["method.name=random", "method.seed=5"])

    assert recipe.method.name == "random"
    assert recipe.method.seed == 5
    assert recipe.method.pruning_ratio == 0.3
    assert recipe.method.skip_layers == [0]


def test_load_bad_override(tmp_path):
    path = write_recipe(tmp_path, "data:\n  seq_len: 64\n")

    with pytest.raises(RecipeError, match="data.bogus: unknown key"):
        load_recipe(path, ["data.bogus=1"])


# ---------------------------------------------------------------------------
# Error messages of parse_recipe and load_recipe.


def test_recipe_error_is_plugin_error():
    assert issubclass(RecipeError, PPPluginError)
    assert issubclass(RecipeError, ValueError)


def test_error_names_source():
    message = recipe_error({"bogus": 1})

    assert message.startswith("invalid recipe test.yaml:")


def test_unknown_top_level_key():
    message = recipe_error({"bogus": 1})

    assert "bogus: unknown key" in message
    assert f"allowed keys here: {key_list(Recipe)}" in message
    assert "data" in key_list(Recipe)


def test_unknown_data_key():
    message = recipe_error({"data": {"seq_length": 64}})

    assert "data.seq_length: unknown key" in message
    assert f"allowed keys here: {key_list(DataConfig)}" in message
    for key in ("batch_size", "calibration_windows", "dataset", "seq_len", "test_windows", "calibration_sampling", "test_sampling", "seed"):
        assert key in message


def test_unknown_probe_key():
    message = recipe_error({"method": {"name": "probe", "probe": {"bogus": 1}}})

    assert "method.probe.bogus: unknown key" in message
    assert f"allowed keys here: {key_list(ProbeConfig)}" in message
    assert "sample_ratio" in message


def test_unknown_history_key():
    message = recipe_error({"method": {"name": "probe", "history": {"decay": 0.9}}})

    assert "method.history.decay: unknown key" in message
    assert f"allowed keys here: {key_list(HistoryConfig)}" in message
    assert "ema_decay" in message


def test_unknown_method_key():
    message = recipe_error({"method": {"name": "random", "bogus": 1}})

    assert "method.bogus: unknown key" in message
    assert "seed" in message
    assert "pruning_ratio" in message
    assert "skip_layers" in message


def test_dense_method_rejects_ratio():
    message = recipe_error({"method": {"name": "dense", "pruning_ratio": 0.2}})

    assert "method.pruning_ratio: unknown key" in message
    assert "allowed keys here: label, name" in message


def test_wrong_type_string_for_int():
    message = recipe_error({"data": {"seq_len": "long"}})

    assert "data.seq_len" in message
    assert "'long'" in message
    assert "valid integer" in message


def test_wrong_type_fraction_for_int():
    message = recipe_error({"data": {"batch_size": 1.5}})

    assert "data.batch_size" in message
    assert "1.5" in message
    assert "valid integer" in message


def test_wrong_type_string_for_section():
    message = recipe_error({"data": "brown"})

    assert "data: 'brown' is invalid" in message
    assert "valid dictionary" in message


def test_wrong_type_number_for_model():
    message = recipe_error({"model": 3})

    assert "model: 3 is invalid" in message
    assert "valid string" in message


def test_wrong_literal_lists_choices():
    message = recipe_error({"data": {"test_sampling": "shuffled"}})

    assert "data.test_sampling: 'shuffled' is invalid" in message
    assert "'contiguous' or 'random'" in message


def test_seq_len_below_minimum():
    message = recipe_error({"data": {"seq_len": 1}})

    assert "data.seq_len: 1 is invalid" in message
    assert "greater than or equal to 2" in message


def test_bool_for_int_rejected():
    message = recipe_error({"data": {"test_windows": True}})

    assert "data.test_windows" in message


def test_ratio_one_rejected():
    message = recipe_error({"method": {"name": "probe", "pruning_ratio": 1.0}})

    assert "method.pruning_ratio: 1.0 is invalid" in message
    assert "less than 1" in message


def test_ratio_negative_rejected():
    message = recipe_error({"method": {"name": "probe", "pruning_ratio": -0.1}})

    assert "method.pruning_ratio: -0.1 is invalid" in message
    assert "greater than or equal to 0" in message


def test_pruning_methods_found():
    assert {"probe", "random", "full-batch-probe"} <= set(PRUNING_METHODS)


@pytest.mark.parametrize("name", PRUNING_METHODS)
def test_ratio_range_every_method(name):
    message = recipe_error({"method": {"name": name, "pruning_ratio": 1.0}})

    assert "method.pruning_ratio: 1.0 is invalid" in message


def test_ratio_zero_accepted():
    recipe = parse_recipe({"method": {"name": "probe", "pruning_ratio": 0.0}})

    assert recipe.method.pruning_ratio == 0.0


def test_negative_skip_layer_rejected():
    message = recipe_error({"method": {"name": "probe", "skip_layers": [0, -1]}})

    assert "method.skip_layers: [0, -1] is invalid" in message
    assert "must be >= 0" in message


def test_unknown_method_name():
    message = recipe_error({"method": {"name": "no-such-method"}})

    assert "method.name: unknown method name 'no-such-method'" in message
    assert f"valid names are: {METHOD_NAMES}" in message


def test_missing_method_name():
    message = recipe_error({"method": {"pruning_ratio": 0.2}})

    assert "method.name: missing" in message
    assert f"valid names are: {METHOD_NAMES}" in message


def test_method_not_a_mapping():
    message = recipe_error({"method": "probe"})

    assert "method: 'probe' is invalid" in message
    assert "valid dictionary" in message


def test_several_errors_all_listed():
    message = recipe_error({"data": {"seq_len": 0, "bogus": 1}})

    assert "data.seq_len: 0 is invalid" in message
    assert "data.bogus: unknown key" in message


@pytest.mark.parametrize(("raw", "type_name"), [([1, 2], "list"), ("probe", "str"), (3, "int")])
def test_parse_non_mapping(raw, type_name):
    message = recipe_error(raw)

    assert "test.yaml" in message
    assert "must be a YAML mapping" in message
    assert f"got {type_name}" in message


@pytest.mark.parametrize(("text", "type_name"), [("- a\n- b\n", "list"), ("just text\n", "str")])
def test_load_non_mapping(tmp_path, text, type_name):
    path = write_recipe(tmp_path, text)

    with pytest.raises(RecipeError) as caught:
        load_recipe(path)

    message = str(caught.value)
    assert str(path) in message
    assert "must be a YAML mapping" in message
    assert f"got {type_name}" in message


def test_load_non_mapping_with_overrides(tmp_path):
    path = write_recipe(tmp_path, "- a\n")

    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(path, ["model=m"])


def test_load_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(RecipeError) as caught:
        load_recipe(path)

    message = str(caught.value)
    assert str(path) in message
    assert "not found" in message
    assert "recipes/smollm2-probe.yaml" in message


def test_load_invalid_yaml(tmp_path):
    path = write_recipe(tmp_path, "model: [unclosed\n")

    with pytest.raises(RecipeError) as caught:
        load_recipe(path)

    message = str(caught.value)
    assert str(path) in message
    assert "not valid UTF-8 YAML" in message
    assert "line 1" in message


def test_load_invalid_utf8(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"model: \xff\xfe\n")

    with pytest.raises(RecipeError) as caught:
        load_recipe(path)

    message = str(caught.value)
    assert str(path) in message
    assert "not valid UTF-8 YAML" in message


def test_load_directory_is_recipe_error(tmp_path):
    with pytest.raises(RecipeError):
        load_recipe(tmp_path)


def test_load_error_names_file(tmp_path):
    path = write_recipe(tmp_path, "data:\n  seq_length: 64\n")

    with pytest.raises(RecipeError) as caught:
        load_recipe(path)

    message = str(caught.value)
    assert f"invalid recipe {path}:" in message
    assert "data.seq_length: unknown key" in message


def test_empty_recipe_file_warns(tmp_path, caplog):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    with caplog.at_level("WARNING", logger="pp_plugin.recipe"):
        recipe = load_recipe(path)
    assert recipe.method.name == "probe"
    assert "is empty" in caplog.text
