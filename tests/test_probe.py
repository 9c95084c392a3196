import math

import torch

from pp_plugin.probe import ProbeConfig, full_batch_probe, select_probe


def _residual(batch=20, length=16, hidden=8, seed=0):
    return torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(seed))


def test_tokens_first_matches_direct_computation():
    residual = _residual()
    mask = torch.ones(20, 16, dtype=torch.bool)
    probe = select_probe(residual, mask, ProbeConfig(sample_ratio=0.1, token_ratio=0.5))

    importance = residual.norm(dim=-1)
    positions = importance.norm(dim=0).topk(8).indices.sort().values
    samples = importance[:, positions].norm(dim=1).topk(2).indices.sort().values
    assert torch.equal(probe.positions, positions)
    assert torch.equal(probe.samples, samples)
    assert probe.mask.all()


def test_samples_first_matches_direct_computation():
    residual = _residual(seed=3)
    mask = torch.ones(20, 16, dtype=torch.bool)
    probe = select_probe(residual, mask, ProbeConfig(sample_ratio=0.1, token_ratio=0.25, order="samples-first"))

    importance = residual.norm(dim=-1)
    samples = importance.norm(dim=1).topk(2).indices.sort().values
    positions = importance[samples].norm(dim=0).topk(4).indices.sort().values
    assert torch.equal(probe.samples, samples)
    assert torch.equal(probe.positions, positions)


def test_default_probe_size_follows_ceil_rules():
    probe = select_probe(_residual(20, 10), torch.ones(20, 10, dtype=torch.bool), ProbeConfig())
    assert probe.samples.numel() == math.ceil(0.05 * 20)
    assert probe.positions.numel() == max(math.ceil(0.5 * 10), 2)

    short = select_probe(_residual(3, 2), torch.ones(3, 2, dtype=torch.bool), ProbeConfig(token_ratio=0.1))
    assert short.positions.numel() == 2


def test_padded_tokens_are_never_selected():
    residual = _residual(4, 12)
    residual[:, 8:] *= 100  # padded positions with huge norms must still lose
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[:, 8:] = False
    probe = select_probe(residual, mask, ProbeConfig(sample_ratio=0.5, token_ratio=1.0))
    assert probe.positions.max() < 8
    assert probe.positions.numel() == 8


def test_appended_padding_keeps_selection():
    residual = _residual(6, 10)
    mask = torch.ones(6, 10, dtype=torch.bool)
    padded_residual = torch.cat([residual, torch.randn(6, 5, 8) * 50], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(6, 5, dtype=torch.bool)], dim=1)
    config = ProbeConfig(sample_ratio=0.3, token_ratio=0.5)

    plain = select_probe(residual, mask, config)
    padded = select_probe(padded_residual, padded_mask, config)
    assert torch.equal(plain.positions, padded.positions)
    assert torch.equal(plain.samples, padded.samples)


def test_probe_take_broadcasts_shared_batch_dimension():
    probe = select_probe(_residual(4, 6), torch.ones(4, 6, dtype=torch.bool), ProbeConfig(sample_ratio=0.5))
    shared = torch.arange(6).view(1, 6, 1).float()
    taken = probe.take(shared)
    assert taken.shape == (2, probe.positions.numel(), 1)
    assert torch.equal(taken[1, :, 0], probe.positions.float())


def test_full_batch_probe_covers_batch():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    probe = full_batch_probe(mask)
    assert torch.equal(probe.samples, torch.arange(2))
    assert torch.equal(probe.positions, torch.arange(3))
    assert torch.equal(probe.mask, mask)
