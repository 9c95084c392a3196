"""Probe Pruning on the real SmolLM2-135M and Brown text (slow: fetches and runs the real model)."""

import math

import pytest
import torch

from pp_plugin.data import load_text, token_windows
from pp_plugin.evaluation import evaluate_methods
from pp_plugin.methods import Calibration, create_method
from pp_plugin.models import load_model

pytestmark = pytest.mark.slow


def test_probe_pruning_beats_random_selection():
    model, tokenizer = load_model("smollm2-135m")
    calibration = token_windows(tokenizer, load_text("brown", "calibration"), 256, 16)
    test = token_windows(tokenizer, load_text("brown", "test"), 256, 8)
    methods = [
        create_method({"name": "dense"}),
        create_method({"name": "probe", "pruning_ratio": 0.4}),
        create_method({"name": "random", "pruning_ratio": 0.4}),
    ]
    dense, probe, random = evaluate_methods(model, methods, Calibration(calibration, 8), test, batch_size=8)

    for result in (dense, probe, random):
        assert result.error is None
        assert math.isfinite(result.perplexity)
    assert dense.perplexity < 100
    assert dense.perplexity < probe.perplexity < random.perplexity
    assert probe.flops_ratio < 0.85
    assert torch.isfinite(torch.tensor(probe.batch_perplexities)).all()
