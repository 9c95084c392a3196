"""Static structured pruning: physically remove heads and MLP channels, then save and reload.

:func:`apply_decisions` shrinks a LLaMA-style decoder in place with
torch-pruning's ``prune_linear_out_channels`` / ``prune_linear_in_channels`` on
q/k/v/o_proj and gate/up/down_proj, at the indices that the dependency graph
resolved into :class:`~pp_plugin.graph.LayerGroups`. Layers may end up with
different head counts and MLP widths, which a stock Hugging Face config cannot
describe, so the per-layer shapes are stored on ``config.pp_layer_shapes`` and
:func:`load_pruned` rebuilds the architecture from them.

Grouped-query attention: the o_proj group of torch-pruning 1.6.1 carries coarse
k/v indices (one query head maps onto its whole k/v head), so pruning that group
would also drop k/v heads that other kept query heads still read. This module
therefore prunes k/v rows itself, from the kept query heads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
import torch_pruning as tp
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.accelerate import init_empty_weights
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .errors import AssetError, PPPluginError, UnsupportedModelError
from .graph import LayerGroups, decoder_layers
from .runtime import LayerDecision

logger = logging.getLogger(__name__)

#: Config attribute that stores one dict of shapes per decoder layer.
LAYER_SHAPES_KEY = "pp_layer_shapes"

#: Weight files that :func:`load_pruned` or ``from_pretrained`` may read. A forced
#: save raises instead of leaving such files of an earlier save next to its own.
_WEIGHT_FILE_PATTERNS = ("*.safetensors", SAFE_WEIGHTS_INDEX_NAME, "pytorch_model*.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class _AttentionPlan:
    """Rows and columns to remove from one attention block, and its shapes afterwards."""

    removed_q_rows: list[int]
    removed_o_cols: list[int]
    removed_kv_rows: list[int]
    #: Rows of the already pruned k_proj/v_proj to gather, one block of head_dim
    #: rows per kept query head. None when GQA is kept.
    kv_copy_rows: torch.Tensor | None
    num_heads: int
    num_kv_heads: int


@dataclass(frozen=True)
class _MLPPlan:
    """Rows and columns to remove from one MLP block, and its width afterwards."""

    removed_gate_rows: list[int]
    removed_up_rows: list[int]
    removed_down_cols: list[int]
    intermediate_size: int


# -- pruning -----------------------------------------------------------------


def apply_decisions(
    model: PreTrainedModel,
    groups: list[LayerGroups],
    decisions: Mapping[int, LayerDecision],
    bias_compensation: Mapping[int, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
) -> None:
    """Prune ``model`` in place so that each layer in ``decisions`` keeps only its heads and channels.

    Query heads not in ``decision.heads`` lose their q_proj rows and o_proj
    columns, and MLP channels not in ``decision.channels`` lose their gate/up
    rows and down_proj columns. Key/value heads that no kept query head uses are
    removed. When every remaining k/v head serves the same number ``n`` of kept
    query heads, GQA is kept with ``num_key_value_groups = n``. Otherwise k_proj
    and v_proj are rewritten to contain one copy of the k/v head of each kept
    query head (``num_key_value_groups = 1``). That gives the same outputs but
    may leave more k/v rows than before. ``decision.kv_heads`` must contain every k/v
    head that a kept query head uses. Other k/v heads that it lists are
    removed as well.

    Every decision and compensation vector is checked before the model is
    changed. ``config.pp_layer_shapes`` is then set for all layers.

    Args:
        model: a supported causal LM (see :func:`~pp_plugin.graph.decoder_layers`).
        groups: the layer groups extracted from this model in its current shape.
            They are stale after this call, so extract them again before
            pruning the same model a second time.
        decisions: kept indices per decoder layer index. Layers absent here are
            not changed.
        bias_compensation: per layer index, ``(attention_bias, mlp_bias)``
            vectors of shape ``[hidden_size]`` added to the o_proj and down_proj
            bias (FLAP-style compensation of the removed channels' mean output).
            A bias is created where the Linear has none. Either vector may be None.

    Raises:
        PPPluginError: a decision or compensation vector is invalid, or names a
            layer that ``groups`` does not cover.
        UnsupportedModelError: the groups do not match the model's current
            shapes, or map heads onto rows out of order.
    """
    layers = decoder_layers(model)
    groups_by_layer = {group.layer_index: group for group in groups}
    missing = sorted(index for index in decisions if index not in groups_by_layer)
    if missing:
        raise PPPluginError(
            f"decisions name layers {missing} that have no LayerGroups. Pass the groups from "
            "extract_layer_groups for this model, which cover all of its decoder layers."
        )

    attention_plans: dict[int, _AttentionPlan] = {}
    mlp_plans: dict[int, _MLPPlan] = {}
    for index in sorted(decisions):
        group = groups_by_layer[index]
        _check_groups_current(group, layers)
        attention_plans[index] = _plan_attention(group, decisions[index])
        mlp_plans[index] = _plan_mlp(group, decisions[index])
    compensation = _check_compensation(bias_compensation or {}, layers)

    parameters_before = sum(parameter.numel() for parameter in model.parameters())
    with torch.no_grad():
        for index in attention_plans:
            layer = layers[index]
            _prune_attention(layer.self_attn, attention_plans[index])
            _prune_mlp(layer.mlp, mlp_plans[index])
        for index, (attention_bias, mlp_bias) in compensation.items():
            if attention_bias is not None:
                _add_output_bias(layers[index].self_attn.o_proj, attention_bias)
            if mlp_bias is not None:
                _add_output_bias(layers[index].mlp.down_proj, mlp_bias)

    setattr(model.config, LAYER_SHAPES_KEY, layer_shapes(model))
    parameters_after = sum(parameter.numel() for parameter in model.parameters())
    logger.info(
        "statically pruned %d decoder layers: %d -> %d parameters",
        len(attention_plans), parameters_before, parameters_after,
    )


def layer_shapes(model: PreTrainedModel) -> list[dict[str, int | bool]]:
    """Describe each decoder layer's current shapes, as stored in ``config.pp_layer_shapes``.

    Each entry contains ``num_heads``, ``num_kv_heads`` and ``intermediate_size``,
    read from the Linear weights, and ``o_proj_bias`` / ``down_proj_bias``, which
    flag whether those Linears have a bias (bias compensation adds one).
    """
    shapes = []
    for layer in decoder_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        head_dim = attention.head_dim
        shapes.append(
            {
                "num_heads": attention.q_proj.out_features // head_dim,
                "num_kv_heads": attention.k_proj.out_features // head_dim,
                "intermediate_size": mlp.down_proj.in_features,
                "o_proj_bias": attention.o_proj.bias is not None,
                "down_proj_bias": mlp.down_proj.bias is not None,
            }
        )
    return shapes


def _check_groups_current(group: LayerGroups, layers: nn.ModuleList) -> None:
    """Raise when ``group`` was extracted from another model or before an earlier pruning."""
    index = group.layer_index
    layer = layers[index] if 0 <= index < len(layers) else None
    attention = group.attention
    if layer is None or group.layer is not layer:
        raise UnsupportedModelError(
            f"LayerGroups for layer {index} belong to another model. Extract the groups from "
            "the model that is being pruned."
        )
    current = (
        layer.self_attn.o_proj.in_features,
        layer.self_attn.k_proj.out_features,
        layer.mlp.down_proj.in_features,
    )
    expected = (
        attention.num_heads * attention.head_dim,
        attention.num_kv_heads * attention.head_dim,
        group.mlp.num_channels,
    )
    if current != expected:
        raise UnsupportedModelError(
            f"LayerGroups for layer {index} describe (o_proj inputs, k_proj outputs, MLP width) "
            f"{expected} but the layer now has {current}, so the model was pruned after the groups "
            "were extracted. Run build_dependency_graph and extract_layer_groups again."
        )


def _kept_indices(values: torch.Tensor, total: int, name: str, layer_index: int) -> torch.Tensor:
    """Return ``values`` as a sorted CPU LongTensor after checking range and uniqueness."""
    tensor = torch.as_tensor(values)
    if tensor.ndim != 1 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise PPPluginError(
            f"layer {layer_index}: decision.{name} must be a 1-D integer tensor of indices, got "
            f"shape {tuple(tensor.shape)} and dtype {tensor.dtype}. Pass e.g. torch.tensor([0, 2, 5])."
        )
    tensor = tensor.to("cpu", torch.long)
    if tensor.numel() > 0 and (int(tensor.min()) < 0 or int(tensor.max()) >= total):
        raise PPPluginError(
            f"layer {layer_index}: decision.{name} {tensor.tolist()} contains indices outside "
            f"0..{total - 1}, because the layer has {total}."
        )
    unique = torch.unique(tensor)
    if unique.numel() != tensor.numel():
        raise PPPluginError(
            f"layer {layer_index}: decision.{name} {tensor.tolist()} contains duplicates. "
            "List each kept index once."
        )
    return unique


def _complement(kept: torch.Tensor, total: int) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return torch.arange(total)[mask]


def _check_ascending(rows: torch.Tensor, description: str, layer_index: int) -> None:
    """Raise unless ``rows`` increase strictly.

    torch-pruning keeps the remaining rows in ascending order, so the kept heads
    and channels stay in their original order only if their rows ascend too.
    """
    flat = rows.flatten()
    if flat.numel() > 1 and bool((flat[1:] <= flat[:-1]).any()):
        raise UnsupportedModelError(
            f"layer {layer_index}: the dependency graph maps the kept {description} out of order, "
            "so removing rows would permute them. Static pruning supports only the standard "
            "contiguous head and channel layout."
        )


def _plan_attention(group: LayerGroups, decision: LayerDecision) -> _AttentionPlan:
    layout = group.attention
    index = group.layer_index
    heads = _kept_indices(decision.heads, layout.num_heads, "heads", index)
    if heads.numel() == 0:
        raise PPPluginError(
            f"layer {index}: the decision keeps no query heads, and Hugging Face attention cannot "
            "run with zero heads. Keep at least one head in this layer."
        )
    kv_of_kept = layout.kv_of_head.cpu()[heads]
    used_kv = torch.unique(kv_of_kept)
    kv_heads = _kept_indices(decision.kv_heads, layout.num_kv_heads, "kv_heads", index)
    lacking = used_kv[~torch.isin(used_kv, kv_heads)]
    if lacking.numel() > 0:
        raise PPPluginError(
            f"layer {index}: decision.kv_heads {kv_heads.tolist()} lacks key/value heads "
            f"{lacking.tolist()} that the kept query heads {heads.tolist()} use. Add them, for "
            "example as the unique values of kv_of_head at the kept heads."
        )
    unused = kv_heads[~torch.isin(kv_heads, used_kv)]
    if unused.numel() > 0:
        logger.debug("layer %d: removing k/v heads %s that no kept query head uses", index, unused.tolist())

    q_rows, o_cols, kv_rows = layout.q_rows.cpu(), layout.o_cols.cpu(), layout.kv_rows.cpu()
    _check_ascending(q_rows[heads], "query heads' q_proj rows", index)
    _check_ascending(o_cols[heads], "query heads' o_proj columns", index)
    _check_ascending(kv_rows[used_kv], "key/value heads' k_proj/v_proj rows", index)

    # Kept heads ascend and kv_of_head is head // n_rep, so equal counts per k/v
    # head mean that kept head p reads k/v head p // n, the layout repeat_kv builds.
    per_kv = torch.bincount(kv_of_kept, minlength=layout.num_kv_heads)[used_kv]
    queries_per_kv = int(per_kv[0])
    balanced = torch.equal(kv_of_kept, used_kv.repeat_interleave(queries_per_kv))
    if balanced:
        kv_copy_rows = None
        num_kv_heads = used_kv.numel()
    else:
        position = torch.searchsorted(used_kv, kv_of_kept)
        kv_copy_rows = (position.unsqueeze(1) * layout.head_dim + torch.arange(layout.head_dim)).flatten()
        num_kv_heads = heads.numel()
        logger.debug(
            "layer %d: kept query heads per k/v head are uneven (%s), giving each kept head its "
            "own k/v copy", index, per_kv.tolist(),
        )

    pruned_heads = _complement(heads, layout.num_heads)
    pruned_kv = _complement(used_kv, layout.num_kv_heads)
    return _AttentionPlan(
        removed_q_rows=q_rows[pruned_heads].flatten().tolist(),
        removed_o_cols=o_cols[pruned_heads].flatten().tolist(),
        removed_kv_rows=kv_rows[pruned_kv].flatten().tolist(),
        kv_copy_rows=kv_copy_rows,
        num_heads=heads.numel(),
        num_kv_heads=num_kv_heads,
    )


def _plan_mlp(group: LayerGroups, decision: LayerDecision) -> _MLPPlan:
    layout = group.mlp
    index = group.layer_index
    channels = _kept_indices(decision.channels, layout.num_channels, "channels", index)
    gate_rows, up_rows, down_cols = layout.gate_rows.cpu(), layout.up_rows.cpu(), layout.down_cols.cpu()
    _check_ascending(gate_rows[channels], "MLP channels' gate_proj rows", index)
    _check_ascending(up_rows[channels], "MLP channels' up_proj rows", index)
    _check_ascending(down_cols[channels], "MLP channels' down_proj columns", index)
    pruned = _complement(channels, layout.num_channels)
    return _MLPPlan(
        removed_gate_rows=gate_rows[pruned].tolist(),
        removed_up_rows=up_rows[pruned].tolist(),
        removed_down_cols=down_cols[pruned].tolist(),
        intermediate_size=channels.numel(),
    )


def _check_compensation(
    compensation: Mapping[int, tuple[torch.Tensor | None, torch.Tensor | None]], layers: nn.ModuleList
) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]:
    checked = {}
    for index, vectors in compensation.items():
        if not 0 <= index < len(layers):
            raise PPPluginError(
                f"bias_compensation names layer {index}, but the model has {len(layers)} decoder "
                f"layers (indices 0..{len(layers) - 1})."
            )
        if not isinstance(vectors, (tuple, list)) or len(vectors) != 2:
            raise PPPluginError(
                f"bias_compensation[{index}] must be a pair (attention_bias, mlp_bias), got "
                f"{type(vectors).__name__}."
            )
        attention = layers[index].self_attn.o_proj
        mlp = layers[index].mlp.down_proj
        for vector, linear, name in ((vectors[0], attention, "attention_bias"), (vectors[1], mlp, "mlp_bias")):
            if vector is None:
                continue
            if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (linear.out_features,):
                shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
                raise PPPluginError(
                    f"bias_compensation[{index}] {name} has shape {shape}, but it must be a tensor of "
                    f"shape ({linear.out_features},), the hidden size."
                )
            if not vector.is_floating_point():
                raise PPPluginError(
                    f"bias_compensation[{index}] {name} has dtype {vector.dtype}. Pass a floating-point tensor."
                )
        checked[index] = (vectors[0], vectors[1])
    return checked


def _prune_attention(attention: nn.Module, plan: _AttentionPlan) -> None:
    if plan.removed_q_rows:
        tp.prune_linear_out_channels(attention.q_proj, plan.removed_q_rows)
        tp.prune_linear_in_channels(attention.o_proj, plan.removed_o_cols)
    if plan.removed_kv_rows:
        tp.prune_linear_out_channels(attention.k_proj, plan.removed_kv_rows)
        tp.prune_linear_out_channels(attention.v_proj, plan.removed_kv_rows)
    if plan.kv_copy_rows is not None:
        _gather_rows(attention.k_proj, plan.kv_copy_rows)
        _gather_rows(attention.v_proj, plan.kv_copy_rows)
    _set_attention_attributes(attention, plan.num_heads, plan.num_kv_heads)


def _prune_mlp(mlp: nn.Module, plan: _MLPPlan) -> None:
    if plan.removed_down_cols:
        tp.prune_linear_out_channels(mlp.gate_proj, plan.removed_gate_rows)
        tp.prune_linear_out_channels(mlp.up_proj, plan.removed_up_rows)
        tp.prune_linear_in_channels(mlp.down_proj, plan.removed_down_cols)
    _set_mlp_attributes(mlp, plan.intermediate_size)


def _gather_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Replace the weight (and bias) of ``linear`` by its rows at ``rows``, repeats allowed."""
    index = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, index), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, index), requires_grad=linear.bias.requires_grad)
    linear.out_features = index.numel()


