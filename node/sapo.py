"""SAPO: which shared groups a node trains on, and how it uses them.

SAPO (Gensyn, "Sharing is Caring", arXiv 2509.08721) trains each node on I groups of its own
plus J groups sampled from what others shared. This module holds the choices a node makes
about those J groups; the trainer (`grpo.py`) and the round loop (`node.py`) call into it.

**The paper's sampler** (`pick_shared_groups` with `Strategy("paper")`): from the groups other
origins shared inside the age window, re-scored by the receiver from the regenerated task,
drop those whose rewards are all equal (zero group-relative advantage: they teach nothing),
then sample J uniformly without replacement. The sender's claimed rewards are never read.

**Why the paper's sampler does not pay on tiny specialists** (measured, ../shared/ANCHORS.md):
a strong specialist's groups are mostly all-correct, hence zero-advantage, hence dropped; the
few mixed groups it sends are on questions the receiver could learn from alone. A receiver
that gets 0 % on a family never sees a correct answer of its own, so GRPO has no signal there,
and a correct answer from a peer, on its own, carries no *relative* advantage either.

**Group injection** (`inject` strategies): the receiver regenerates the shared question from
its spec, samples its own G completions for it, and merges the peer's completions into that
group *before* the group-relative advantage. A peer's correct answer to a question the
receiver fails now stands next to the receiver's wrong ones and gets a large positive
advantage (and the receiver's wrong answers a negative one): the "aha" path. For the sampler,
a group qualifies for injection when at least one of its completions earns a reward (there is
something to imitate); all-correct groups, which the paper's filter drops, are the best ones.

The peer's completions are off-policy: sampled from a policy we do not have, possibly with
another tokenizer, so their behaviour probabilities μ are unknown (a sender's claimed
log-probs are unverifiable and in its own tokens). We follow LUFFY ("Learning to Reason under
Off-Policy Guidance", Yan et al. 2025), which faces the same problem with an external
teacher: set μ := 1 (the text was "given") and replace the clipped ratio of those tokens by
the *policy shaping* f(π_θ) = π_θ / (π_θ + γ), γ = 0.1, with no clip. Its gradient,
γ π_θ / (π_θ + γ)² · ∇log π_θ, is bounded (≤ 1/4 of the on-policy ∇log π_θ, largest at
π_θ = γ) and does not vanish for tokens the receiver finds unlikely — exactly the tokens it
must learn — while it fades for tokens already near-certain, which keeps entropy from
collapsing onto the peer's text. Setting γ = 0 (`--offpolicy-shaping 0`) gives the paper's
treatment instead: behaviour log-probs are the receiver's own, detached (ratio 1 at the step,
the usual clip afterwards), i.e. a reward-weighted likelihood with no importance weighting.
The receiver's own completions in a merged group stay on-policy and keep the clipped ratio.

**Shaped sharing** (`shaped`): the paper's sampler and groups, but the shared completions'
tokens get the same policy shaping as injected ones instead of ratio 1. Measured: with ratio 1,
the more shared groups, the lower the reward (2/6 lost 60 % of its reward over 200 rounds).
Off-policy, the advantage-weighted log-likelihood of another policy's samples is no policy
gradient: its negative part pushes down tokens the receiver would rarely produce, with full
weight. The shaping's gradient vanishes as π_θ → 0, which removes most of that bias.

**Need-aware selection** (`need` strategies): sample the J groups with probability ∝
`need_weight`: (1 − the receiver's recent own reward on the group's family) × the group's
success rate as re-scored by the receiver (never the sender's claim), plus a small floor so
that nothing is impossible. A node that already solves a family, or a group with no correct
answer, is rarely picked.

This module never touches torch, the network or the store; every function here is pure given
its arguments (the rng included).
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from rollshare.node import SharedGroup

#: strategy name -> (selection, use): use is "group" (the paper), "shaped" or "inject"
STRATEGIES: dict[str, tuple[str, str]] = {
    "paper": ("uniform", "group"),   # SAPO as published: drop zero-advantage, uniform, train as a group
    "need": ("need", "group"),       # need-aware selection, groups used as the paper does
    "shaped": ("uniform", "shaped"),  # the paper's sampler, shared tokens policy-shaped instead of ratio 1
    "inject": ("uniform", "inject"),  # uniform over groups with a correct answer, merged into our own group
    "inject_need": ("need", "inject"),  # need-aware selection + injection
}
NEED_FLOOR = 0.02  # weight every qualifying group keeps, so need-aware sampling never starves a family
UNKNOWN_RATE = 0.5  # the receiver's reward on a family it has not tried yet


@dataclass(frozen=True)
class Strategy:
    """How a node picks and uses shared groups (see the module doc)."""

    name: str = "paper"

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown SAPO strategy {self.name!r}; choose from {', '.join(STRATEGIES)}")

    @property
    def selection(self) -> str:
        return STRATEGIES[self.name][0]

    @property
    def inject(self) -> bool:
        return STRATEGIES[self.name][1] == "inject"

    @property
    def shaped(self) -> bool:
        """Shared completions' tokens get the policy shaping of injected ones (as their own group)."""
        return STRATEGIES[self.name][1] == "shaped"

    def qualifies(self, rewards: Sequence[float]) -> bool:
        """Whether a re-scored shared group can teach anything under this strategy."""
        if not rewards:
            return False
        if self.inject:
            return max(rewards) > 0  # something to imitate; our own completions supply the contrast
        return len(rewards) > 1 and max(rewards) != min(rewards)  # paper: non-zero group advantage


