"""The selector: which generation method to use for a task, learned from measurements.

Two layers, as in MetaInf (a regressor over task descriptions) plus a bandit on top:

1. `ThroughputModel`, the learner. From the history it learns, for each method, its log
   throughput relative to the safe default method (`policy`) in the same setting,
   r_m(x) = log tps_m(x) - log tps_policy(x), from the setting's features x (workload, model,
   hardware, `features.NUMERIC`) and the method (one-hot): gradient-boosted regression trees,
   written in numpy (depth-3 trees, squared loss, shrinkage 0.1) so the node needs no
   scikit-learn. Ranking needs only the relative value; a second booster predicts the default's
   own log throughput, so that predictions can meet absolute measurements. A failed
   measurement counts as a penalised outcome (`FAILURE_PENALTY`).

2. `OnlineSelector`, the online layer: a Gaussian posterior per method over log tokens/s in
   the node's own setting. Its prior is the learner's relative prediction on top of a level
   estimated from what the node measured (or, without history, "like the default but 0.3
   slower, unsure"). Each round it exploits the best posterior mean; rarely (`explore_rate`,
   decaying) it explores with a Thompson sample. Every measured round updates the posterior.
   A method that fails is dropped for the rest of the run.

Safe default and quality guard: the default `policy` is chosen unless another method is predicted
faster by more than `min_gain`; lossy methods are candidates only with a measured divergence
bound at most `max_divergence`, and never for training rollouts unless the operator allows it
(`allow_lossy`). This module never generates anything: it only chooses and learns.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from rollshare.accel.features import NUMERIC, numeric
from rollshare.accel.methods import DEFAULT_METHOD, REGISTRY

FAILURE_PENALTY = 2.0  # a failure costs twice the slowest successful method's time in that setting
TIE = 0.03  # measurements within 3% are ties (machine noise)


# ------------------------------------------------------------------ numpy gradient boosting

@dataclass
class _Tree:
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray

    def predict(self, X: np.ndarray) -> np.ndarray:
        node = np.zeros(len(X), dtype=np.int64)
        for _ in range(64):
            leaf = self.feature[node] < 0
            if leaf.all():
                break
            f = np.where(leaf, 0, self.feature[node])
            go_left = X[np.arange(len(X)), f] <= self.threshold[node]
            node = np.where(leaf, node, np.where(go_left, self.left[node], self.right[node]))
        return self.value[node]


def _fit_tree(X: np.ndarray, g: np.ndarray, depth: int, min_leaf: int) -> _Tree:
    feat, thr, left, right, val = [], [], [], [], []

    def build(idx: np.ndarray, d: int) -> int:
        k = len(feat)
        feat.append(-1), thr.append(0.0), left.append(-1), right.append(-1), val.append(float(g[idx].mean()))
        n = len(idx)
        if d >= depth or n < 2 * min_leaf:
            return k
        gi = g[idx]
        xs = X[idx]  # (n, F): all features at once
        order = np.argsort(xs, axis=0, kind="stable")
        xs_s = np.take_along_axis(xs, order, axis=0)
        cs = np.cumsum(gi[order], axis=0)
        nl = np.arange(1, n)[:, None]
        ok = (xs_s[1:] > xs_s[:-1]) & (nl >= min_leaf) & (n - nl >= min_leaf)
        gain = cs[:-1] ** 2 / nl + (cs[-1] - cs[:-1]) ** 2 / (n - nl) - gi.sum() ** 2 / n
        gain = np.where(ok, gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        best = (int(j), float((xs_s[i, j] + xs_s[i + 1, j]) / 2)) if gain[i, j] > 1e-12 else None
        if best is None:
            return k
        j, t = best
        mask = X[idx, j] <= t
        feat[k], thr[k] = j, t
        left[k] = build(idx[mask], d + 1)
        right[k] = build(idx[~mask], d + 1)
        return k

    build(np.arange(len(X)), 0)
    return _Tree(np.array(feat), np.array(thr), np.array(left), np.array(right), np.array(val))


class GradientBoosting:
    """Squared-loss gradient boosting of small regression trees (numpy only)."""

    def __init__(self, n_trees: int = 150, depth: int = 3, lr: float = 0.1, min_leaf: int = 2):
        self.n_trees, self.depth, self.lr, self.min_leaf = n_trees, depth, lr, min_leaf
        self.trees: list[_Tree] = []
        self.base = 0.0

    def fit(self, X: np.ndarray, y: np.ndarray) -> "GradientBoosting":
        X, y = np.asarray(X, float), np.asarray(y, float)
        self.base = float(y.mean()) if len(y) else 0.0
        pred = np.full(len(y), self.base)
        self.trees = []
        for _ in range(self.n_trees if len(y) else 0):
            t = _fit_tree(X, y - pred, self.depth, self.min_leaf)
            pred += self.lr * t.predict(X)
            self.trees.append(t)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, float)
        out = np.full(len(X), self.base)
        for t in self.trees:
            out += self.lr * t.predict(X)
        return out


# ------------------------------------------------------------------ data from the history

@dataclass
class Setting:
    """All measurements of one (workload, model, hardware): method -> tokens/s (None = failed)."""

    key: str
    features: dict
    tps: dict[str, float | None] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)  # per-call tokens/s, for probes
    infeasible: set[str] = field(default_factory=set)

    def penalised(self, method: str) -> float:
        """tokens/s of a method here, a failure counted as FAILURE_PENALTY x the slowest ok time."""
        v = self.tps.get(method)
        if v is not None:
            return v
        ok = [x for x in self.tps.values() if x]
        return min(ok) / FAILURE_PENALTY if ok else 1e-9

    def oracle(self, candidates: Iterable[str]) -> float:
        return max(self.penalised(m) for m in candidates if m in self.tps)


def settings_from_records(records: Iterable[dict]) -> list[Setting]:
    """Group records by setting; repeated measurements of a method: the median of the ok ones."""
    by: dict[str, Setting] = {}
    raw: dict[tuple[str, str], list[float]] = {}
    fails: dict[tuple[str, str], int] = {}
    for r in records:
        s = by.setdefault(r["setting"], Setting(r["setting"], r["features"]))
        m = r["method"]
        if r["status"] == "infeasible":
            s.infeasible.add(m)
        elif r["status"] == "failed":
            fails[(s.key, m)] = fails.get((s.key, m), 0) + 1
        else:
            raw.setdefault((s.key, m), []).append(float(r["tokens_per_s"]))
            tok = r.get("tokens")
            for t in r.get("times") or []:
                if tok and t > 0:
                    s.samples.setdefault(m, []).append(tok / t)
    for (k, m), v in raw.items():
        by[k].tps[m] = float(np.median(v))
        by[k].infeasible.discard(m)
    for (k, m), n in fails.items():
        if m not in by[k].tps:
            by[k].tps[m] = None
            by[k].infeasible.discard(m)
    return [s for s in by.values() if s.tps.get(DEFAULT_METHOD)]


# ------------------------------------------------------------------ the learner

class ThroughputModel:
    """Predicts log tokens/s of each method in a setting, relative to the default and absolute."""

    def __init__(self, methods: Sequence[str] | None = None, n_trees: int = 150, depth: int = 3, factory=None):
        """`factory`: another regressor (fit/predict, e.g. scikit-learn's) instead of the numpy booster."""
        self.methods = list(methods or REGISTRY)
        self.n_trees, self.depth = n_trees, depth
        make = factory or (lambda: GradientBoosting(n_trees, depth))
        self.rel = make()
        self.absolute = make()
        self.sigma = 0.3  # prediction uncertainty (log units), set from the training residuals
        self.fitted = False

    def _x(self, feats: dict, method: str) -> list[float]:
        return numeric(feats) + [float(method == m) for m in self.methods]

    def fit(self, settings: Sequence[Setting]) -> "ThroughputModel":
        X, y, Xa, ya = [], [], [], []
        for s in settings:
            ref = s.tps[DEFAULT_METHOD]
            Xa.append(numeric(s.features))
            ya.append(math.log(ref))
            for m in s.tps:
                if m in self.methods:
                    X.append(self._x(s.features, m))
                    y.append(math.log(s.penalised(m)) - math.log(ref))
        if not X:
            return self
        X, y = np.array(X), np.array(y)
        self.rel.fit(X, y)
        self.absolute.fit(np.array(Xa), np.array(ya))
        resid = y - self.rel.predict(X)
        # in-sample residuals flatter the model: inflate, and never claim better than 5%
        self.sigma = max(0.05, 2.0 * float(np.sqrt(np.mean(resid ** 2))))
        self.fitted = True
        return self

    def predict_relative(self, feats: dict, methods: Sequence[str]) -> dict[str, float]:
        if not self.fitted:
            return {m: 0.0 if m == DEFAULT_METHOD else -0.3 for m in methods}
        X = np.array([self._x(feats, m) for m in methods])
        return dict(zip(methods, self.rel.predict(X).tolist()))

    def predict_default_log_tps(self, feats: dict) -> float | None:
        if not self.fitted:
            return None
        return float(self.absolute.predict(np.array([numeric(feats)]))[0])


# ------------------------------------------------------------------ guard + offline choice

@dataclass(frozen=True)
class GuardPolicy:
    """Which methods may be used: lossless ones always; lossy ones only with a measured divergence
    bound <= max_divergence (per-token KL), and for training rollouts only if allow_lossy."""

    allow_lossy: bool = False
    max_divergence: float = 1e-3


def allowed_methods(feasible: Iterable[str], guard: GuardPolicy, training: bool = True,
                    divergence: dict[str, float] | None = None) -> list[str]:
    out = []
    for m in feasible:
        spec = REGISTRY.get(m)
        if spec is None:
            continue
        if not spec.lossless:
            if training and not guard.allow_lossy:
                continue
            d = (divergence or {}).get(m)
            if d is None or d > guard.max_divergence:
                continue
        out.append(m)
    return out


def choose_offline(model: ThroughputModel, feats: dict, candidates: Sequence[str], min_gain: float = TIE) -> str:
    """The learner's pick: the best predicted method, unless it beats the default by < min_gain."""
    pred = model.predict_relative(feats, list(candidates))
    best = max(pred, key=pred.get)
    if DEFAULT_METHOD in pred and pred[best] - pred[DEFAULT_METHOD] < math.log1p(min_gain):
        return DEFAULT_METHOD
    return best


# ------------------------------------------------------------------ the online layer

@dataclass
class _Arm:
    rel: float  # the learner's prediction: log tokens/s relative to the default
    sum_y: float = 0.0  # sum of observed log tokens/s
    n: int = 0
    failed: bool = False


class OnlineSelector:
    """Gaussian Thompson sampling over log tokens/s for one setting, its prior from the learner.

    The learner is trusted for differences between methods, not for the level: a node's rounds
    (real sampling, EOS, its own load) run at another absolute speed than the benchmark's. So
    log tps_m = L + rel_m + e_m, with the level L estimated from whatever was measured (each
    observed arm's mean minus its predicted rel), and e_m ~ N(0, sigma^2) the learner's error per
    method, learnt away by the arm's own observations (noise `noise`)."""

    def __init__(self, model: ThroughputModel | None, feats: dict, candidates: Sequence[str],
                 noise: float = 0.1, explore_rate: float = 0.1, min_gain: float = TIE,
                 rng: random.Random | None = None):
        if DEFAULT_METHOD not in candidates:
            candidates = [DEFAULT_METHOD, *candidates]
        self.model = model or ThroughputModel()
        self.feats, self.noise, self.explore_rate, self.min_gain = feats, noise, explore_rate, min_gain
        self.rng = rng or random.Random(0)
        rel = self.model.predict_relative(feats, list(candidates))
        self.sigma = self.model.sigma if self.model.fitted else 0.5
        base = self.model.predict_default_log_tps(feats)
        self.prior_level = base if base is not None else 0.0
        self.arms = {m: _Arm(rel[m]) for m in candidates}
        self.rounds = 0

    def level(self) -> float:
        seen = [a for a in self.arms.values() if a.n]
        if not seen:
            return self.prior_level
        return sum(a.sum_y - a.n * a.rel for a in seen) / sum(a.n for a in seen)

    def posterior(self, method: str) -> tuple[float, float]:
        """(mean, variance) of the method's log tokens/s."""
        a = self.arms[method]
        mu0, v0 = self.level() + a.rel, self.sigma ** 2
        prec = 1.0 / v0 + a.n / self.noise ** 2
        return (mu0 / v0 + a.sum_y / self.noise ** 2) / prec, 1.0 / prec

    def _live(self) -> list[str]:
        return [m for m, a in self.arms.items() if not a.failed]

    def best(self) -> str:
        mean = {m: self.posterior(m)[0] for m in self._live()}
        top = max(mean, key=mean.get)
        if DEFAULT_METHOD in mean and top != DEFAULT_METHOD and mean[top] - mean[DEFAULT_METHOD] < math.log1p(self.min_gain):
            return DEFAULT_METHOD
        return top

    def thompson(self) -> str:
        draw = {}
        for m in self._live():
            mu, var = self.posterior(m)
            draw[m] = self.rng.gauss(mu, math.sqrt(var))
        return max(draw, key=draw.get)

    def choose(self) -> tuple[str, bool]:
        """(method, exploring) for the next round: exploration at a rate decaying as 1/sqrt(round)."""
        self.rounds += 1
        rate = self.explore_rate / math.sqrt(self.rounds)
        if self.rng.random() < rate:
            m = self.thompson()
            return m, m != self.best()
        return self.best(), False

    def observe(self, method: str, tokens_per_s: float | None) -> None:
        """A measured round (None = the method failed: dropped for the rest of the run)."""
        a = self.arms.get(method)
        if a is None:
            return
        if tokens_per_s is None or not tokens_per_s > 0:
            a.failed = method != DEFAULT_METHOD  # the default is never dropped: it is the fallback
            return
        a.sum_y += math.log(tokens_per_s)
        a.n += 1


# ------------------------------------------------------------------ the node's view

class RoundSelector:
    """What the node holds: the learner fitted once on the history at start, an online layer per
    workload shape, and the bookkeeping of what it measured (records to append to the history).

    Without any history the online layer explores only methods that are cheap to try (no one-off
    compilation, no row-by-row decoding); methods with a one-off setup are candidates only when
    the run is long enough to amortise it (`horizon_rounds`)."""

    LONG_RUN = 200  # rounds after which a one-off setup (a compile) may pay off

    def __init__(self, records: Sequence[dict], feasible: Iterable[str], guard: GuardPolicy,
                 divergence: dict[str, float] | None = None, horizon_rounds: int = 0, seed: int = 0,
                 explore_rate: float = 0.1, fixed: str | None = None):
        self.settings = settings_from_records(records)
        self.model = ThroughputModel().fit(self.settings) if len(self.settings) >= 2 else ThroughputModel()
        cands = allowed_methods(feasible, guard, training=True, divergence=divergence)
        long_run = horizon_rounds == 0 or horizon_rounds >= self.LONG_RUN
        cands = [m for m in cands if long_run or not REGISTRY[m].one_off_setup]
        if not self.model.fitted:
            cands = [m for m in cands if not REGISTRY[m].one_off_setup and not REGISTRY[m].row_by_row]
        self.candidates = cands if DEFAULT_METHOD in cands else [DEFAULT_METHOD, *cands]
        self.fixed = fixed
        self.explore_rate = explore_rate
        self.rng = random.Random(seed)
        self.online: dict[tuple, OnlineSelector] = {}

    @staticmethod
    def _key(feats: dict) -> tuple:
        w = feats["workload"]
        return (w.get("prompts"), w.get("group_size"), w.get("max_new_tokens"), w.get("greedy"))

    def _layer(self, feats: dict) -> OnlineSelector:
        k = self._key(feats)
        if k not in self.online:
            self.online[k] = OnlineSelector(self.model, feats, self.candidates, explore_rate=self.explore_rate,
                                            rng=self.rng)
        return self.online[k]

    def choose(self, feats: dict) -> tuple[str, bool]:
        if self.fixed:
            return self.fixed, False
        return self._layer(feats).choose()

    def observe(self, feats: dict, method: str, tokens_per_s: float | None) -> None:
        if not self.fixed:
            self._layer(feats).observe(method, tokens_per_s)
