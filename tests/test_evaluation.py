"""Tests of pp_plugin.evaluation: next-token NLL, side-by-side evaluation and failure reporting."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from pydantic import BaseModel

from pp_plugin.errors import PPPluginError
from pp_plugin.evaluation import MethodResult, batch_negative_log_likelihood, evaluate_methods
from pp_plugin.methods import Calibration, PruningMethod, create_method


def direct_negative_log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Sum -log p(token t+1 | logits at t) with explicit loops, in float64."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    total = 0.0
    for row in range(input_ids.shape[0]):
        for position in range(input_ids.shape[1] - 1):
            total -= float(log_probs[row, position, input_ids[row, position + 1]])
    return total


class RatioConfig(BaseModel):
    pruning_ratio: float = 0.3


class PassThroughMethod(PruningMethod):
    """Runs the dense model and counts its forward calls."""

    name = "pass-through"

    def __init__(self):
        super().__init__(RatioConfig())
        self.calls = 0

    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        pass

    def forward(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return model(input_ids, use_cache=False).logits


class FailingMethod(PassThroughMethod):
    """Raises on forward call number ``fail_on_call`` (1 is the untimed warm-up call), or in prepare."""

    name = "failing"

    def __init__(self, fail_on_call: int = 1, fail_in_prepare: bool = False):
        super().__init__()
        self.fail_on_call = fail_on_call
        self.fail_in_prepare = fail_in_prepare

    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        if self.fail_in_prepare:
            raise ValueError("prepare failed on purpose")

    def forward(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        if self.calls + 1 >= self.fail_on_call:
            self.calls += 1
            raise RuntimeError(f"forward failed on purpose at call {self.calls}")
        return super().forward(model, input_ids)


@pytest.fixture
def model(tiny_llama):
    return tiny_llama(4, 2, layers=2)


@pytest.fixture
def calibration(token_ids):
    return Calibration(token_ids(2, 16), batch_size=2)


def evaluate(model, methods, calibration, test_windows, batch_size=2):
    return evaluate_methods(model, methods, calibration, test_windows, batch_size)


# ---------------------------------------------------------------------------
# batch_negative_log_likelihood.


def test_nll_matches_direct_sum():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator) * 3
    input_ids = torch.randint(0, 11, (3, 7), generator=generator)

    nll, tokens = batch_negative_log_likelihood(logits, input_ids)

    assert tokens == 3 * 6
    assert nll == pytest.approx(direct_negative_log_likelihood(logits, input_ids), rel=1e-5)


def test_nll_ignores_last_position_logits():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=generator)
    input_ids = torch.randint(0, 9, (2, 5), generator=generator)
    changed = logits.clone()
    changed[:, -1] = 100 * torch.randn(2, 9, generator=generator)

    assert batch_negative_log_likelihood(changed, input_ids)[0] == pytest.approx(
        batch_negative_log_likelihood(logits, input_ids)[0]
    )


def test_nll_ignores_first_token_target():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 9, generator=generator)
    input_ids = torch.randint(0, 9, (2, 5), generator=generator)
    changed = input_ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 9

    assert batch_negative_log_likelihood(logits, changed)[0] == pytest.approx(
        batch_negative_log_likelihood(logits, input_ids)[0]
    )


def test_nll_uniform_logits():
    logits = torch.zeros(2, 4, 16)
    input_ids = torch.randint(0, 16, (2, 4))

    nll, tokens = batch_negative_log_likelihood(logits, input_ids)

    assert tokens == 6
    assert nll == pytest.approx(6 * math.log(16))


def test_nll_half_precision_logits():
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 6, 10, generator=generator) * 4).to(torch.bfloat16)
    input_ids = torch.randint(0, 10, (2, 6), generator=generator)

    nll, _ = batch_negative_log_likelihood(logits, input_ids)

    assert nll == pytest.approx(direct_negative_log_likelihood(logits.float(), input_ids), rel=1e-5)


def test_nll_of_model_logits(model, token_ids):
    input_ids = token_ids(2, 12)
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits

    nll, tokens = batch_negative_log_likelihood(logits, input_ids)

    assert tokens == 2 * 11
    assert nll == pytest.approx(direct_negative_log_likelihood(logits, input_ids), rel=1e-5)


# ---------------------------------------------------------------------------
# evaluate_methods.


def test_dense_perplexity_matches_direct(model, calibration, token_ids):
    test_windows = token_ids(5, 12)
    with torch.no_grad():
        logits = model(test_windows, use_cache=False).logits
    expected = math.exp(direct_negative_log_likelihood(logits, test_windows) / (5 * 11))

    (dense,) = evaluate(model, [create_method({"name": "dense"})], calibration, test_windows)

    assert dense.error is None
    assert dense.tokens == 5 * 11
    assert dense.perplexity == pytest.approx(expected, rel=1e-4)
    assert len(dense.batch_perplexities) == 3


def test_dense_ratios_are_one(model, calibration, token_ids):
    (dense,) = evaluate(model, [create_method({"name": "dense"})], calibration, token_ids(4, 12))

    assert dense.latency_ratio == 1
    assert dense.flops_ratio == 1
    assert dense.latency_ms > 0
    assert dense.probe_flops_share is None


def test_failing_forward_reported(model, calibration, token_ids):
    failing = FailingMethod(fail_on_call=1)

    dense, failed = evaluate(model, [create_method({"name": "dense"}), failing], calibration, token_ids(4, 12))

    assert failed.method == "failing"
    assert failed.pruning_ratio == 0.3
    assert failed.error == "RuntimeError: forward failed on purpose at call 1"
    assert math.isnan(failed.perplexity)
    assert math.isnan(failed.latency_ms)
    assert failed.latency_ratio is None
    assert failed.flops_ratio is None
    assert failed.tokens == 0
    assert dense.error is None
    assert math.isfinite(dense.perplexity)
    assert math.isfinite(dense.latency_ms)
    assert dense.tokens == 4 * 11


def test_failure_listed_before_dense(model, calibration, token_ids):
    failing = FailingMethod(fail_on_call=1)

    failed, dense = evaluate(model, [failing, create_method({"name": "dense"})], calibration, token_ids(4, 12))

    assert failed.error is not None
    assert dense.error is None
    assert math.isfinite(dense.perplexity)


def test_failure_after_warmup_reported(model, calibration, token_ids):
    failing = FailingMethod(fail_on_call=3)

    dense, failed = evaluate(model, [create_method({"name": "dense"}), failing], calibration, token_ids(6, 12))

    assert failed.error == "RuntimeError: forward failed on purpose at call 3"
    assert math.isnan(failed.perplexity)
    assert failed.batch_perplexities == []
    assert dense.error is None
    assert dense.tokens == 6 * 11
    assert len(dense.batch_perplexities) == 3


def test_failing_method_not_called_again(model, calibration, token_ids):
    failing = FailingMethod(fail_on_call=1)

    evaluate(model, [create_method({"name": "dense"}), failing], calibration, token_ids(6, 12))

    assert failing.calls == 1


def test_failing_prepare_reported(model, calibration, token_ids):
    failing = FailingMethod(fail_in_prepare=True)

    dense, failed = evaluate(model, [create_method({"name": "dense"}), failing], calibration, token_ids(4, 12))

    assert failed.error == "ValueError: prepare failed on purpose"
    assert failing.calls == 0
    assert dense.error is None
    assert math.isfinite(dense.perplexity)


def test_failure_is_logged(model, calibration, token_ids, caplog):
    evaluate(model, [create_method({"name": "dense"}), FailingMethod()], calibration, token_ids(2, 12))

    assert "method failing failed on the warm-up batch" in caplog.text


def test_warmup_call_not_measured(model, calibration, token_ids):
    method = PassThroughMethod()

    (result,) = evaluate(model, [method], calibration, token_ids(6, 12))

    assert method.calls == 1 + 3
    assert len(result.batch_perplexities) == 3


def test_without_dense_no_latency_ratio(model, calibration, token_ids):
    (result,) = evaluate(model, [PassThroughMethod()], calibration, token_ids(4, 12))

    assert result.error is None
    assert math.isfinite(result.perplexity)
    assert result.latency_ratio is None
    assert result.flops_ratio == 1


@pytest.mark.parametrize("shape", [(0, 12), (12,), (1, 2, 12)])
def test_bad_test_windows_rejected(model, calibration, shape):
    with pytest.raises(PPPluginError) as caught:
        evaluate(model, [create_method({"name": "dense"})], calibration, torch.zeros(shape, dtype=torch.long))

    message = str(caught.value)
    assert f"got shape {shape}" in message
    assert "test_windows" in message


# ---------------------------------------------------------------------------
# MethodResult.to_dict.


def test_to_dict_nan_becomes_none():
    result = MethodResult(method="probe", pruning_ratio=0.4)

    as_dict = result.to_dict()

    assert as_dict["perplexity"] is None
    assert as_dict["latency_ms"] is None
    assert as_dict["latency_ratio"] is None
    assert as_dict["tokens"] == 0


def test_to_dict_keeps_numbers():
    result = MethodResult(
        method="probe", pruning_ratio=0.4, perplexity=12.5, latency_ms=3.0, latency_ratio=0.8,
        flops_ratio=0.7, tokens=62, batch_perplexities=[12.0, 13.0], error=None,
    )

    as_dict = result.to_dict()

    assert as_dict["method"] == "probe"
    assert as_dict["pruning_ratio"] == 0.4
    assert as_dict["perplexity"] == 12.5
    assert as_dict["latency_ms"] == 3.0
    assert as_dict["flops_ratio"] == 0.7
    assert as_dict["batch_perplexities"] == [12.0, 13.0]
    assert as_dict["error"] is None


def test_to_dict_is_strict_json():
    result = MethodResult(method="probe", pruning_ratio=0.4, error="RuntimeError: boom")

    text = json.dumps(result.to_dict(), allow_nan=False)

    assert json.loads(text)["error"] == "RuntimeError: boom"


def test_window_nll_sums_to_batch_nll():
    from pp_plugin.evaluation import window_negative_log_likelihoods

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 11, generator=generator)
    input_ids = torch.randint(0, 11, (3, 6), generator=generator)
    windows = window_negative_log_likelihoods(logits, input_ids)
    nll, _ = batch_negative_log_likelihood(logits, input_ids)
    assert windows.shape == (3,)
    assert float(windows.sum()) == pytest.approx(nll, rel=1e-5)
    single, _ = batch_negative_log_likelihood(logits[1:2], input_ids[1:2])
    assert float(windows[1]) == pytest.approx(single, rel=1e-5)
