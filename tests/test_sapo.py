"""SAPO: the sampler, group injection, need-aware selection, specialist warm-ups, the benchmark's smoke run.

Hand-computed where it matters: the merged group's advantages, the policy shaping of peer tokens.
"""

from __future__ import annotations

import collections
import json
import math
import random

import pytest
import torch

from rollshare.grpo import GRPOConfig, TrainBatch, add_merged_group, clipped_surrogate
from rollshare.node import SharedGroup
from rollshare.proto import rollout_pb2 as pb
from rollshare.sapo import (PAPER, FamilyRewards, Strategy, need_weight, pick_shared_groups,
                            specialist_mix)
from rollshare.store import RolloutStore
from rollshare.tasks import TaskSpec, regenerate


def task(index: int, family: str = "chain_sum"):
    return regenerate(TaskSpec.make(family, {}, 1, index))


def shared(index: int, rewards, origin: str = "peer", created: int = 1000, family: str = "chain_sum"):
    return SharedGroup(task=task(index, family), completions=["x"] * len(rewards), rewards=list(rewards),
                       origin=origin, created_at_ms=created)


def pick(cands, n, seed=0, strategy=PAPER, need=None, now=1000, max_age=10_000, me="me"):
    return pick_shared_groups(cands, n, random.Random(seed), now_ms=now, max_age_ms=max_age, self_origin=me,
                              strategy=strategy, need=need)


# ------------------------------------------------------------------------------ the sampler


def test_paper_sampler_drops_zero_advantage_groups_own_groups_and_groups_past_the_age_limit():
    cands = [shared(0, [1, 1, 1, 1]), shared(1, [0, 0, 0, 0]),  # all equal: zero advantage
             shared(2, [1, 0, 0, 0]), shared(3, [0, 1, 1, 0]),  # mixed: kept
             shared(4, [1, 0, 1, 0], origin="me"), shared(5, [1, 0, 1, 0], origin=""),  # ours
             shared(6, [1, 0, 1, 0], created=1000 - 10_001)]  # older than the window
    got = pick(cands, 10)
    assert sorted(g.task.spec.index for g in got) == [2, 3]
    assert pick(cands, 0) == []


def test_paper_sampler_is_uniform_over_the_qualifying_groups():
    cands = [shared(i, [1, 0]) for i in range(5)] + [shared(9, [1, 1])]
    counts = collections.Counter()
    for seed in range(4000):
        for g in pick(cands, 2, seed=seed):
            counts[g.task.spec.index] += 1
    assert set(counts) == set(range(5))
    for i in range(5):  # each of 5 is picked with probability 2/5: 1600 of 4000
        assert abs(counts[i] - 1600) < 150, counts


def test_swarm_sharing_rescores_and_never_uses_the_senders_rewards(tmp_path):
    from rollshare.sharing import SwarmSharing

    store = RolloutStore(tmp_path / "r.db", self_origin="me")
    t = task(3)

    def g(origin, texts, claimed, created):
        return pb.RolloutGroup(task=pb.TaskSpec(family="chain_sum", params_json="{}", seed=1, index=3,
                                                style="compact"),
                               completions=[pb.Completion(text=x, reward=r) for x, r in zip(texts, claimed)],
                               origin=origin, created_at_ms=created)

    # claims mixed rewards, but every completion is wrong: zero advantage for the receiver
    store.put(g("liar", ["nope", "no"], [1.0, 0.0], 5_000), origin="liar")
    # claims all zero, but one completion is right: mixed for the receiver
    store.put(g("modest", [t.answer, "no"], [0.0, 0.0], 5_000), origin="modest")
    # right and wrong, but too old for the window
    store.put(g("stale", [t.answer, "x"], [1.0, 0.0], 1_000), origin="stale")
    sharing = SwarmSharing(None, store, "me", window_s=2.0, clock=lambda: 6_000)
    got = sharing.sample_shared(5)
    assert [(s.origin, s.rewards) for s in got] == [("modest", [1.0, 0.0])]
    store.close()


# ----------------------------------------------------------------------------- injection


def test_injection_qualifies_all_correct_groups_that_the_paper_drops():
    inj = Strategy("inject")
    assert inj.qualifies([1, 1, 1]) and inj.qualifies([1, 0]) and not inj.qualifies([0, 0, 0])
    assert not PAPER.qualifies([1, 1, 1]) and PAPER.qualifies([1, 0])
    assert [g.task.spec.index for g in pick([shared(1, [1, 1, 1, 1])], 1, strategy=inj)] == [1]


def test_merged_group_advantages_put_a_peers_correct_answer_above_our_wrong_ones():
    # ours: 3 wrong; the peer's: 1 right → rewards [0,0,0,1], mean 1/4, unbiased std 1/2
    b = TrainBatch()
    assert add_merged_group(b, [7, 8], ([[1], [2], [3]], [[-1.0], [-1.0], [-1.0]], [0, 0, 0]),
                            ([[4]], [[-2.0]], [1.0]), GRPOConfig())
    assert [it.advantage for it in b.items] == pytest.approx([-0.5, -0.5, -0.5, 1.5], abs=1e-6)
    assert [it.off_policy for it in b.items] == [False, False, False, True]
    # all equal once merged: nothing to learn, dropped
    b2 = TrainBatch()
    assert not add_merged_group(b2, [7], ([[1]], [[0.0]], [1.0]), ([[2]], [[0.0]], [1.0]))
    assert b2.groups_dropped == 1 and not b2.items
    # γ = 0: the peer's tokens keep the clipped ratio (behaviour = our own log-probs)
    b3 = TrainBatch()
    add_merged_group(b3, [7], ([[1]], [[0.0]], [0.0]), ([[2]], [[0.0]], [1.0]), GRPOConfig(offpolicy_gamma=0.0))
    assert not any(it.off_policy for it in b3.items)


