"""SwarmSharing: the round loop's `Sharing`, on top of a publisher and the RolloutStore.

    publish(groups)        → the publisher (NetworkService: sign, store, announce); never waits
    sample_shared(n, ...)  → up to n groups picked by the SAPO sampler (`sapo.pick_shared_groups`)
                             from what the store already holds from *other* origins inside the
                             age window. Each task is regenerated from its spec and the
                             completions are re-scored here (tasks.score_group) before the
                             sampler sees them; the sender's rewards are never used. A group
                             whose spec cannot be regenerated is skipped and counted (`bad_specs`).

Candidates are read lazily: the window's ids are shuffled and re-scored in chunks until enough
of them qualify (n for uniform sampling, a larger pool for need-aware sampling), so a uniform
pick over the qualifying part of that shuffled prefix is a uniform pick over the window.
Re-scored rewards are cached by content id (they depend only on the text and the task).

The same class serves the in-process exchange of `rollshare bench sapo` (a publisher that
writes into the other nodes' stores, and a round clock): one sampler for both paths.

This module never touches a socket (the publisher does) and never touches torch (the node
re-tokenizes shared text itself).
"""

from __future__ import annotations

import collections
import random
from typing import Callable, Mapping, Protocol, Sequence

from rollshare.node import SharedGroup
from rollshare.policies import Policy
from rollshare.proto import rollout_pb2 as pb
from rollshare.sapo import PAPER, Strategy, pick_shared_groups
from rollshare.store import RolloutStore, now_ms
from rollshare.tasks import RewardFn, TaskError, TaskSpec, regenerate, score_group

NEED_POOL = 64  # candidates re-scored before a need-aware pick (at least 8 J)
RESCORE_CACHE = 20_000  # re-scored groups remembered by content id


class Publisher(Protocol):
    def publish(self, groups: Sequence[pb.RolloutGroup]) -> None: ...


class SwarmSharing:
    def __init__(self, service: Publisher, store: RolloutStore, self_origin: str, *,
                 window_s: float | None = None, reward_fn: RewardFn | None = None, seed: int = 0,
                 clock: Callable[[], int] = now_ms):
        self.service = service
        self.store = store
        self.self_origin = self_origin
        self.window_s = store.limits.max_age_s if not window_s else window_s
        self.reward_fn = reward_fn
        self.rng = random.Random(seed)
        self.clock = clock  # milliseconds; the in-process benchmark runs on a round clock
        self.bad_specs = 0  # shared groups skipped because their task could not be regenerated
        self._rescored: collections.OrderedDict[bytes, SharedGroup | None] = collections.OrderedDict()

    def publish(self, groups: Sequence[pb.RolloutGroup]) -> None:
        self.service.publish(groups)

    def sample_shared(self, n: int, policy: Policy | None = None, *, strategy: Strategy = PAPER,
                      need: Mapping[str, float] | None = None) -> list[SharedGroup]:
        if n <= 0:
            return []
        now = self.clock()
        max_age_ms = int(self.window_s * 1000)
        want = n if strategy.selection == "uniform" else max(NEED_POOL, 8 * n)
        ids = self.store.ids_since(now - max_age_ms)
        self.rng.shuffle(ids)
        pool: list[SharedGroup] = []
        qualifying = 0
        step = max(8, 2 * n)
        for i in range(0, len(ids), step):
            for g in self._rescore(ids[i:i + step]):
                pool.append(g)
                qualifying += strategy.qualifies(g.rewards)
            if qualifying >= want:
                break
        return pick_shared_groups(pool, n, self.rng, now_ms=now, max_age_ms=max_age_ms,
                                  self_origin=self.self_origin, strategy=strategy, need=need)

    def _rescore(self, cids: Sequence[bytes]) -> list[SharedGroup]:
        """Other origins' groups among cids, regenerated and re-scored by us (cached by content id)."""
        out = []
        todo = [c for c in cids if c not in self._rescored]
        for sg in self.store.get(todo):
            self._remember(sg.cid, self._shared_group(sg.group, sg.origin))
        for cid in cids:
            g = self._rescored.get(cid)
            if g is not None:
                out.append(g)
        return out

    def _remember(self, cid: bytes, g: SharedGroup | None) -> None:
        self._rescored[cid] = g
        while len(self._rescored) > RESCORE_CACHE:
            self._rescored.popitem(last=False)

    def _shared_group(self, g: pb.RolloutGroup, origin: str) -> SharedGroup | None:
        """None for our own groups (no origin, or ours) and for groups that cannot be regenerated."""
        if not origin or origin == self.self_origin:
            return None
        try:
            task = regenerate(TaskSpec.from_json(g.task.family, g.task.params_json, g.task.seed, g.task.index,
                                                 g.task.style))
        except TaskError:
            self.bad_specs += 1
            return None
        completions = [c.text for c in g.completions]
        if not completions:
            self.bad_specs += 1
            return None
        return SharedGroup(task=task, completions=completions, rewards=score_group(task, completions, self.reward_fn),
                           origin=origin, created_at_ms=g.created_at_ms)
