"""End-to-end tests of ``pp-prune eval`` on a tiny local model folder.

Nothing is downloaded: the model is a random 4-layer LLaMA and the tokenizer a
word-level tokenizer trained on the test's own generated text, both written
with ``save_pretrained`` into a temporary folder. The recipe reads that text
through the ``text:PATH`` data set.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pp_plugin.cli import main

RESULT_KEYS = ("method", "pruning_ratio", "perplexity", "latency_ms", "latency_ratio", "flops_ratio", "tokens")
TABLE_HEADER = ("method", "ratio", "perplexity", "latency_ms", "latency_ratio", "flops_ratio")
SEQ_LEN = 32
TEST_WINDOWS = 4

DETERMINERS = ["the", "a", "one", "every", "that"]
ADJECTIVES = ["small", "large", "old", "new", "red", "green", "quiet", "loud"]
NOUNS = ["river", "city", "house", "dog", "cat", "bird", "tree", "road", "teacher", "farmer", "child"]
VERBS = ["sees", "finds", "builds", "carries", "watches", "follows", "likes"]
PREPOSITIONS = ["near", "under", "over", "beside", "behind"]
ADVERBS = ["slowly", "quickly", "often", "never", "then"]


def english_like_text(paragraphs: int = 20, seed: int = 0) -> str:
    """Return a few KB of simple English sentences, the same for the same seed."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(6):
            words = [rng.choice(DETERMINERS), rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(ADVERBS)]
            words += [rng.choice(VERBS), rng.choice(DETERMINERS), rng.choice(NOUNS)]
            words += [rng.choice(PREPOSITIONS), rng.choice(DETERMINERS), rng.choice(NOUNS)]
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
        blocks.append(" ".join(sentences))
    return "\n\n".join(blocks) + "\n"


