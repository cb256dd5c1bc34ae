"""GRPO pieces on hand-computed cases."""

import math

import pytest
import torch

from rollshare.grpo import TrainBatch, add_group, clipped_surrogate, group_advantages, has_signal


def test_group_advantage_matches_hand_computation():
    # rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3)
    adv = group_advantages([1, 0, 0, 1])
    s = math.sqrt(1 / 3)
    assert adv == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], abs=1e-6)
    assert sum(adv) == pytest.approx(0.0, abs=1e-12)


def test_all_equal_groups_are_dropped():
    b = TrainBatch()
    assert not has_signal([1, 1, 1]) and not has_signal([0.0, 0.0])
    assert add_group(b, [1, 2], [[3], [4], [5]], [[-1.0], [-1.0], [-1.0]], [1, 1, 1]) is False
    assert b.groups_dropped == 1 and len(b) == 0
    assert add_group(b, [1, 2], [[3], [4]], [[-1.0], [-1.0]], [1, 0]) is True
    assert b.groups_used == 1 and len(b) == 2


def _surrogate(logp, old, adv, mask, lo=0.2, hi=0.28):
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return clipped_surrogate(t(logp), t(old), t(adv), t(mask), lo, hi)


def test_ratio_one_gives_minus_mean_advantage_per_token():
    # two sequences: 2 tokens with A=+1, 1 token (plus a pad) with A=-2 → token mean = -(1+1-2)/3
    loss, stats = _surrogate([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [1.0, -2.0], [[1, 1], [1, 0]])
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clip_frac"] == 0.0


def test_positive_advantage_is_clipped_at_one_plus_eps_high():
    # ratio e^0.5 = 1.6487 > 1.28 with A=+1 → objective uses 1.28, loss = -1.28
    loss, stats = _surrogate([[0.5]], [[0.0]], [1.0], [[1]])
    assert float(loss) == pytest.approx(-1.28, abs=1e-6)
    assert stats["clip_frac"] == 1.0


def test_negative_advantage_is_clipped_at_one_minus_eps_low():
    # ratio e^-0.5 = 0.6065 < 0.8 with A=-1 → min(-0.6065, -0.8) = -0.8 → loss +0.8
    loss, stats = _surrogate([[-0.5]], [[0.0]], [-1.0], [[1]])
    assert float(loss) == pytest.approx(0.8, abs=1e-6)
    assert stats["clip_frac"] == 1.0


def test_unclipped_side_keeps_the_raw_ratio():
    # ratio e^0.5 with A=-1: min(-1.6487, -1.28) = -1.6487 → loss 1.6487 (pessimistic bound)
    loss, _ = _surrogate([[0.5]], [[0.0]], [-1.0], [[1]])
    assert float(loss) == pytest.approx(math.exp(0.5), abs=1e-5)
    # inside the trust region nothing is clipped: ratio e^0.1, A=2 → loss -2 e^0.1
    loss, stats = _surrogate([[0.1]], [[0.0]], [2.0], [[1]])
    assert float(loss) == pytest.approx(-2 * math.exp(0.1), abs=1e-5)
    assert stats["clip_frac"] == 0.0


def test_clipped_tokens_carry_no_gradient():
    logp = torch.tensor([[0.5, 0.05]], requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.28)
    loss.backward()
    assert logp.grad[0, 0] == 0.0  # clipped
    assert logp.grad[0, 1] == pytest.approx(-math.exp(0.05) / 2, abs=1e-6)  # d(-ρA/2)/dlogp