PAPER = Strategy("paper")


def success_rate(rewards: Sequence[float]) -> float:
    return sum(rewards) / len(rewards) if rewards else 0.0


def need_weight(family: str, group_rewards: Sequence[float], receiver_rates: Mapping[str, float],
                floor: float = NEED_FLOOR) -> float:
    """(1 − receiver's recent reward on the family) × the group's re-scored success rate, + floor."""
    mine = receiver_rates.get(family, UNKNOWN_RATE)
    return floor + max(0.0, 1.0 - mine) * success_rate(group_rewards)


def pick_shared_groups(candidates: Iterable[SharedGroup], n: int, rng: random.Random, *, now_ms: int,
                       max_age_ms: int, self_origin: str, strategy: Strategy = PAPER,
                       need: Mapping[str, float] | None = None) -> list[SharedGroup]:
    """Up to n shared groups for the batch: the SAPO sampler.

    1. keep groups from *other* origins created within `max_age_ms` of `now_ms`;
    2. drop those that cannot teach (`Strategy.qualifies` on the receiver's re-scored rewards:
       the paper drops all-equal groups);
    3. sample n without replacement: uniformly, or with `need_weight` for need-aware strategies
       (`need`: the receiver's recent reward per family).
    """
    if n <= 0:
        return []
    pool = [g for g in candidates
            if g.origin and g.origin != self_origin and now_ms - g.created_at_ms <= max_age_ms
            and strategy.qualifies(g.rewards)]
    if strategy.selection == "uniform" or len(pool) <= n:
        return rng.sample(pool, min(n, len(pool)))
    weights = [need_weight(g.task.spec.family, g.rewards, need or {}) for g in pool]
    return _weighted_sample(pool, weights, n, rng)


def _weighted_sample(items: list, weights: list[float], n: int, rng: random.Random) -> list:
    """n items without replacement, each draw ∝ weight among those left (successive sampling)."""
    items, weights = list(items), list(weights)
    out = []
    while items and len(out) < n:
        k = rng.choices(range(len(items)), weights)[0]
        out.append(items.pop(k))
        weights.pop(k)
    return out


class FamilyRewards:
    """The node's own recent reward per task family (a moving window of completions)."""

    def __init__(self, window: int = 256):
        self.window = window
        self._r: dict[str, collections.deque[float]] = {}

    def add(self, family: str, rewards: Sequence[float]) -> None:
        self._r.setdefault(family, collections.deque(maxlen=self.window)).extend(float(r) for r in rewards)

    def rates(self) -> dict[str, float]:
        return {f: sum(d) / len(d) for f, d in self._r.items() if d}


def specialist_mix(families: Sequence[str], k: int, focus: float = 0.9) -> str:
    """The warm-up mix of specialist k: `focus` of the weight on family k % len, the rest spread evenly."""
    fams = list(families)
    if len(fams) == 1:
        return fams[0]
    own = fams[k % len(fams)]
    rest = (1.0 - focus) / (len(fams) - 1)
    return ",".join(f"{f}:{focus if f == own else rest:.6g}" for f in fams)
