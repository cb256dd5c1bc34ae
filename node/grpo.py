"""GRPO as SAPO used it, in one readable step.

For each group of G completions of one question with rewards r_1..r_G:

    Â_i      = (r_i − mean(r)) / (std(r) + 1e-8)           group-normalised advantage
    ρ_i,t    = exp(log π_θ(o_i,t) − log π_old(o_i,t))       ratio against behaviour log-probs
    L_i,t    = −min(ρ_i,t Â_i, clip(ρ_i,t, 1−ε_low, 1+ε_high) Â_i)   asymmetric clip (DAPO)
    L        = Σ_i,t L_i,t / Σ_i |o_i|                      token-mean over the whole batch
             (+ β · KL_k3(π_θ ‖ π_ref) per token when β > 0; off by default as in SAPO)

Groups whose rewards are all equal have Â = 0 everywhere and are dropped before the step.
Then one AdamW step with gradient-norm clipping. Nothing here knows where a group came from
(own or shared): the sampler decides that and hands over a `TrainBatch`.

SAPO group injection (see sapo.py) adds one case: a *merged* group, our G completions of a
question plus a peer's K completions of it, normalised together (Â over all G + K rewards).
The peer's tokens are off-policy with unknown behaviour probability, so for them the clipped
ratio is replaced by LUFFY's policy shaping with μ := 1 (Yan et al. 2025):

    L_i,t    = −f(π_θ(o_i,t)) Â_i,   f(p) = p / (p + γ)        off-policy tokens, no clip

With γ = 0 they are treated as the paper treats shared groups instead: behaviour log-probs
= our own, detached (ratio 1 at the step), and the usual clipped surrogate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from rollshare.policies import Policy


@dataclass(frozen=True)
class GRPOConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0  # KL coefficient; 0 = no reference model (SAPO's setting)
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # must equal the sampling temperature
    adv_eps: float = 1e-8
    offpolicy_gamma: float = 0.1  # γ of the policy shaping f(p) = p / (p + γ) for injected peer tokens


@dataclass
class TrainItem:
    """One completion ready for the loss: tokens, behaviour log-probs, advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]
    advantage: float
    ref_logprobs: list[float] | None = None
    off_policy: bool = False  # a peer's completion merged into our group (policy shaping, no ratio)


@dataclass
class TrainBatch:
    items: list[TrainItem] = field(default_factory=list)
    groups_used: int = 0
    groups_dropped: int = 0  # all-equal rewards: zero advantage, nothing to learn

    def __len__(self) -> int:
        return len(self.items)


def group_advantages(rewards: Sequence[float], eps: float = 1e-8) -> list[float]:
    """Â_i = (r_i − mean) / (std + eps), std unbiased as torch.std."""
    r = torch.tensor(list(rewards), dtype=torch.float64)
    if r.numel() < 2:
        return [0.0] * r.numel()
    return ((r - r.mean()) / (r.std() + eps)).tolist()


def has_signal(rewards: Sequence[float]) -> bool:
    """A group teaches something only if its rewards differ."""
    return len(rewards) > 1 and max(rewards) != min(rewards)


def add_group(batch: TrainBatch, prompt_ids: Sequence[Sequence[int]] | Sequence[int],
              completion_ids: Sequence[Sequence[int]], old_logprobs: Sequence[Sequence[float]],
              rewards: Sequence[float], cfg: GRPOConfig = GRPOConfig()) -> bool:
    """Append one group to the batch, or count it as dropped. Returns True if used."""
    if not has_signal(rewards):
        batch.groups_dropped += 1
        return False
    adv = group_advantages(rewards, cfg.adv_eps)
    for i, (c, lp, a) in enumerate(zip(completion_ids, old_logprobs, adv)):
        p = prompt_ids[i] if prompt_ids and isinstance(prompt_ids[0], (list, tuple)) else prompt_ids
        batch.items.append(TrainItem(list(p), list(c), list(lp), float(a)))
    batch.groups_used += 1
    return True


