"""YAML recipes: model, data and method of a pruning run, validated strictly.

A recipe is a YAML mapping::

    model: smollm2-135m          # embedded name, local Hugging Face folder or hub id
    data:
      dataset: brown             # brown | wikitext2 | text:PATH
      calibration_split: calibration
      test_split: test
      seq_len: 512
      calibration_windows: 64
      test_windows: 16
      batch_size: 8
    method:
      name: probe                # a name from pp_plugin.methods.METHODS
      pruning_ratio: 0.4

Unknown keys, wrong types (strictly: ``true`` is no number, ``2.0`` no
integer) and out-of-range values raise :class:`RecipeError` with the key path,
the value and what is allowed. ``--set KEY=VALUE``
overrides (see :func:`apply_overrides`) are applied before validation.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RecipeError
from .methods import METHODS

logger = logging.getLogger(__name__)

MethodConfig = Annotated[
    Union[tuple(config for config, _ in METHODS.values())],
    Field(discriminator="name"),
]


class DataConfig(BaseModel):
    """Source, size and batching of the calibration and test windows."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field("brown", description="brown, wikitext2, or text:PATH for a local UTF-8 file")
    calibration_split: str = Field("calibration", description="split used to collect calibration history")
    test_split: str = Field("test", description="split whose windows are evaluated")
    seq_len: int = Field(512, ge=2, description="tokens per window")
    calibration_windows: int = Field(64, ge=1, description="number of calibration windows")
    test_windows: int = Field(16, ge=1, description="number of test windows")
    batch_size: int = Field(8, ge=1, description="windows per forward pass, for calibration and test")
    calibration_sampling: Literal["contiguous", "random"] = Field(
        "random", description="calibration windows: random seeded start positions over the whole split, "
        "or contiguous non-overlapping windows from its start"
    )
    test_sampling: Literal["contiguous", "random"] = Field(
        "contiguous", description="test windows: contiguous non-overlapping windows from the split's start, "
        "or random seeded start positions"
    )
    seed: int = Field(0, description="seed of random window sampling")


PruningRatio = Annotated[float, Field(ge=0, lt=1)]


class CompareConfig(BaseModel):
    """Methods and pruning ratios that ``pp-prune compare`` evaluates side by side."""

    model_config = ConfigDict(extra="forbid", strict=True)

    methods: list[MethodConfig] = Field(min_length=1, description="methods; each runs at every ratio")
    pruning_ratios: list[PruningRatio] = Field(min_length=1, description="pruning ratios in [0, 1)")


class Recipe(BaseModel):
    """A validated recipe."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field("smollm2-135m", description="embedded model name, local folder or hub id")
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=lambda: METHODS["probe"][0]())
    compare: CompareConfig | None = Field(None, description="methods and ratios for pp-prune compare")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with ``KEY=VALUE`` overrides applied.

    KEY is a dotted path (``data.test_windows``); VALUE is parsed as YAML, so
    ``0.2`` is a float, ``[0.2, 0.4]`` a list and ``true`` a bool.
    """
    result = copy.deepcopy(raw)
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key.strip():
            raise RecipeError(f"override {override!r} is not KEY=VALUE; write for example --set data.test_windows=8.")
        node = result
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: depth + 1])
                raise RecipeError(
                    f"override {override!r}: {path} is {child!r}, not a mapping, so it has no key {parts[depth + 1]!r}."
                )
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return result


def _allowed_keys(raw: Any, location: tuple) -> list[str]:
    """Return the keys allowed in the mapping at ``location`` of the recipe."""
    sections = {"data": DataConfig, "compare": CompareConfig}
    node = raw
    model: type[BaseModel] | None = Recipe
    for part in location:
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
        if part == "method" or (isinstance(part, int) and location[:1] == ("compare",)):
            model = METHODS.get(node.get("name"), (None,))[0] if isinstance(node, dict) else None
        elif part in ("probe", "history") and model is not None and part in model.model_fields:
            model = model.model_fields[part].annotation
        elif part in sections:
            model = sections[part]
        elif part == "methods":
            model = None
        else:
            return []
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _has(node: dict | list, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


def _without_union_tags(location: tuple) -> tuple:
    """Drop the method-name tag that pydantic inserts after a method section in error locations."""
    parts = list(location)
    for index, part in enumerate(parts):
        if part == "method" and index + 1 < len(parts) and parts[index + 1] in METHODS:
            del parts[index + 1]
            break
        if (part == "methods" and index + 2 < len(parts) and isinstance(parts[index + 1], int)
                and parts[index + 2] in METHODS):
            del parts[index + 2]
            break
    return tuple(parts)


def _format_errors(error: ValidationError, raw: dict, source: str) -> str:
    lines = []
    for item in error.errors():
        location = _without_union_tags(item["loc"])
        path = ".".join(str(part) for part in location) or "<recipe>"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(raw, location[:-1])
            lines.append(f"{path}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif item["type"] == "union_tag_invalid":
            lines.append(
                f"{path}.name: unknown method name {item['input'].get('name')!r}; "
                f"valid names are: {', '.join(sorted(METHODS))}"
            )
        elif item["type"] == "missing":
            lines.append(f"{path}: missing required key")
        elif item["type"] == "union_tag_not_found":
            lines.append(f"{path}.name: missing; valid names are: {', '.join(sorted(METHODS))}")
        else:
            lines.append(f"{path}: {item['input']!r} is invalid: {item['msg']}")
    return f"invalid recipe {source}:\n  " + "\n  ".join(lines)


def parse_recipe(raw: Any, source: str = "<dict>") -> Recipe:
    """Validate a recipe mapping (already parsed from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source} must be a YAML mapping of keys to values, got {type(raw).__name__}.")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(_format_errors(error, raw, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate the recipe at ``path``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} not found; pass the path of a YAML recipe, e.g. recipes/smollm2-probe.yaml.") from None
    except OSError as error:
        raise RecipeError(f"recipe file {path} cannot be read ({error.strerror}); pass the path of a readable YAML file.") from None
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"recipe file {path} is not valid UTF-8 YAML: {error}") from None
    if raw is None:
        logger.warning("recipe %s is empty; running with every default (see the recipe reference in README.md)", path)
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys to values, got {type(raw).__name__}.")
    return parse_recipe(apply_overrides(raw, overrides or []), str(path))
