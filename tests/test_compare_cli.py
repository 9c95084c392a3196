"""End-to-end tests of ``pp-prune compare`` and ``pp-prune apply`` on a tiny local model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pp_plugin.methods import METHODS
from pp_plugin.static import load_pruned
from test_cli import SEQ_LEN, english_like_text, run_cli, save_tiny_model

ALL_METHODS = sorted(METHODS)


@pytest.fixture(scope="module")
def compare_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-assets")
    text = root / "text.txt"
    text.write_text(english_like_text(), encoding="utf-8")
    model = root / "model"
    save_tiny_model(model, text.read_text(encoding="utf-8"))
    methods = ", ".join(
        "{name: %s%s}" % (name, "" if name == "dense" else ", skip_layers: [0], round_to: 8")
        for name in ALL_METHODS
    )
    recipe = root / "compare.yaml"
    recipe.write_text(
        f"model: {json.dumps(str(model))}\n"
        f"data: {{dataset: {json.dumps(f'text:{text}')}, seq_len: {SEQ_LEN}, calibration_windows: 4, "
        f"test_windows: 4, batch_size: 2}}\n"
        f"method: {{name: flap, pruning_ratio: 0.4, skip_layers: [0], round_to: 8}}\n"
        f"compare: {{pruning_ratios: [0.2, 0.4], methods: [{methods}]}}\n",
        encoding="utf-8",
    )
    return root, recipe


@pytest.fixture(scope="module")
def compare_run(compare_assets):
    root, recipe = compare_assets
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PP_PLUGIN_CACHE", str(root / "cache"))
        code, stdout, stderr = run_cli([
            "compare", str(recipe), "--json", str(root / "rows.json"), "--plot", str(root / "plot.png"),
        ])
    return code, stdout, stderr, root


def test_compare_exit_code(compare_run):
    code, _, stderr, _ = compare_run
    assert code == 0, stderr


def test_compare_has_every_row(compare_run):
    _, _, _, root = compare_run
    rows = json.loads((root / "rows.json").read_text())["results"]
    keys = {(row["method"], row["pruning_ratio"]) for row in rows}
    expected = {("dense", 0.0)} | {(name, ratio) for name in ALL_METHODS if name != "dense" for ratio in (0.2, 0.4)}
    assert keys == expected
    assert all(row["error"] is None for row in rows)


def test_compare_rows_have_spread_and_prr(compare_run):
    _, _, _, root = compare_run
    rows = json.loads((root / "rows.json").read_text())["results"]
    for row in rows:
        assert math.isfinite(row["perplexity"])
        low, high = row["perplexity_ci95"]
        assert low <= row["perplexity"] <= high
        assert row["flops_ratio"] > 0
    probe = next(row for row in rows if row["method"] == "probe" and row["pruning_ratio"] == 0.4)
    assert probe["probe_flops_share"] > 0
    assert probe["probe_time_share"] > 0
    if probe["latency_ratio"] < 1:
        expected = probe["perplexity_increase"] / (1 - probe["latency_ratio"])
        assert probe["prr"] == pytest.approx(expected)
    else:
        assert probe["prr"] is None


def test_compare_table_and_plot(compare_run):
    _, stdout, _, root = compare_run
    assert "PRR" in stdout.splitlines()[0]
    assert sum(line.split()[0] == "flap" for line in stdout.splitlines()[2:]) == 2
    assert (root / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_section_exit_2(compare_assets, tmp_path, monkeypatch):
    root, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    plain = tmp_path / "plain.yaml"
    plain.write_text("\n".join(line for line in recipe.read_text().splitlines() if not line.startswith("compare")))
    code, _, stderr = run_cli(["compare", str(plain)])
    assert code == 2
    assert "compare.methods" in stderr


def test_apply_saves_loadable_model(compare_assets, tmp_path, monkeypatch):
    root, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "pruned"
    code, _, stderr = run_cli(["apply", str(recipe), "--output", str(output)])
    assert code == 0, stderr

    model, tokenizer = load_pruned(output)
    shapes = model.config.pp_layer_shapes
    assert shapes[0]["intermediate_size"] == 96
    assert all(shape["intermediate_size"] < 96 for shape in shapes[1:])
    ids = tokenizer("The small river slowly sees a tree", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 3
    assert bool(torch.isfinite(model(ids).logits).all())


def test_apply_refuses_non_empty_output(compare_assets, tmp_path, monkeypatch):
    _, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "pruned"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    code, _, stderr = run_cli(["apply", str(recipe), "--output", str(output)])
    assert code == 2
    assert "--force" in stderr
    assert (output / "notes.txt").read_text() == "keep me"


def test_apply_rejects_dynamic_method(compare_assets, tmp_path, monkeypatch):
    _, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    code, _, stderr = run_cli([
        "apply", str(recipe), "--output", str(tmp_path / "out"), "--set", "method.name=probe",
    ])
    assert code == 2
    assert "prune per batch" in stderr
    assert "probe-snapshot" in stderr


@pytest.fixture(scope="module")
def gpt2_folder(compare_assets, tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root, _ = compare_assets
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_rejects_unsupported_model(compare_assets, gpt2_folder, tmp_path, monkeypatch):
    _, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    code, stdout, stderr = run_cli(["eval", str(recipe), "--set", f"model={gpt2_folder}"])
    assert code == 2
    assert "model type 'gpt2' is not supported" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""


def test_eval_rejects_missing_skip_layer(compare_assets, tmp_path, monkeypatch):
    _, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    code, _, stderr = run_cli(["eval", str(recipe), "--set", "method.skip_layers=[0, 99]"])
    assert code == 2
    assert "skip_layers [99] do not exist" in stderr
    assert "Traceback" not in stderr


def test_eval_rejects_tokenizer_larger_than_vocabulary(compare_assets, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "small-vocab"
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(root / "model").save_pretrained(folder)
    code, _, stderr = run_cli(["eval", str(recipe), "--set", f"model={folder}"])
    assert code == 2
    assert "vocabulary has 4 entries" in stderr


def test_json_path_that_is_a_folder(compare_assets, tmp_path, monkeypatch):
    _, recipe = compare_assets
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(tmp_path / "cache"))
    code, _, stderr = run_cli(["eval", str(recipe), "--json", str(tmp_path), "--force"])
    assert code == 2
    assert "is a folder" in stderr