def add_merged_group(batch: TrainBatch, prompt_ids: Sequence[int],
                     own: tuple[Sequence[Sequence[int]], Sequence[Sequence[float]], Sequence[float]],
                     peer: tuple[Sequence[Sequence[int]], Sequence[Sequence[float]], Sequence[float]],
                     cfg: GRPOConfig = GRPOConfig()) -> bool:
    """SAPO group injection: our (ids, behaviour log-probs, rewards) and a peer's for the same
    question, advantages normalised over all of them together; the peer's items are off-policy."""
    rewards = list(own[2]) + list(peer[2])
    if not has_signal(rewards):
        batch.groups_dropped += 1
        return False
    adv = group_advantages(rewards, cfg.adv_eps)
    n_own = len(own[2])
    shaped = cfg.offpolicy_gamma > 0
    for i, (c, lp) in enumerate(list(zip(own[0], own[1])) + list(zip(peer[0], peer[1]))):
        batch.items.append(TrainItem(list(prompt_ids), list(c), list(lp), float(adv[i]),
                                     off_policy=shaped and i >= n_own))
    batch.groups_used += 1
    return True


def _pad(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                      eps_low: float, eps_high: float, off_policy: torch.Tensor | None = None,
                      gamma: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped surrogate, reduced by token mean. Shapes: [B, T], adv [B], off_policy [B] bool."""
    ratio = torch.exp(logp - old_logp)  # ρ
    a = adv.unsqueeze(1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
    per_token = -torch.min(unclipped, clipped)
    if off_policy is not None and bool(off_policy.any()):
        p = torch.exp(logp)
        shaped = -(p / (p + gamma)) * a  # LUFFY policy shaping, μ := 1, no clip
        per_token = torch.where(off_policy.unsqueeze(1), shaped, per_token)
    n = mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / n  # token-mean over the batch
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps_low) & (a < 0)) | ((ratio > 1.0 + eps_high) & (a > 0))
        on = mask if off_policy is None else mask * (~off_policy).float().unsqueeze(1)
        n_on = on.sum().clamp(min=1.0)
        stats = {
            "clip_frac": float((is_clipped.float() * on).sum() / n_on),
            "ratio_mean": float((ratio * on).sum() / n_on),
        }
    return loss, stats


def grpo_loss(policy: Policy, batch: TrainBatch, cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch under the current policy (with grad)."""
    items = batch.items
    logp, mask = policy.token_logprobs([it.prompt_ids for it in items], [it.completion_ids for it in items],
                                       temperature=cfg.temperature, grad=True)
    T = logp.shape[1]
    old = _pad([it.old_logprobs for it in items], T).to(logp.device)
    adv = torch.tensor([it.advantage for it in items], dtype=torch.float32, device=logp.device)
    off = torch.tensor([it.off_policy for it in items], dtype=torch.bool, device=logp.device)
    loss, stats = clipped_surrogate(logp, old, adv, mask, cfg.eps_low, cfg.eps_high, off, cfg.offpolicy_gamma)
    if cfg.beta > 0:
        if any(it.ref_logprobs is None for it in items):
            raise ValueError("beta > 0 needs reference log-probs for every item")
        ref = _pad([it.ref_logprobs for it in items], T).to(logp.device)
        # k3 estimator: exp(ref − logp) − (ref − logp) − 1 ≥ 0
        kl = torch.exp(ref - logp) - (ref - logp) - 1.0
        kl_mean = (kl * mask).sum() / mask.sum().clamp(min=1.0)
        loss = loss + cfg.beta * kl_mean
        stats["kl"] = float(kl_mean)
    stats["tokens"] = float(mask.sum())
    return loss, stats


def grpo_step(policy: Policy, batch: TrainBatch, cfg: GRPOConfig) -> dict[str, float]:
    """One GRPO update. An empty batch (every group dropped) is a no-op."""
    if not batch.items:
        return {"loss": 0.0, "grad_norm": 0.0, "tokens": 0.0, "clip_frac": 0.0, "ratio_mean": 1.0}
    loss, stats = grpo_loss(policy, batch, cfg)
    stats["grad_norm"] = policy.optimizer_step(loss, cfg.max_grad_norm)
    stats["loss"] = float(loss.detach())
    return stats