def _set_attention_attributes(attention: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Set the head attributes that the attention forward reads.

    Transformers 4.57 LLaMA/Mistral/Qwen2 attention reshapes with ``-1`` heads
    and reads only ``num_key_value_groups`` (for ``repeat_kv``). Head-count
    attributes of other versions are updated when present.
    """
    attention.num_key_value_groups = num_heads // num_kv_heads
    for name, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if hasattr(attention, name):
            setattr(attention, name, value)


def _set_mlp_attributes(mlp: nn.Module, intermediate_size: int) -> None:
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size


def _add_output_bias(linear: nn.Linear, vector: torch.Tensor) -> None:
    value = vector.detach().to(device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(value.clone(), requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.add_(value)


# -- saving ------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike, force: bool = False) -> Path:
    """Check that :func:`save_pruned` may write to ``output_dir``, before any costly pruning.

    Returns:
        ``output_dir`` as a Path, with ``~`` expanded.

    Raises:
        PPPluginError: ``output_dir`` is a file, or a non-empty folder and ``force`` is false.
    """
    target = Path(output_dir).expanduser()
    if target.exists() and not target.is_dir():
        raise PPPluginError(f"output_dir {str(target)!r} is a file. Pass a folder path to save the model in.")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise PPPluginError(
            f"output_dir {str(target)!r} exists and is not empty. Choose a new folder, or pass "
            "--force (force=True) to overwrite the files that saving writes there."
        )
    return target


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    force: bool = False,
) -> Path:
    """Write ``model`` (safetensors, with ``config.pp_layer_shapes``) and ``tokenizer`` to ``output_dir``.

    Everything is first written to a temporary folder next to ``output_dir``.
    A new ``output_dir`` is then created by renaming that folder, so it appears
    complete or not at all. For an existing folder (empty, or non-empty with
    ``force``) each written file is moved in with ``os.replace``. Files there
    that this save does not write are kept.

    Returns:
        The path of ``output_dir``.

    Raises:
        PPPluginError: ``output_dir`` is a file, or a non-empty folder and
            ``force`` is false, or it keeps weight files of an earlier save that
            this save does not overwrite (they would be read on load), or
            writing failed.
    """
    target = check_output_dir(output_dir, force)
    setattr(model.config, LAYER_SHAPES_KEY, layer_shapes(model))

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # mkdir instead of tempfile.mkdtemp: the folder becomes output_dir, so it
        # gets the umask's permissions rather than mkdtemp's 0700.
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        staging.mkdir()
    except OSError as exc:
        raise PPPluginError(
            f"cannot create a temporary folder next to output_dir {str(target)!r}: {exc}. Check that "
            "the parent folder is writable."
        ) from exc

    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            _move_into(staging, target)
        else:
            os.rename(staging, target)
    except OSError as exc:
        raise PPPluginError(f"saving the pruned model to {str(target)!r} failed: {exc}.") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved the pruned model and tokenizer to %s", target)
    return target


def _move_into(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` into the existing folder ``target``, replacing same-named files."""
    written = {path.relative_to(staging) for path in staging.rglob("*") if path.is_file()}
    stale = sorted(
        path.relative_to(target)
        for pattern in _WEIGHT_FILE_PATTERNS
        for path in target.glob(pattern)
        if path.is_file() and path.relative_to(target) not in written
    )
    if stale:
        raise PPPluginError(
            f"output_dir {str(target)!r} contains weight files {[str(path) for path in stale]} that "
            "this save does not overwrite, and loading could read them instead of the new weights. "
            "Delete them or save to an empty folder."
        )
    for relative in sorted(written):
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / relative, destination)


