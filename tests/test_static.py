"""Static pruning: shrunk models against masked dense models, and the save/load round trip."""

import copy
import json

import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import HEAD_LAYOUTS
from pp_plugin.errors import AssetError, PPPluginError, UnsupportedModelError
from pp_plugin.graph import build_dependency_graph, extract_layer_groups
from pp_plugin.runtime import LayerDecision
from pp_plugin.static import apply_decisions, check_output_dir, layer_shapes, load_pruned, save_pruned

HEAD_DIM = 8
CHANNELS = 96
#: GQA layouts where kept query heads can be spread unevenly over several k/v heads.
UNEVEN_LAYOUTS = [(heads, kv_heads) for heads, kv_heads in HEAD_LAYOUTS if 1 < kv_heads < heads]
CASES = [(heads, kv_heads, "balanced") for heads, kv_heads in HEAD_LAYOUTS] + [
    (heads, kv_heads, "uneven") for heads, kv_heads in UNEVEN_LAYOUTS
]


@pytest.fixture
def word_tokenizer():
    """A 128-token word-level tokenizer ("t0" .. "t127") built in memory, so no download is needed."""
    model = WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t1", eos_token="t2")


def layer_groups(model):
    return extract_layer_groups(model, build_dependency_graph(model))


def balanced_decision(heads, kv_heads, seed=0):
    """Drop one k/v head (when there are several) and one query head of every kept k/v head (when n_rep > 1)."""
    generator = torch.Generator().manual_seed(seed)
    n_rep = heads // kv_heads
    kept_kv = torch.randperm(kv_heads, generator=generator)[: max(1, kv_heads - 1)].sort().values
    per_kv = max(1, n_rep - 1)
    kept_heads = []
    for kv in kept_kv.tolist():
        members = torch.randperm(n_rep, generator=generator)[:per_kv] + kv * n_rep
        kept_heads.extend(members.tolist())
    channels = torch.randperm(CHANNELS, generator=generator)[:60].sort().values
    return LayerDecision(torch.tensor(sorted(kept_heads)), kept_kv, channels)


def uneven_decision(heads, kv_heads, seed=0):
    """Keep every query head of k/v head 0 and one query head of k/v head 1."""
    generator = torch.Generator().manual_seed(seed)
    n_rep = heads // kv_heads
    kept_heads = list(range(n_rep)) + [n_rep + 1]
    channels = torch.randperm(CHANNELS, generator=generator)[:40].sort().values
    return LayerDecision(torch.tensor(kept_heads), torch.tensor([0, 1]), channels)


def make_decisions(heads, kv_heads, kind):
    """Return decisions for layers 1 and 2 of a 3-layer model. Layer 0 stays dense."""
    if kind == "balanced":
        return {1: balanced_decision(heads, kv_heads, seed=1), 2: balanced_decision(heads, kv_heads, seed=2)}
    return {1: uneven_decision(heads, kv_heads, seed=1), 2: balanced_decision(heads, kv_heads, seed=2)}