def test_policy_shaping_of_peer_tokens_matches_hand_computation_and_is_never_clipped():
    gamma = 0.1
    p = 0.05  # a token the receiver finds unlikely
    logp = torch.tensor([[math.log(p)]], requires_grad=True)
    old = torch.tensor([[math.log(p) - 3.0]])  # ratio e^3: would be clipped if on-policy
    adv, mask = torch.tensor([2.0]), torch.tensor([[1.0]])
    loss, _ = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, torch.tensor([True]), gamma)
    assert float(loss.detach()) == pytest.approx(-2.0 * p / (p + gamma), abs=1e-6)  # −Â f(p), no clip at 1.28
    loss.backward()
    # d/dlogp of −Â p/(p+γ) = −Â γ p/(p+γ)²
    assert float(logp.grad) == pytest.approx(-2.0 * gamma * p / (p + gamma) ** 2, abs=1e-6)
    # the same token on-policy is clipped at 1 + ε_high: no gradient
    logp2 = torch.tensor([[math.log(p)]], requires_grad=True)
    loss2, stats = clipped_surrogate(logp2, old, adv, mask, 0.2, 0.28, torch.tensor([False]), gamma)
    assert float(loss2.detach()) == pytest.approx(-2.0 * 1.28, abs=1e-6) and stats["clip_frac"] == 1.0
    loss2.backward()
    assert float(logp2.grad) == 0.0


# ---------------------------------------------------------------------------- need-aware


def test_need_weight_prefers_families_we_fail_and_groups_the_peer_solves():
    rates = {"chain_sum": 0.9, "spell_backward": 0.0}
    assert need_weight("spell_backward", [1, 1, 1, 1], rates) > need_weight("chain_sum", [1, 1, 1, 1], rates)
    assert need_weight("spell_backward", [1, 1, 1, 1], rates) > need_weight("spell_backward", [1, 0, 0, 0], rates)
    assert need_weight("spell_backward", [0, 0], rates) > 0  # the floor: never impossible
    assert need_weight("base_conversion", [1, 1], rates) == pytest.approx(0.02 + 0.5)  # unknown family: 0.5


def test_need_aware_sampler_picks_the_needed_family_far_more_often():
    need = Strategy("inject_need")
    cands = [shared(i, [1, 1, 1, 1], family="chain_sum") for i in range(4)]
    cands += [shared(i, [1, 1, 1, 1], family="spell_backward") for i in range(4)]
    rates = {"chain_sum": 0.95, "spell_backward": 0.05}
    picked = collections.Counter(g.task.spec.family for s in range(300) for g in pick(cands, 1, s, need, rates))
    assert picked["spell_backward"] > 8 * picked["chain_sum"], picked
    uniform = collections.Counter(g.task.spec.family for s in range(300) for g in pick(cands, 1, s, Strategy("inject")))
    assert 100 < uniform["spell_backward"] < 200


def test_family_rewards_keep_a_moving_window_per_family():
    fr = FamilyRewards(window=4)
    fr.add("a", [1, 1, 1, 1])
    fr.add("a", [0, 0])
    fr.add("b", [0.5])
    assert fr.rates() == {"a": 0.5, "b": 0.5}


def test_unknown_strategy_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="paper"):
        Strategy("magic")


# -------------------------------------------------------------------------- specialists


def test_specialist_mix_puts_most_weight_on_the_nodes_own_family():
    from rollshare.tasks import parse_mix

    fams = ["chain_sum", "spell_backward", "base_conversion"]
    mix = parse_mix(specialist_mix(fams, 4, focus=0.8))  # k wraps around: node 4 → spell_backward
    assert mix["spell_backward"] == pytest.approx(0.8) and mix["chain_sum"] == pytest.approx(0.1)


def test_node_warms_up_on_warmup_tasks_not_the_training_mix(tmp_path):
    from rollshare.config import ConfigError, NodeConfig
    from rollshare.node import Node

    base = dict(model="tiny-s", warmup_steps=2, tasks="chain_sum,spell_backward", status="off", network=False)
    names = []
    for warm in ("", "spell_backward:9,chain_sum:1"):
        with Node(NodeConfig(data_dir=tmp_path / f"n{len(names)}", warmup_tasks=warm, **base),
                  show_progress=False) as node:
            names.append(node.policy.name)
            assert set(node.mix) == {"chain_sum", "spell_backward"}  # trains on the full mix either way
    assert names[0] != names[1]  # the warm-up mix is part of the cached model's key
    with pytest.raises(ConfigError, match="--warmup-tasks"):
        NodeConfig(warmup_tasks="nope", **base).validate()
