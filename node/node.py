"""The node: the round loop that turns tasks into training steps.

    round → draw tasks → generate G completions each → score from regenerated ground truth
          → store (and publish) own groups → build the batch (I own + J shared) → GRPO step
          → record metrics → checkpoint every K rounds (atomically)

The loop never touches a socket. Sharing is an optional `Sharing` object (the swarm plugs one
in): `publish` hands our groups over without waiting, `sample_shared` returns what is already
held locally. Training never waits on the network.

A node owns its data directory (an exclusive lock): the rollout store, checkpoints, the
embedded model cache, and (with the swarm) its identity. Killed at any point, it restarts from
the last checkpoint with the same data.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import torch

from rollshare.checkpoint import CheckpointError, CheckpointManager
from rollshare.config import ConfigError, NodeConfig
from rollshare.grpo import GRPOConfig, TrainBatch, add_group, add_merged_group, grpo_step
from rollshare.policies import Policy, PolicyError, Sample
from rollshare.policies.loader import load_policy
from rollshare.proto import rollout_pb2 as pb
from rollshare.sapo import PAPER, FamilyRewards, Strategy
from rollshare.store import RolloutStore, now_ms
from rollshare.tasks import Task, TaskDrawer, load_reward_fn, parse_mix, score_group

REWARD_WINDOW = 50  # rounds in the moving average shown and logged


@dataclass
class ScoredGroup:
    """One question with G completions from our own policy, scored by us."""

    task: Task
    samples: list[Sample]
    rewards: list[float]


@dataclass
class SharedGroup:
    """A peer's group re-tokenized and re-scored by us: ready for the batch."""

    task: Task
    completions: list[str]
    rewards: list[float]
    origin: str
    created_at_ms: int = 0  # when the sender made it (the sampler's age limit)


class Sharing(Protocol):
    def publish(self, groups: Sequence[pb.RolloutGroup]) -> None: ...

    def sample_shared(self, n: int, policy: Policy, *, strategy: Strategy = PAPER,
                      need: Mapping[str, float] | None = None) -> list[SharedGroup]: ...


def to_proto(g: ScoredGroup, policy_id: str, round_: int, origin: str) -> pb.RolloutGroup:
    s = g.task.spec
    return pb.RolloutGroup(
        task=pb.TaskSpec(family=s.family, params_json=s.params_json, seed=s.seed, index=s.index, style=s.style),
        completions=[
            pb.Completion(text=x.text, num_tokens=len(x.completion_ids), reward=r, logprob_sum=x.logprob_sum,
                          has_logprob=True)
            for x, r in zip(g.samples, g.rewards)
        ],
        policy_id=policy_id,
        round=round_,
        created_at_ms=now_ms(),
        origin=origin,
    )