def masked_dense(model, decisions, bias_compensation=None):
    """Copy ``model`` with the o_proj columns of pruned heads and down_proj columns of pruned channels zeroed."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for index, decision in decisions.items():
            attention, mlp = masked.model.layers[index].self_attn, masked.model.layers[index].mlp
            head_mask = torch.ones(attention.o_proj.in_features // HEAD_DIM, dtype=torch.bool)
            head_mask[decision.heads] = False
            attention.o_proj.weight[:, head_mask.repeat_interleave(HEAD_DIM)] = 0
            channel_mask = torch.ones(mlp.down_proj.in_features, dtype=torch.bool)
            channel_mask[decision.channels] = False
            mlp.down_proj.weight[:, channel_mask] = 0
        for index, (attention_bias, mlp_bias) in (bias_compensation or {}).items():
            layer = masked.model.layers[index]
            layer.self_attn.o_proj.bias = torch.nn.Parameter(attention_bias.clone())
            layer.mlp.down_proj.bias = torch.nn.Parameter(mlp_bias.clone())
    return masked


def padded_batch(token_ids):
    """Return ids [3, 10] and an attention mask where the last row has 3 left pads."""
    ids = token_ids(3, 10)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    return ids, mask


def parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


def kv_heads_after(decision, heads, kv_heads):
    """Return the k/v head count after pruning: used k/v heads if balanced, else one per kept query head."""
    kv_of_kept = decision.heads // (heads // kv_heads)
    counts = torch.bincount(kv_of_kept)
    counts = counts[counts > 0]
    return counts.numel() if bool((counts == counts[0]).all()) else decision.heads.numel()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("heads,kv_heads,kind", CASES)
def test_pruned_logits_match_masked_dense(tiny_llama, token_ids, heads, kv_heads, kind, implementation):
    model = tiny_llama(heads, kv_heads, layers=3)
    decisions = make_decisions(heads, kv_heads, kind)
    reference = masked_dense(model, decisions)
    apply_decisions(model, layer_groups(model), decisions)
    model.set_attn_implementation(implementation)
    reference.set_attn_implementation(implementation)

    ids, mask = padded_batch(token_ids)
    with torch.no_grad():
        pruned_logits = model(ids, attention_mask=mask).logits
        reference_logits = reference(ids, attention_mask=mask).logits
        unpadded_pruned = model(ids[:2]).logits
        unpadded_reference = reference(ids[:2]).logits

    real = mask.bool()
    torch.testing.assert_close(pruned_logits[real], reference_logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unpadded_pruned, unpadded_reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,kind", CASES)
def test_pruned_shapes_and_attributes(tiny_llama, heads, kv_heads, kind):
    model = tiny_llama(heads, kv_heads, layers=3)
    decisions = make_decisions(heads, kv_heads, kind)
    apply_decisions(model, layer_groups(model), decisions)

    for index, decision in decisions.items():
        layer = model.model.layers[index]
        attention = layer.self_attn
        kept = decision.heads.numel()
        kv_after = kv_heads_after(decision, heads, kv_heads)
        assert attention.q_proj.weight.shape == (kept * HEAD_DIM, 8 * heads)
        assert attention.k_proj.weight.shape == (kv_after * HEAD_DIM, 8 * heads)
        assert attention.v_proj.weight.shape == (kv_after * HEAD_DIM, 8 * heads)
        assert attention.o_proj.weight.shape == (8 * heads, kept * HEAD_DIM)
        assert attention.num_key_value_groups == kept // kv_after
        assert layer.mlp.intermediate_size == decision.channels.numel()
        assert layer.mlp.down_proj.in_features == decision.channels.numel()

    shapes = model.config.pp_layer_shapes
    assert len(shapes) == 3
    assert shapes[0]["num_heads"] == heads
    assert shapes[0]["num_kv_heads"] == kv_heads
    assert shapes[0]["intermediate_size"] == CHANNELS
    assert shapes[1]["num_heads"] == decisions[1].heads.numel()
    assert shapes[1]["num_kv_heads"] == kv_heads_after(decisions[1], heads, kv_heads)
    assert shapes[2]["intermediate_size"] == decisions[2].channels.numel()
    assert shapes == layer_shapes(model)


def test_uneven_decision_copies_kv_rows(tiny_llama):
    model = tiny_llama(9, 3, layers=2)
    original_k = model.model.layers[1].self_attn.k_proj.weight.detach().clone()
    decision = LayerDecision(torch.tensor([0, 1, 2, 4]), torch.tensor([0, 1]), torch.arange(CHANNELS))
    apply_decisions(model, layer_groups(model), {1: decision})

    k_proj = model.model.layers[1].self_attn.k_proj
    expected_kv = [0, 0, 0, 1]
    expected = torch.cat([original_k[kv * HEAD_DIM:(kv + 1) * HEAD_DIM] for kv in expected_kv])
    assert torch.equal(k_proj.weight, expected)
    assert k_proj.out_features == 4 * HEAD_DIM
    assert model.model.layers[1].self_attn.num_key_value_groups == 1


@pytest.mark.parametrize("heads,kv_heads,kind", CASES)
def test_parameter_count_drops_by_removed_weights(tiny_llama, heads, kv_heads, kind):
    model = tiny_llama(heads, kv_heads, layers=3)
    hidden = 8 * heads
    decisions = make_decisions(heads, kv_heads, kind)
    before = parameter_count(model)
    apply_decisions(model, layer_groups(model), decisions)

    removed = 0
    for decision in decisions.values():
        pruned_heads = heads - decision.heads.numel()
        removed += 2 * pruned_heads * HEAD_DIM * hidden  # q_proj rows and o_proj columns
        removed += 2 * (kv_heads - kv_heads_after(decision, heads, kv_heads)) * HEAD_DIM * hidden  # k/v rows
        removed += 3 * (CHANNELS - decision.channels.numel()) * hidden  # gate/up rows, down_proj columns
    assert parameter_count(model) == before - removed


def test_parameter_count_for_9_3_balanced(tiny_llama):
    model = tiny_llama(9, 3, layers=2)
    before = parameter_count(model)
    # Keep heads 0, 1 (k/v head 0) and 6, 7 (k/v head 2): 5 query heads and 1 k/v head go.
    decision = LayerDecision(torch.tensor([0, 1, 6, 7]), torch.tensor([0, 2]), torch.arange(64))
    apply_decisions(model, layer_groups(model), {1: decision})

    hidden = 72
    removed = 2 * 5 * 8 * hidden + 2 * 1 * 8 * hidden + 3 * 32 * hidden
    assert parameter_count(model) == before - removed
    assert model.model.layers[1].self_attn.num_key_value_groups == 2


@pytest.mark.parametrize("heads,kv_heads,kind", CASES)
def test_save_load_round_trip(tiny_llama, token_ids, word_tokenizer, tmp_path, heads, kv_heads, kind):
    model = tiny_llama(heads, kv_heads, layers=3)
    decisions = make_decisions(heads, kv_heads, kind)
    apply_decisions(model, layer_groups(model), decisions)
    save_pruned(model, word_tokenizer, tmp_path / "pruned")
    loaded, tokenizer = load_pruned(tmp_path / "pruned")

    assert not loaded.training
    assert loaded.config.pp_layer_shapes == model.config.pp_layer_shapes
    assert tokenizer.pad_token == "t1"
    for original, reloaded in zip(model.model.layers, loaded.model.layers):
        assert reloaded.self_attn.num_key_value_groups == original.self_attn.num_key_value_groups
        assert reloaded.mlp.intermediate_size == original.mlp.intermediate_size
    ids, mask = padded_batch(token_ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)

    settings = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 1}
    cache = DynamicCache(config=loaded.config)
    reloaded_tokens = loaded.generate(ids, past_key_values=cache, **settings)
    in_memory_tokens = model.generate(ids, **settings)
    uncached_tokens = loaded.generate(ids, use_cache=False, **settings)
    assert reloaded_tokens.shape == (3, 16)
    assert torch.equal(reloaded_tokens, in_memory_tokens)
    assert torch.equal(reloaded_tokens, uncached_tokens)
    for index, shape in enumerate(loaded.config.pp_layer_shapes):
        assert cache.layers[index].keys.shape[1] == shape["num_kv_heads"]


def test_untied_lm_head_round_trip(tiny_llama, word_tokenizer, tmp_path):
    model = tiny_llama(4, 2, layers=2)
    apply_decisions(model, layer_groups(model), {1: balanced_decision(4, 2)})
    save_pruned(model, word_tokenizer, tmp_path / "pruned")
    loaded, _ = load_pruned(tmp_path / "pruned")

    assert model.config.tie_word_embeddings is False
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not any(parameter.is_meta for parameter in loaded.parameters())


def test_round_trip_with_tied_embeddings(token_ids, word_tokenizer, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=CHANNELS, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    apply_decisions(model, layer_groups(model), {1: balanced_decision(4, 2)})
    save_pruned(model, word_tokenizer, tmp_path / "pruned")
    loaded, _ = load_pruned(tmp_path / "pruned")

    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = token_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_zero_mlp_channels_remove_mlp(tiny_llama, token_ids):
    model = tiny_llama(4, 4, layers=2)
    decisions = {1: LayerDecision(torch.tensor([0, 3]), torch.tensor([0, 3]), torch.tensor([], dtype=torch.long))}
    reference = masked_dense(model, decisions)
    apply_decisions(model, layer_groups(model), decisions)

    assert model.model.layers[1].mlp.down_proj.weight.shape == (32, 0)
    ids = token_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
def test_bias_compensation_adds_output_bias(tiny_llama, token_ids, word_tokenizer, tmp_path, heads, kv_heads):
    model = tiny_llama(heads, kv_heads, layers=3)
    hidden = 8 * heads
    generator = torch.Generator().manual_seed(3)
    compensation = {
        1: (torch.randn(hidden, generator=generator), torch.randn(hidden, generator=generator)),
        2: (torch.randn(hidden, generator=generator), torch.randn(hidden, generator=generator)),
    }
    decisions = make_decisions(heads, kv_heads, "balanced")
    reference = masked_dense(model, decisions, compensation)
    apply_decisions(model, layer_groups(model), decisions, bias_compensation=compensation)

    for index, (attention_bias, mlp_bias) in compensation.items():
        layer = model.model.layers[index]
        assert torch.equal(layer.self_attn.o_proj.bias, attention_bias)
        assert torch.equal(layer.mlp.down_proj.bias, mlp_bias)
        assert layer.self_attn.q_proj.bias is None
    assert model.model.layers[0].self_attn.o_proj.bias is None
    ids = token_ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)

    save_pruned(model, word_tokenizer, tmp_path / "pruned")
    loaded, _ = load_pruned(tmp_path / "pruned")
    assert torch.equal(loaded.model.layers[1].self_attn.o_proj.bias, compensation[1][0])
    assert loaded.model.layers[0].mlp.down_proj.bias is None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bias_compensation_adds_to_existing_bias(tiny_llama):
    model = tiny_llama(4, 4, layers=2)
    first = torch.full((32,), 0.5)
    second = torch.full((32,), 0.25)
    decision = LayerDecision(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.arange(80))
    apply_decisions(model, layer_groups(model), {1: decision}, bias_compensation={1: (first, None)})
    again = LayerDecision(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.arange(64))
    apply_decisions(model, layer_groups(model), {1: again}, bias_compensation={1: (second, first)})

    layer = model.model.layers[1]
    assert torch.equal(layer.self_attn.o_proj.bias, torch.full((32,), 0.75))
    assert torch.equal(layer.mlp.down_proj.bias, first)
    assert layer.self_attn.q_proj.out_features == 16


def test_save_into_non_empty_dir_needs_force(tiny_llama, word_tokenizer, tmp_path):
    model = tiny_llama(4, 2, layers=2)
    apply_decisions(model, layer_groups(model), {1: balanced_decision(4, 2)})
    output = tmp_path / "pruned"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")

    with pytest.raises(PPPluginError, match="--force") as raised:
        save_pruned(model, word_tokenizer, output)
    assert str(output) in str(raised.value)
    assert sorted(path.name for path in output.iterdir()) == ["notes.txt"]
    assert (output / "notes.txt").read_text() == "keep me"

    save_pruned(model, word_tokenizer, output, force=True)
    assert (output / "notes.txt").read_text() == "keep me"
    assert (output / "model.safetensors").is_file()
    save_pruned(model, word_tokenizer, output, force=True)
    loaded, _ = load_pruned(output)
    assert loaded.config.pp_layer_shapes == model.config.pp_layer_shapes
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]


def test_save_into_empty_dir(tiny_llama, word_tokenizer, tmp_path):
    model = tiny_llama(4, 4, layers=1)
    output = tmp_path / "empty"
    output.mkdir()

    assert save_pruned(model, word_tokenizer, output) == output
    assert (output / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]


def test_forced_save_rejects_stale_weight_shards(tiny_llama, word_tokenizer, tmp_path):
    model = tiny_llama(4, 4, layers=1)
    output = tmp_path / "pruned"
    output.mkdir()
    (output / "model-00001-of-00002.safetensors").write_bytes(b"old")

    with pytest.raises(PPPluginError, match="model-00001-of-00002.safetensors"):
        save_pruned(model, word_tokenizer, output, force=True)
    assert sorted(path.name for path in output.iterdir()) == ["model-00001-of-00002.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]


def test_save_to_file_path_raises(tiny_llama, word_tokenizer, tmp_path):
    target = tmp_path / "model.txt"
    target.write_text("not a folder")

    with pytest.raises(PPPluginError, match="is a file"):
        save_pruned(tiny_llama(4, 4, layers=1), word_tokenizer, target, force=True)


def test_load_without_weights_names_path(tiny_llama, word_tokenizer, tmp_path):
    model = tiny_llama(4, 2, layers=2)
    apply_decisions(model, layer_groups(model), {1: balanced_decision(4, 2)})
    output = tmp_path / "pruned"
    save_pruned(model, word_tokenizer, output)
    (output / "model.safetensors").unlink()

    with pytest.raises(AssetError, match="model.safetensors") as raised:
        load_pruned(output)
    assert str(output) in str(raised.value)


def test_load_missing_folder_or_config(tmp_path):
    with pytest.raises(AssetError, match="does not exist") as raised:
        load_pruned(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(raised.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="no config.json"):
        load_pruned(tmp_path / "empty")


def test_load_shape_mismatch_names_tensor(tiny_llama, word_tokenizer, tmp_path):
    model = tiny_llama(4, 2, layers=2)
    apply_decisions(model, layer_groups(model), {1: balanced_decision(4, 2)})
    output = tmp_path / "pruned"
    save_pruned(model, word_tokenizer, output)
    weights = safetensors.torch.load_file(output / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 32)
    safetensors.torch.save_file(weights, output / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(AssetError, match="model.layers.1.mlp.up_proj.weight"):
        load_pruned(output)


def test_load_missing_tensor_names_tensor(tiny_llama, word_tokenizer, tmp_path):
    model = tiny_llama(4, 2, layers=2)
    output = tmp_path / "pruned"
    save_pruned(model, word_tokenizer, output)
    weights = safetensors.torch.load_file(output / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    safetensors.torch.save_file(weights, output / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(AssetError, match="model.layers.0.self_attn.k_proj.weight"):
        load_pruned(output)


def test_load_invalid_layer_shapes(tiny_llama, word_tokenizer, tmp_path):
    output = tmp_path / "pruned"
    save_pruned(tiny_llama(4, 2, layers=2), word_tokenizer, output)
    config = json.loads((output / "config.json").read_text())
    config["pp_layer_shapes"][1]["num_kv_heads"] = 3
    (output / "config.json").write_text(json.dumps(config))

    with pytest.raises(AssetError, match=r"pp_layer_shapes\[1\]"):
        load_pruned(output)


def test_load_plain_folder_uses_from_pretrained(tiny_llama, token_ids, word_tokenizer, tmp_path):
    model = tiny_llama(4, 2, layers=2)
    model.save_pretrained(tmp_path / "plain")
    word_tokenizer.save_pretrained(tmp_path / "plain")
    loaded, _ = load_pruned(tmp_path / "plain")

    assert not hasattr(loaded.config, "pp_layer_shapes")
    ids = token_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "decision,message",
    [
        (LayerDecision(torch.tensor([0, 9]), torch.tensor([0]), torch.arange(96)), "outside 0..8"),
        (LayerDecision(torch.tensor([], dtype=torch.long), torch.tensor([0]), torch.arange(96)), "no query heads"),
        (LayerDecision(torch.tensor([1, 1]), torch.tensor([0]), torch.arange(96)), "duplicates"),
        (LayerDecision(torch.tensor([0, 4]), torch.tensor([0]), torch.arange(96)), r"lacks key/value heads \[1\]"),
        (LayerDecision(torch.tensor([0.0]), torch.tensor([0]), torch.arange(96)), "integer tensor"),
        (LayerDecision(torch.tensor([0]), torch.tensor([0]), torch.tensor([96])), "outside 0..95"),
    ],
)
def test_invalid_decision_leaves_model_unchanged(tiny_llama, decision, message):
    model = tiny_llama(9, 3, layers=2)
    groups = layer_groups(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    with pytest.raises(PPPluginError, match=message):
        apply_decisions(model, groups, {0: balanced_decision(9, 3), 1: decision})
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not hasattr(model.config, "pp_layer_shapes")


def test_invalid_bias_compensation_raises(tiny_llama):
    model = tiny_llama(4, 4, layers=2)
    decisions = {1: balanced_decision(4, 4)}

    with pytest.raises(PPPluginError, match=r"shape \(31,\)"):
        apply_decisions(model, layer_groups(model), decisions, bias_compensation={1: (torch.zeros(31), None)})
    with pytest.raises(PPPluginError, match="layer 5"):
        apply_decisions(model, layer_groups(model), decisions, bias_compensation={5: (None, None)})
    assert model.model.layers[1].self_attn.q_proj.out_features == 32


def test_stale_groups_raise(tiny_llama):
    model = tiny_llama(4, 4, layers=2)
    groups = layer_groups(model)
    apply_decisions(model, groups, {1: balanced_decision(4, 4)})

    with pytest.raises(UnsupportedModelError, match="extract_layer_groups again"):
        apply_decisions(model, groups, {1: balanced_decision(4, 4, seed=5)})


def test_decision_for_unknown_layer_raises(tiny_llama):
    model = tiny_llama(4, 4, layers=2)

    with pytest.raises(PPPluginError, match=r"layers \[7\]"):
        apply_decisions(model, layer_groups(model), {7: balanced_decision(4, 4)})


def test_check_output_dir_before_pruning(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")

    assert check_output_dir(tmp_path / "new") == tmp_path / "new"
    assert check_output_dir(tmp_path / "used", force=True) == tmp_path / "used"
    with pytest.raises(PPPluginError, match="--force"):
        check_output_dir(tmp_path / "used")
    assert not (tmp_path / "new").exists()
