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
from rollshare.sapo import PAPER, FamilyRewards, Strategy, need_weight, pick_shared_groups, specialist_mix
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

    base = {"model": "tiny-s", "warmup_steps": 2, "tasks": "chain_sum,spell_backward", "status": "off",
            "network": False}
    names = []
    for warm in ("", "spell_backward:9,chain_sum:1"):
        with Node(NodeConfig(data_dir=tmp_path / f"n{len(names)}", warmup_tasks=warm, **base),
                  show_progress=False) as node:
            names.append(node.policy.name)
            assert set(node.mix) == {"chain_sum", "spell_backward"}  # trains on the full mix either way
    assert names[0] != names[1]  # the warm-up mix is part of the cached model's key
    with pytest.raises(ConfigError, match="--warmup-tasks"):
        NodeConfig(warmup_tasks="nope", **base).validate()


# ------------------------------------------------------------------ injection, end to end


class _Teacher:
    """A Sharing that hands out a peer's all-correct groups on spell_backward (a family the node never saw)."""

    def __init__(self):
        from rollshare.tasks import TaskDrawer

        self.drawer = TaskDrawer({"spell_backward": 1.0}, seed=7)

    def publish(self, groups) -> None:
        pass

    def sample_shared(self, n, policy=None, *, strategy=PAPER, need=None):
        out = []
        for t in self.drawer.draw(n):
            g = SharedGroup(task=t, completions=[t.answer] * 4, rewards=[1.0] * 4, origin="teacher", created_at_ms=1)
            if strategy.qualifies(g.rewards):
                out.append(g)
        return out


def test_injected_correct_answers_teach_a_family_the_node_fails_where_the_paper_path_cannot(tmp_path,
                                                                                            tiny_policy_dir):
    """A chain_sum-only node gets a peer's all-correct spell_backward groups. The paper drops them
    (zero advantage); injection merges them with the node's own wrong answers and the node's
    log-likelihood of held-out correct answers rises (greedy accuracy needs far more examples)."""
    from rollshare.config import NodeConfig
    from rollshare.node import Node
    from rollshare.tasks import heldout_tasks

    held = heldout_tasks("spell_backward", 30)

    def answer_logp(policy) -> float:
        lp = policy.score_texts([t.prompt for t in held], [t.answer for t in held])
        return sum(sum(x) for x in lp) / len(lp)

    gain = {}
    for strategy in ("paper", "inject"):
        cfg = NodeConfig(data_dir=tmp_path / strategy, model=str(tiny_policy_dir), tasks="chain_sum",
                         prompts_per_round=2, group_size=4, shared_groups=4, sapo_strategy=strategy, lr=1e-3,
                         checkpoint_every=10**6, status="off", threads=1)
        with Node(cfg, show_progress=False) as node:
            node.sharing = _Teacher()
            before = answer_logp(node.policy)
            node.run(20)
            assert node.last["shared_groups"] == (4 if strategy == "inject" else 0)
            gain[strategy] = answer_logp(node.policy) - before
    assert gain["inject"] > 5.0 and gain["inject"] > gain["paper"] + 5.0, gain


# ------------------------------------------------------------- swarm options and the benchmark


def test_swarm_prepares_one_specialist_model_per_node_and_plots_rounds(tmp_path):
    import argparse

    from rollshare.config import NodeConfig
    from rollshare.swarm import SwarmNode, plot_swarm, prepare_models

    cfg = NodeConfig(data_dir=tmp_path, model="tiny-s", warmup_steps=2, tasks="chain_sum,spell_backward")
    args = argparse.Namespace(nodes=3, sizes="tiny-s", specialists=True, specialist_focus=0.9)
    models = prepare_models(cfg, args, tmp_path)
    assert len(models) == 3 and models[0] == models[2] != models[1]  # node 2 wraps around to family 0
    nodes = []
    for k in range(2):
        n = SwarmNode(f"node{k}", tmp_path / f"node{k}")
        n.data_dir.mkdir()
        (n.data_dir / "rounds.jsonl").write_text("".join(
            json.dumps({"round": r, "reward": r / 10, "family_reward": {"chain_sum": 0.5, "spell_backward": k}}) + "\n"
            for r in range(1, 6)))
        nodes.append(n)
    out = plot_swarm(nodes, tmp_path / "swarm.png")
    assert out.stat().st_size > 1000


def test_bench_sapo_smoke_reports_every_field_and_writes_the_plot(tmp_path, capsys):
    from rollshare.bench.sapo import main

    assert main(["--json", "--seeds", "1", "--rounds", "3", "--nodes", "2", "--warmup-steps", "5", "--eval-n", "6",
                 "--configs", "8/0,4/4,4/0", "--strategies", "inject_need", "--kinds", "homogeneous,specialists",
                 "--work-dir", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("homogeneous", "specialists", "gain_paper_4_4", "gain_best", "gain_best_vs_4_0",
                "cross_family_acc_silo", "cross_family_acc_best", "seeds", "plot"):
        assert key in r, key
    assert set(r["specialists"]) == {"8/0", "4/4", "4/0", "4/4 inject_need"} and r["best_strategy"] == "4/4 inject_need"
    row = next(x for x in r["rows"] if x["swarm"] == "specialists" and x["config"] == "4/4 inject_need")
    assert row["path"] == "in-process" and row["completions_per_node"] > 0 and set(row["final_acc"]) == {
        "chain_sum", "basic_arithmetic", "spell_backward", "base_conversion"}
    assert (tmp_path / "sapo.png").stat().st_size > 1000 and r["plot"] == str(tmp_path / "sapo.png")


def test_shaped_strategy_keeps_the_papers_sampler_and_shapes_every_shared_token(tmp_path, tiny_policy_dir):
    from rollshare.config import NodeConfig
    from rollshare.node import Node

    s = Strategy("shaped")
    assert s.shaped and not s.inject and s.selection == "uniform"
    assert s.qualifies([1, 0]) and not s.qualifies([1, 1])  # the paper's zero-advantage filter
    t = task(5)
    g = SharedGroup(task=t, completions=[t.answer, "0", "1", t.answer], rewards=[1, 0, 0, 1], origin="p")
    for name, off in (("paper", False), ("shaped", True)):
        cfg = NodeConfig(data_dir=tmp_path / name, model=str(tiny_policy_dir), sapo_strategy=name, status="off")
        with Node(cfg, show_progress=False) as node:
            batch = node.build_batch([], [g])
        assert batch.groups_used == 1 and [it.off_policy for it in batch.items] == [off] * 4
        assert [round(it.advantage, 4) for it in batch.items] == [0.866, -0.866, -0.866, 0.866]