class DataDirLock:
    """An exclusive lock on the data directory: one node per directory. Released by the OS on kill -9."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / "node.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConfigError(f"data directory {data_dir} is in use by another rollshare node; "
                              "stop it or pass a different --data-dir") from None

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class Node:
    def __init__(self, cfg: NodeConfig, policy: Policy | None = None, origin: str = "",
                 log: Callable[[str], None] | None = None, show_progress: bool = True):
        self.cfg = cfg.validate()
        self.log = log or (lambda m: None)
        self.data_dir = Path(cfg.data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = DataDirLock(self.data_dir)
        try:
            self._init(policy, origin, show_progress)
        except BaseException:
            self._lock.release()
            raise

    def _init(self, policy: Policy | None, origin: str, show_progress: bool) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
        self.mix = parse_mix(cfg.tasks)
        warmup_mix = parse_mix(cfg.warmup_tasks) if cfg.warmup_tasks else self.mix  # specialists differ
        self.policy = policy or load_policy(cfg.model, self.data_dir / "models", warmup_mix, cfg.warmup_steps,
                                            cfg.lr, cfg.seed, show_progress=show_progress)
        self.grpo = GRPOConfig(cfg.eps_low, cfg.eps_high, cfg.beta, cfg.max_grad_norm, cfg.temperature,
                               offpolicy_gamma=cfg.offpolicy_shaping)
        self.strategy = Strategy(cfg.sapo_strategy)
        self.family_rewards = FamilyRewards()  # our own recent reward per family (need-aware sampling)
        if cfg.beta > 0:
            raise ConfigError("--beta > 0 needs a reference model, which this node does not keep yet; use --beta 0")
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self.generation = self._generation_picker()
        self.origin = origin
        self.drawer = TaskDrawer(self.mix, seed=cfg.seed, style=cfg.prompt_style)
        self.store = RolloutStore(self.data_dir / "rollouts.db", self_origin=origin)
        self.ckpt = CheckpointManager(self.data_dir / "checkpoints", keep=cfg.keep_checkpoints, log=self.log)
        self.sharing: Sharing | None = None
        self.round = 0
        self.rewards: collections.deque[float] = collections.deque(maxlen=REWARD_WINDOW)
        self.last: dict = {}
        self._json_log = open(cfg.json_log, "a", buffering=1) if cfg.json_log else None
        torch.manual_seed(cfg.seed)
        self.resume()

    # --------------------------------------------------------------- identity
    @property
    def policy_id(self) -> str:
        return f"{self.policy.name}@{self.round}"

    # ------------------------------------------------------------ persistence
    def trainer_state(self) -> dict:
        return {
            "round": self.round,
            "optimizer": self.policy.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "drawer_rng": self.drawer.getstate(),
            "rewards": list(self.rewards),
        }

    def checkpoint(self) -> Path:
        return self.ckpt.save(self.round, self.policy.save, self.trainer_state(),
                              extra={"policy": self.policy.name, "model": self.cfg.model})

    def resume(self) -> None:
        ck = self.ckpt.latest()
        if ck is None:
            return
        if ck.extra.get("policy") != self.policy.name:
            raise ConfigError(
                f"{self.data_dir} holds checkpoints of policy {ck.extra.get('policy')!r}, not {self.policy.name!r} "
                f"(--model {self.cfg.model}); use another --data-dir or the same --model")
        try:
            state = CheckpointManager.load_trainer_state(ck)
            self.policy.load_weights(ck.path)
            self.policy.optimizer.load_state_dict(state["optimizer"])
        except (PolicyError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ck.path} cannot be loaded into this policy: {e}") from None
        self.round = int(state["round"])
        torch.set_rng_state(state["torch_rng"])
        self.drawer.setstate(_as_random_state(state["drawer_rng"]))
        self.rewards.extend(state.get("rewards", []))
        self.log(f"resumed from {ck.path.name} (round {self.round})")

    def _generation_picker(self):
        """The generation method of each round: chosen by the selector (auto) or fixed by --gen-method."""
        from rollshare.accel.methods import MethodError
        from rollshare.accel.history import History
        from rollshare.accel.runtime import GenerationPicker, history_path
        from rollshare.accel.selector import GuardPolicy

        cfg = self.cfg
        try:
            return GenerationPicker(self.policy, cfg.gen_method, History(history_path(self.data_dir, cfg.gen_history)),
                                    GuardPolicy(allow_lossy=cfg.allow_lossy_rollouts), horizon_rounds=cfg.rounds,
                                    seed=cfg.seed, log=self.log,
                                    probe_prompts=[t.prompt for t in TaskDrawer(self.mix, seed=1).draw(4)])
        except MethodError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------- the round
    def generate_groups(self, tasks: Sequence[Task]) -> list[ScoredGroup]:
        cfg = self.cfg
        samples = self.generation.generate([t.prompt for t in tasks], cfg.group_size, cfg.max_new_tokens,
                                           cfg.temperature)
        return [ScoredGroup(t, s, score_group(t, [x.text for x in s], self.reward_fn)) for t, s in zip(tasks, samples)]

    def build_batch(self, own: Sequence[ScoredGroup], shared: Sequence[SharedGroup],
                    injected: Sequence[ScoredGroup] = ()) -> TrainBatch:
        """I own groups + J shared ones; with group injection, shared[k]'s completions are merged
        into injected[k] (our own completions of the same question) before the advantage."""
        batch = TrainBatch()
        for g in own:
            add_group(batch, [x.prompt_ids for x in g.samples], [x.completion_ids for x in g.samples],
                      [x.logprobs for x in g.samples], g.rewards, self.grpo)
        # shared text is re-tokenized and re-scored under our own policy (all groups in one pass):
        # those log-probs are the "behaviour" log-probs (SAPO: no importance weighting across policies)
        prompts = [self.policy.encode([g.task.prompt])[0] for g in shared]
        comps = [[ids + [self.policy.eos_id] for ids in self.policy.encode(g.completions)] for g in shared]
        rows = [(p, c) for p, cs in zip(prompts, comps) for c in cs]
        old_all = (self.policy.token_logprobs([p for p, _ in rows], [c for _, c in rows],
                                              self.grpo.temperature)[0].tolist() if rows else [])
        start = 0
        for k, g in enumerate(shared):
            p_ids, c_ids = prompts[k], comps[k]
            old_l = [row[: len(c)] for row, c in zip(old_all[start:start + len(c_ids)], c_ids)]
            start += len(c_ids)
            if k < len(injected):
                mine = injected[k]
                add_merged_group(batch, p_ids, ([x.completion_ids for x in mine.samples],
                                                [x.logprobs for x in mine.samples], mine.rewards),
                                 (c_ids, old_l, g.rewards), self.grpo)
            elif self.strategy.shaped:  # a peer's group on its own, its tokens policy-shaped
                add_merged_group(batch, p_ids, ([], [], []), (c_ids, old_l, g.rewards), self.grpo)
            else:
                add_group(batch, [p_ids] * len(c_ids), c_ids, old_l, g.rewards, self.grpo)
        return batch

    def run_round(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        tasks = self.drawer.draw(cfg.prompts_per_round)
        own = self.generate_groups(tasks)
        t_gen = time.perf_counter()
        protos = [to_proto(g, self.policy_id, self.round, self.origin) for g in own]
        self.store.put_many(protos, origin=self.origin)
        if self.sharing is not None:
            self.sharing.publish(protos)
        for g in own:
            self.family_rewards.add(g.task.spec.family, g.rewards)
        shared = (self.sharing.sample_shared(cfg.shared_groups, self.policy, strategy=self.strategy,
                                             need=self.family_rewards.rates())
                  if self.sharing is not None and cfg.shared_groups else [])
        # group injection: our own G completions of each shared question, to merge with the peer's
        injected = self.generate_groups([g.task for g in shared]) if self.strategy.inject and shared else []
        for g in injected:
            self.family_rewards.add(g.task.spec.family, g.rewards)
        batch = self.build_batch(own, shared, injected)
        stats = grpo_step(self.policy, batch, self.grpo)
        t_end = time.perf_counter()
        self.round += 1
        reward = sum(sum(g.rewards) for g in own) / max(1, sum(len(g.rewards) for g in own))
        self.rewards.append(reward)
        tokens = sum(len(x.completion_ids) for g in own for x in g.samples)
        m = {
            "round": self.round,
            "reward": reward,
            "reward_ma": sum(self.rewards) / len(self.rewards),
            "tokens": tokens,
            "tokens_per_s": tokens / max(1e-9, t_gen - t0),
            "gen_s": t_gen - t0,
            "train_s": t_end - t_gen,
            "step_s": t_end - t0,
            "loss": stats["loss"],
            "grad_norm": stats["grad_norm"],
            "clip_frac": stats["clip_frac"],
            "groups_used": batch.groups_used,
            "groups_dropped": batch.groups_dropped,
            "shared_groups": len(shared),
            "method": self.generation.last_method,
            "completions": sum(len(g.samples) for g in own) + sum(len(g.samples) for g in injected),
            "family_reward": _family_means(own),
            "time": time.time(),
        }
        self.last = m
        if self._json_log:
            self._json_log.write(json.dumps(m) + "\n")
        if self.round % cfg.checkpoint_every == 0:
            self.checkpoint()
        if self.round % 100 == 0:
            self.store.prune()
        return m

    def run(self, rounds: int = 0, on_round: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> None:
        """Run `rounds` more rounds (0 = until should_stop()). Checkpoints on the way out."""
        done = 0
        try:
            while (rounds == 0 or done < rounds) and not (should_stop and should_stop()):
                m = self.run_round()
                done += 1
                if on_round:
                    on_round(m)
        finally:
            if done and self.round % self.cfg.checkpoint_every != 0:
                self.checkpoint()

    def close(self) -> None:
        if self._json_log:
            self._json_log.close()
            self._json_log = None
        self.store.close()
        self._lock.release()

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _family_means(groups: Sequence[ScoredGroup]) -> dict[str, float]:
    """Mean reward per task family over these groups."""
    sums: dict[str, list[float]] = {}
    for g in groups:
        s = sums.setdefault(g.task.spec.family, [0.0, 0])
        s[0] += sum(g.rewards)
        s[1] += len(g.rewards)
    return {f: round(v / n, 4) for f, (v, n) in sums.items() if n}


def _as_random_state(state) -> tuple:
    """random.Random state back from torch.save's lists."""
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)


def evaluate(policy: Policy, families: Sequence[str], n: int = 200, style: str = "compact",
             max_new_tokens: int = 8, batch: int = 100) -> dict[str, float]:
    """Greedy accuracy per family on held-out items (disjoint from training by content)."""
    from rollshare.tasks import heldout_tasks, verify

    out = {}
    for fam in families:
        tasks = heldout_tasks(fam, n, style=style)
        correct = 0
        for i in range(0, len(tasks), batch):
            chunk = tasks[i:i + batch]
            groups = policy.generate([t.prompt for t in chunk], 1, max_new_tokens, greedy=True)
            correct += sum(verify(t, g[0].text) for t, g in zip(chunk, groups))
        out[fam] = correct / max(1, len(tasks))
    return out