# -- loading -----------------------------------------------------------------


def load_pruned(path: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model written by :func:`save_pruned` and its tokenizer, offline, in eval mode.

    The architecture is built from the config on the meta device, each layer's
    Linear modules and head attributes are resized to ``config.pp_layer_shapes``,
    and then every tensor of the safetensors file(s) is loaded with all keys and
    shapes checked. Only the output embedding may be missing, when it is tied to
    the input embedding. A folder whose config has no ``pp_layer_shapes`` is
    loaded with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        AssetError: the folder, its config.json, weights or tokenizer are
            missing or unreadable, the stored shapes are invalid, or a tensor is
            missing, unexpected or of the wrong shape.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AssetError(
            f"Pruned model folder {str(folder)!r} does not exist or is not a folder. Pass the "
            "output_dir that save_pruned wrote."
        )
    if not (folder / "config.json").is_file():
        raise AssetError(
            f"Pruned model folder {str(folder)!r} has no config.json. Pass a folder written by save_pruned."
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise AssetError(
            f"Reading the config or tokenizer in {str(folder)!r} failed: {exc}. Save the model "
            "again with save_pruned, which writes both."
        ) from exc

    shapes = getattr(config, LAYER_SHAPES_KEY, None)
    if shapes is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise AssetError(f"Loading the model in {str(folder)!r} failed: {exc}.") from exc
        return model.eval(), tokenizer

    weight_files = _weight_files(folder)
    _check_layer_shapes(shapes, config.num_hidden_layers, folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    try:
        layers = decoder_layers(model)
    except UnsupportedModelError as exc:
        raise AssetError(f"The model in {str(folder)!r} cannot be rebuilt with per-layer shapes: {exc}") from exc
    for layer, shape in zip(layers, shapes):
        _resize_layer(layer, shape)

    state = _read_weights(weight_files)
    _load_state_strictly(model, state, folder)
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config.name_or_path = str(folder)
    logger.info("loaded the pruned model in %s", folder)
    return model.eval(), tokenizer


def _weight_files(folder: Path) -> list[Path]:
    """Return the safetensors files of ``folder``: the single file, else the shards of the index."""
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise AssetError(
            f"Pruned model folder {str(folder)!r} has no {SAFE_WEIGHTS_NAME} or "
            f"{SAFE_WEIGHTS_INDEX_NAME}. Save the model again with save_pruned."
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"Reading the weight index {str(index)!r} failed: {exc}. Save the model again.") from exc
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [str(shard) for shard in shards if not shard.is_file()]
    if absent:
        raise AssetError(f"Weight shards {absent} listed in {str(index)!r} are missing. Save the model again.")
    return shards


def _check_layer_shapes(shapes: object, num_layers: int, folder: Path) -> None:
    source = str(folder / "config.json")
    if not isinstance(shapes, list) or len(shapes) != num_layers:
        raise AssetError(
            f"{LAYER_SHAPES_KEY} in {source!r} must be a list of {num_layers} entries, one per "
            "decoder layer. Save the model again with save_pruned."
        )
    for index, shape in enumerate(shapes):
        counts = [shape.get(key) if isinstance(shape, dict) else None
                  for key in ("num_heads", "num_kv_heads", "intermediate_size")]
        valid = all(isinstance(count, int) and not isinstance(count, bool) for count in counts)
        if valid:
            heads, kv_heads, width = counts
            valid = heads >= 1 and kv_heads >= 1 and width >= 0 and heads % kv_heads == 0
        if not valid:
            raise AssetError(
                f"{LAYER_SHAPES_KEY}[{index}] in {source!r} is invalid: {shape!r}. It needs integer num_heads "
                ">= 1, num_kv_heads >= 1 dividing num_heads, and intermediate_size >= 0. Save the "
                "model again with save_pruned."
            )


def _resize_layer(layer: nn.Module, shape: dict) -> None:
    """Replace the Linears of ``layer`` by empty ones of the stored shapes and set its attributes."""
    attention, mlp = layer.self_attn, layer.mlp
    head_dim = attention.head_dim
    heads, kv_heads, width = shape["num_heads"], shape["num_kv_heads"], shape["intermediate_size"]
    o_bias = bool(shape.get("o_proj_bias", attention.o_proj.bias is not None))
    down_bias = bool(shape.get("down_proj_bias", mlp.down_proj.bias is not None))

    attention.q_proj = _empty_linear(attention.q_proj, out_features=heads * head_dim)
    attention.k_proj = _empty_linear(attention.k_proj, out_features=kv_heads * head_dim)
    attention.v_proj = _empty_linear(attention.v_proj, out_features=kv_heads * head_dim)
    attention.o_proj = _empty_linear(attention.o_proj, in_features=heads * head_dim, bias=o_bias)
    mlp.gate_proj = _empty_linear(mlp.gate_proj, out_features=width)
    mlp.up_proj = _empty_linear(mlp.up_proj, out_features=width)
    mlp.down_proj = _empty_linear(mlp.down_proj, in_features=width, bias=down_bias)
    _set_attention_attributes(attention, heads, kv_heads)
    _set_mlp_attributes(mlp, width)


def _empty_linear(
    template: nn.Linear, in_features: int | None = None, out_features: int | None = None, bias: bool | None = None
) -> nn.Linear:
    """Return a Linear on the meta device shaped like ``template`` except for the given sizes."""
    return nn.Linear(
        template.in_features if in_features is None else in_features,
        template.out_features if out_features is None else out_features,
        bias=(template.bias is not None) if bias is None else bias,
        device="meta",
        dtype=template.weight.dtype,
    )


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(safetensors.torch.load_file(file))
        except (OSError, safetensors.SafetensorError) as exc:
            raise AssetError(f"Reading the weight file {str(file)!r} failed: {exc}. Save the model again.") from exc
    return state


def _tied_output_key(model: PreTrainedModel) -> str | None:
    """Return the state-dict key of the output embedding when it is tied to the input embedding."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is output:
            return f"{name}.weight"
    return None


def _load_state_strictly(model: PreTrainedModel, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Load ``state`` into the meta-device ``model`` by assignment, checking keys and shapes first."""
    expected = model.state_dict()
    tied = _tied_output_key(model)
    missing = sorted(key for key in expected if key not in state and key != tied)
    unexpected = sorted(key for key in state if key not in expected)
    if missing:
        raise AssetError(
            f"Weights in {str(folder)!r} are missing tensors {missing[:8]}"
            f"{' and more' if len(missing) > 8 else ''}, so the folder does not match its config. "
            "Save the model again with save_pruned."
        )
    if unexpected:
        raise AssetError(
            f"Weights in {str(folder)!r} contain tensors {unexpected[:8]}"
            f"{' and more' if len(unexpected) > 8 else ''} that the model built from config.json "
            "has no place for. Save the model again with save_pruned."
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise AssetError(
                f"Tensor {key!r} in {str(folder)!r} has shape {tuple(tensor.shape)}, but "
                f"{LAYER_SHAPES_KEY} in config.json gives {tuple(expected[key].shape)}, so the weights "
                "and config come from different saves. Save the model again with save_pruned."
            )

    model.load_state_dict(state, strict=False, assign=True)
    if tied is not None:
        model.tie_weights()
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if on_meta:
        raise AssetError(
            f"Tensors {on_meta[:8]} of the model in {str(folder)!r} were not loaded. Save the model "
            "again with save_pruned."
        )
