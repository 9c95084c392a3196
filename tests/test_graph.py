import signal
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import HEAD_LAYOUTS
from pp_plugin.errors import UnsupportedModelError
from pp_plugin.graph import build_dependency_graph, extract_layer_groups, traceable


@pytest.fixture
def hang_guard():
    """Fail a test that runs over 60 s instead of hanging the suite (tracing can loop forever)."""

    def on_alarm(signum, frame):
        raise TimeoutError("dependency graph tracing did not finish within 60 s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS + [(2, 1)])
def test_groups_match_head_layout(tiny_llama, hang_guard, heads, kv_heads):
    model = tiny_llama(heads, kv_heads, layers=2)
    groups = extract_layer_groups(model, build_dependency_graph(model))

    assert len(groups) == 2
    attention = groups[1].attention
    assert attention.num_heads == heads
    assert attention.num_kv_heads == kv_heads
    assert torch.equal(attention.q_rows, torch.arange(heads * 8).view(heads, 8))
    assert torch.equal(attention.kv_of_head, torch.arange(heads) // (heads // kv_heads))
    assert torch.equal(attention.kv_rows, torch.arange(kv_heads * 8).view(kv_heads, 8))
    assert torch.equal(groups[1].mlp.gate_rows, torch.arange(96))
    assert torch.equal(groups[1].mlp.up_rows, torch.arange(96))
    assert groups[1].layer is model.model.layers[1]


def test_traceable_restores_model(tiny_llama):
    model = tiny_llama(4, 2, layers=1)
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotary = module.apply_rotary_pos_emb
    implementation = model.config._attn_implementation

    with pytest.raises(RuntimeError, match="inside"):
        with traceable(model):
            assert module.apply_rotary_pos_emb is not rotary
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("inside")

    assert module.apply_rotary_pos_emb is rotary
    assert model.config._attn_implementation == implementation
    assert model.config.use_cache is True


def test_unsupported_architecture_is_rejected():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        build_dependency_graph(model)
