"""`rollshare bench train`'s loss check: our GRPO loss is TRL's GRPOTrainer loss on the same batch."""

import pytest

pytest.importorskip("trl")

from rollshare.bench.train import fixed_batch_losses  # noqa: E402


@pytest.mark.parametrize(
    "temperature, perturb",
    [(1.0, 0.0), (0.7, 0.3)],
    ids=["ratio-1", "temperature-0.7-clipped"],
)
def test_fixed_batch_loss_and_gradient_equal_trl_grpo_trainer(temperature, perturb):
    r = fixed_batch_losses("tiny-s", seed=0, temperature=temperature, perturb=perturb)
    assert r["abs_diff"] <= 1e-4, r
    assert r["grad_max_abs_diff"] <= 1e-5, r
    if perturb:
        assert r["clip_frac"] > 0, "the perturbed old log-probs should push some ratios out of the clip range"


def test_fixed_batch_check_notices_a_temperature_mismatch():
    r = fixed_batch_losses("tiny-s", seed=0, temperature=0.7, perturb=0.3, trl_temperature=1.0)
    assert r["abs_diff"] > 1e-3 and r["grad_max_abs_diff"] > 1e-3, r
