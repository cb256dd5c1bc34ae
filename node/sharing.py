"""SwarmSharing: the round loop's `Sharing`, on top of the NetworkService and the RolloutStore.

    publish(groups)        → NetworkService.publish: sign, store, announce; never waits for the network
    sample_shared(n, ...)  → up to n groups drawn uniformly from what the store already holds from
                             *other* origins inside the age window; each task is regenerated from
                             its spec and the completions are re-scored here (tasks.score_group).
                             The sender's rewards are never used. A group whose spec cannot be
                             regenerated is skipped and counted (`bad_specs`).

Sampling is deliberately plain (the SAPO issue refines it). This module never touches a socket
(the service does) and never touches torch (the node re-tokenizes shared text itself).
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence

from rollshare.node import SharedGroup
from rollshare.policies import Policy
from rollshare.proto import rollout_pb2 as pb
from rollshare.store import RolloutStore, StoredGroup, now_ms
from rollshare.tasks import RewardFn, TaskError, TaskSpec, regenerate, score_group


class Publisher(Protocol):
    def publish(self, groups: Sequence[pb.RolloutGroup]) -> None: ...


class SwarmSharing:
    def __init__(self, service: Publisher, store: RolloutStore, self_origin: str, *,
                 window_s: float | None = None, reward_fn: RewardFn | None = None, seed: int = 0):
        self.service = service
        self.store = store
        self.self_origin = self_origin
        self.window_s = store.limits.max_age_s if window_s is None else window_s
        self.reward_fn = reward_fn
        self.rng = random.Random(seed)
        self.bad_specs = 0  # shared groups skipped because their task could not be regenerated

    def publish(self, groups: Sequence[pb.RolloutGroup]) -> None:
        self.service.publish(groups)

    def sample_shared(self, n: int, policy: Policy | None = None) -> list[SharedGroup]:
        if n <= 0:
            return []
        out: list[SharedGroup] = []
        for sg in self._draw(n):
            g = sg.group
            try:
                task = regenerate(TaskSpec.from_json(g.task.family, g.task.params_json, g.task.seed, g.task.index,
                                                     g.task.style))
            except TaskError:
                self.bad_specs += 1
                continue
            completions = [c.text for c in g.completions]
            if not completions:
                self.bad_specs += 1
                continue
            out.append(SharedGroup(task=task, completions=completions,
                                   rewards=score_group(task, completions, self.reward_fn), origin=sg.origin))
        return out

    def _draw(self, n: int) -> list[StoredGroup]:
        """n groups drawn uniformly from other origins' groups in the window (fewer if there are fewer).

        Shuffles the ids (cheap) and reads groups until n qualify, instead of parsing the window.
        Groups without an origin are this node's own, from a run without the swarm.
        """
        ids = self.store.ids_since(now_ms() - int(self.window_s * 1000))
        self.rng.shuffle(ids)
        out: list[StoredGroup] = []
        step = max(8, 2 * n)
        for i in range(0, len(ids), step):
            for sg in self.store.get(ids[i:i + step]):
                if sg.origin and sg.origin != self.self_origin:
                    out.append(sg)
                    if len(out) == n:
                        return out
        return out
