"""One evaluation run of a recipe: load model and data, calibrate, measure every method."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .data import load_text, token_windows
from .errors import AssetError
from .graph import decoder_layers
from .evaluation import MethodResult, evaluate_methods
from .methods import Calibration, PruningMethod, create_method
from .models import load_model, model_fingerprint
from .recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class Report:
    """Results of one run, with the model and data they were measured on."""

    model: str
    data: dict
    results: list[MethodResult]

    def to_dict(self) -> dict:
        """Return the JSON layout written by ``pp-prune eval --json``."""
        return {
            "model": self.model,
            "data": self.data,
            "results": [result.to_dict() for result in self.results],
        }


def prepare_windows(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``[N, T]`` calibration and test windows of the recipe's data."""
    data = recipe.data
    windows = []
    splits = (
        (data.calibration_split, data.calibration_windows, data.calibration_sampling),
        (data.test_split, data.test_windows, data.test_sampling),
    )
    for split, count, sampling in splits:
        text = load_text(data.dataset, split)
        windows.append(token_windows(tokenizer, text, data.seq_len, count, seed=data.seed, sampling=sampling))
        logger.info("%s split %r: %d windows of %d tokens", data.dataset, split, count, data.seq_len)
    return windows[0], windows[1]


@dataclass
class Workspace:
    """Model, tokenizer and windows of a recipe, loaded once and shared by several runs."""

    model: torch.nn.Module
    tokenizer: object
    calibration: Calibration
    test_windows: torch.Tensor


def open_workspace(recipe: Recipe) -> Workspace:
    """Load the recipe's model and data and describe its calibration for the history cache."""
    model, tokenizer = load_model(recipe.model)
    decoder_layers(model)  # rejects an unsupported architecture before any data is read
    calibration_windows, test_windows = prepare_windows(recipe, tokenizer)
    largest_id = int(max(calibration_windows.max(), test_windows.max()))
    if largest_id >= model.config.vocab_size:
        raise AssetError(
            f"the tokenizer of {recipe.model!r} produced token id {largest_id}, but the model's vocabulary "
            f"has {model.config.vocab_size} entries; save the model and its own tokenizer in one folder."
        )
    data = recipe.data
    cache_key = {
        "model": model_fingerprint(model),
        "dataset": data.dataset,
        "split": data.calibration_split,
        "seq_len": data.seq_len,
        "windows": data.calibration_windows,
        "sampling": data.calibration_sampling,
        "seed": data.seed,
        "batch_size": data.batch_size,
        "token_id_sum": int(calibration_windows.sum()),  # changes when the text or tokenizer changes
    }
    return Workspace(model, tokenizer, Calibration(calibration_windows, data.batch_size, cache_key), test_windows)


def run_methods(recipe: Recipe, methods: list[PruningMethod], workspace: Workspace | None = None) -> Report:
    """Evaluate ``methods`` side by side on the recipe's test windows."""
    workspace = workspace or open_workspace(recipe)
    results = evaluate_methods(
        workspace.model, methods, workspace.calibration, workspace.test_windows, recipe.data.batch_size
    )
    return Report(model=recipe.model, data=recipe.data.model_dump(), results=results)


def run_evaluation(recipe: Recipe) -> Report:
    """Evaluate the dense model and the recipe's method on the same test windows."""
    methods = [create_method({"name": "dense"})]
    if recipe.method.name != "dense":
        methods.append(create_method(recipe.method))
    return run_methods(recipe, methods)