def save_tiny_model(folder: Path, text: str) -> None:
    """Save a word-level tokenizer trained on ``text`` and a random 4-layer GQA LLaMA into ``folder``."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", pad_token="</s>"
    )

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2 * SEQ_LEN,
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


PROBE_METHOD = "{name: probe, pruning_ratio: 0.4, skip_layers: [0], round_to: 8, probe: {sample_ratio: 0.5}}"
# Without the probe section, so that --set method.name can switch to a method without probe settings.
STRUCTURE_METHOD = "{name: probe, pruning_ratio: 0.4, skip_layers: [0], round_to: 8}"


def write_recipe(path: Path, model: Path, text: Path, method: str = PROBE_METHOD) -> Path:
    dataset = json.dumps(f"text:{text}")
    path.write_text(
        f"model: {json.dumps(str(model))}\n"
        f"data: {{dataset: {dataset}, seq_len: {SEQ_LEN}, calibration_windows: 4, "
        f"test_windows: {TEST_WINDOWS}, batch_size: 2}}\n"
        f"method: {method}\n",
        encoding="utf-8",
    )
    return path


@dataclass
class Assets:
    model: Path
    text: Path
    recipe: Path
    structure_recipe: Path


@dataclass
class CliRun:
    exit_code: int
    stdout: str
    stderr: str
    json_path: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("cli-assets")
    text = root / "text.txt"
    text.write_text(english_like_text(), encoding="utf-8")
    model = root / "model"
    save_tiny_model(model, text.read_text(encoding="utf-8"))
    return Assets(
        model=model,
        text=text,
        recipe=write_recipe(root / "recipe.yaml", model, text),
        structure_recipe=write_recipe(root / "structure.yaml", model, text, STRUCTURE_METHOD),
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(folder))
    return folder


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run ``main(args)`` and return its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        exit_code = main(args)
    return exit_code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def probe_run(assets, tmp_path_factory) -> CliRun:
    """One ``eval`` run of the probe recipe with ``--json``, shared by the read-only checks."""
    root = tmp_path_factory.mktemp("probe-run")
    json_path = root / "results.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PP_PLUGIN_CACHE", str(root / "cache"))
        exit_code, stdout, stderr = run_cli(["eval", str(assets.recipe), "--json", str(json_path)])
    return CliRun(exit_code, stdout, stderr, json_path)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Return the cells of each table row, keyed by method name."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) == len(TABLE_HEADER) and cells[0] != "method" and not cells[0].startswith("-"):
            rows[cells[0]] = cells
    return rows


def results_by_method(json_path: Path) -> dict[str, dict]:
    report = json.loads(json_path.read_text(encoding="utf-8"))
    return {result["method"]: result for result in report["results"]}


def history_files(cache: Path) -> list[Path]:
    return sorted((cache / "history").glob("*.pt"))


# ---------------------------------------------------------------------------
# One probe run: table, JSON and cache.


def test_eval_exit_code(probe_run):
    assert probe_run.exit_code == 0


def test_table_header(probe_run):
    header = probe_run.stdout.splitlines()[0].split()

    assert tuple(header) == TABLE_HEADER


def test_table_rows(probe_run):
    rows = table_rows(probe_run.stdout)

    assert sorted(rows) == ["dense", "probe"]
    assert rows["dense"][1] == "0.00"
    assert rows["probe"][1] == "0.40"
    assert rows["dense"][4] == "1.000"
    assert rows["dense"][5] == "1.000"


def test_table_no_failures(probe_run):
    assert "failed" not in probe_run.stdout


def test_json_top_keys(probe_run, assets):
    report = json.loads(probe_run.json_path.read_text(encoding="utf-8"))

    assert set(report) == {"model", "data", "results"}
    assert report["model"] == str(assets.model)
    assert report["data"]["dataset"] == f"text:{assets.text}"
    assert report["data"]["seq_len"] == SEQ_LEN


def test_json_result_keys(probe_run):
    results = results_by_method(probe_run.json_path)

    assert sorted(results) == ["dense", "probe"]
    for result in results.values():
        for key in RESULT_KEYS:
            assert key in result, f"{result['method']} lacks {key}"


def test_json_dense_ratios(probe_run):
    dense = results_by_method(probe_run.json_path)["dense"]

    assert dense["pruning_ratio"] == 0.0
    assert dense["latency_ratio"] == 1
    assert dense["flops_ratio"] == 1


def test_json_probe_ratios(probe_run):
    probe = results_by_method(probe_run.json_path)["probe"]

    assert probe["pruning_ratio"] == 0.4
    assert probe["flops_ratio"] < 1
    assert probe["latency_ratio"] > 0
    assert probe["error"] is None


def test_json_perplexities_finite(probe_run):
    for result in results_by_method(probe_run.json_path).values():
        assert result["perplexity"] is not None
        assert math.isfinite(result["perplexity"])
        assert result["perplexity"] > 1


def test_json_token_counts(probe_run):
    for result in results_by_method(probe_run.json_path).values():
        assert result["tokens"] == TEST_WINDOWS * (SEQ_LEN - 1)


def test_json_latencies_positive(probe_run):
    for result in results_by_method(probe_run.json_path).values():
        assert result["latency_ms"] > 0


def test_stdout_has_no_log_lines(probe_run):
    assert "INFO" not in probe_run.stdout


# ---------------------------------------------------------------------------
# Overrides, output file and errors.


def test_set_pruning_ratio(assets, cache, tmp_path, probe_run):
    json_path = tmp_path / "results.json"

    exit_code, stdout, _ = run_cli(
        ["eval", str(assets.recipe), "--set", "method.pruning_ratio=0.2", "--json", str(json_path)]
    )

    assert exit_code == 0
    assert table_rows(stdout)["probe"][1] == "0.20"
    probe = results_by_method(json_path)["probe"]
    assert probe["pruning_ratio"] == 0.2
    assert probe["flops_ratio"] > results_by_method(probe_run.json_path)["probe"]["flops_ratio"]


def test_set_unknown_key_exit_2(assets, cache):
    exit_code, stdout, stderr = run_cli(["eval", str(assets.recipe), "--set", "data.bogus=1"])

    assert exit_code == 2
    assert "pp-prune: error:" in stderr
    assert "data.bogus: unknown key" in stderr
    assert stdout == ""


def test_set_without_equals_exit_2(assets, cache):
    exit_code, _, stderr = run_cli(["eval", str(assets.recipe), "--set", "data.seq_len"])

    assert exit_code == 2
    assert "'data.seq_len' is not KEY=VALUE" in stderr


def test_missing_recipe_exit_2(tmp_path, cache):
    path = tmp_path / "absent.yaml"

    exit_code, _, stderr = run_cli(["eval", str(path)])

    assert exit_code == 2
    assert f"recipe file {path} not found" in stderr


def test_missing_model_folder_exit_2(assets, cache, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "no-model", assets.text)

    exit_code, _, stderr = run_cli(["eval", str(recipe)])

    assert exit_code == 2
    assert "no-model" in stderr
    assert "does not exist" in stderr


def test_json_exists_without_force(assets, cache, tmp_path):
    json_path = tmp_path / "results.json"
    json_path.write_text("keep me\n", encoding="utf-8")

    exit_code, stdout, stderr = run_cli(["eval", str(assets.recipe), "--json", str(json_path)])

    assert exit_code == 2
    assert f"{json_path} already exists" in stderr
    assert "--force" in stderr
    assert stdout == ""
    assert json_path.read_text(encoding="utf-8") == "keep me\n"


def test_json_exists_with_force(assets, cache, tmp_path):
    json_path = tmp_path / "results.json"
    json_path.write_text("replace me\n", encoding="utf-8")

    exit_code, _, _ = run_cli(["eval", str(assets.recipe), "--json", str(json_path), "--force"])

    assert exit_code == 0
    assert sorted(results_by_method(json_path)) == ["dense", "probe"]


def test_eval_without_json_no_file(assets, cache, tmp_path, monkeypatch):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    exit_code, _, _ = run_cli(["eval", str(assets.recipe)])

    assert exit_code == 0
    assert list(workdir.iterdir()) == []


# ---------------------------------------------------------------------------
# Calibration history cache.


def test_history_cache_written(assets, cache):
    exit_code, _, _ = run_cli(["eval", str(assets.recipe)])

    assert exit_code == 0
    assert len(history_files(cache)) == 1


def test_second_run_loads_history(assets, cache, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pp_plugin")
    first_json, second_json = tmp_path / "first.json", tmp_path / "second.json"

    first_code, _, _ = run_cli(["eval", str(assets.recipe), "--json", str(first_json)])
    first_log = caplog.text
    caplog.clear()
    second_code, _, _ = run_cli(["eval", str(assets.recipe), "--json", str(second_json)])
    second_log = caplog.text

    assert first_code == 0
    assert second_code == 0
    assert "saved calibration history" in first_log
    assert "loading calibration history" not in first_log
    assert "loading calibration history" in second_log
    assert str(history_files(cache)[0]) in second_log
    assert "saved calibration history" not in second_log
    first_probe = results_by_method(first_json)["probe"]
    second_probe = results_by_method(second_json)["probe"]
    assert second_probe["perplexity"] == pytest.approx(first_probe["perplexity"], rel=1e-5)


def corrupt_history_and_rerun(assets: Assets, cache: Path) -> tuple[Path, int, str]:
    """Run once, overwrite the history cache with garbage and run again.

    Return the cache file, the exit code of the second run and its stdout and stderr together.
    """
    first_code, _, _ = run_cli(["eval", str(assets.recipe)])
    assert first_code == 0
    history_path = history_files(cache)[0]
    history_path.write_bytes(b"this is not a torch file")
    exit_code, stdout, stderr = run_cli(["eval", str(assets.recipe)])
    return history_path, exit_code, stdout + stderr


def test_corrupt_history_message(assets, cache):
    history_path, exit_code, output = corrupt_history_and_rerun(assets, cache)

    assert exit_code != 0
    assert str(history_path) in output
    assert "corrupt" in output
    assert "delete the file" in output


def test_corrupt_history_exit_2(assets, cache):
    _, exit_code, _ = corrupt_history_and_rerun(assets, cache)

    assert exit_code == 2


# ---------------------------------------------------------------------------
# Other methods through --set method.name.


def test_random_method(assets, cache, tmp_path):
    json_path = tmp_path / "results.json"

    exit_code, stdout, _ = run_cli(
        ["eval", str(assets.structure_recipe), "--set", "method.name=random", "--json", str(json_path)]
    )

    assert exit_code == 0
    assert sorted(table_rows(stdout)) == ["dense", "random"]
    random_result = results_by_method(json_path)["random"]
    assert random_result["error"] is None
    assert math.isfinite(random_result["perplexity"])
    assert random_result["flops_ratio"] < 1


def test_random_method_needs_no_history(assets, cache):
    exit_code, _, _ = run_cli(["eval", str(assets.structure_recipe), "--set", "method.name=random"])

    assert exit_code == 0
    assert history_files(cache) == []


def test_full_batch_probe_method(assets, cache, tmp_path):
    json_path = tmp_path / "results.json"

    exit_code, stdout, _ = run_cli(
        ["eval", str(assets.recipe), "--set", "method.name=full-batch-probe", "--json", str(json_path)]
    )

    assert exit_code == 0
    assert sorted(table_rows(stdout)) == ["dense", "full-batch-probe"]
    result = results_by_method(json_path)["full-batch-probe"]
    assert result["error"] is None
    assert math.isfinite(result["perplexity"])
    assert result["pruning_ratio"] == 0.4
    assert history_files(cache) == []


def test_dense_only_recipe(assets, cache, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", assets.model, assets.text, method="{name: dense}")
    json_path = tmp_path / "results.json"

    exit_code, stdout, _ = run_cli(["eval", str(recipe), "--json", str(json_path)])

    assert exit_code == 0
    assert sorted(table_rows(stdout)) == ["dense"]
    assert sorted(results_by_method(json_path)) == ["dense"]
