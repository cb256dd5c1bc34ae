"""`rollshare bench selector`: how well the selector picks methods it has not seen measured.

On the history collected by `rollshare bench accel` (default the node's data directory), grouped
cross-validation: the learner is trained on all settings but one group and picks a method for
each setting of the held-out group, for three kinds of groups: leave one model out, leave one
workload family out, leave one thread setting (the hardware here) out. Candidates are the
methods allowed for training rollouts (lossless; a lossy method needs --allow-lossy and a
measured divergence) and measured in that setting.

    regret     selected time / oracle time - 1   (time per token; the oracle is the best
               measured method; a failure costs FAILURE_PENALTY x the slowest method's time)
    gap_closed share of the single-best -> oracle gap closed: 1 - mean_regret / single_best's
    top1       selected within 3% of the oracle (measurement noise makes closer calls ties)

Baselines get the same fields: `random` (expected over a uniform pick), `single_best` (the
method with the lowest mean regret on the training folds), `transformers_default` (always
hf-default), `nearest_neighbour` (the best method of the closest training setting, features
standardised). `cold_start_regret`: on each held-out setting, the online layer starts from the
fold's learner and makes 0, 3, 10 probe runs (Thompson samples; each probe's tokens/s is one of
that method's measured calls), then exploits its best posterior mean: the regret of that pick.
`end_to_end_speedup`: real node rounds (the tiny model, the node's default round, 1 thread)
with --gen-method auto over those with hf-default, rounds interleaved in one process, the
first of each not counted: median tokens/s ratio. Main fields pool all three split kinds (each setting counted once per kind);
`splits` breaks them down. `noise_ceiling`: the same regret and top1 for the measurements
against themselves (best by half of the calls, judged by the other half), i.e. how well any
selector could do with measurements this noisy. With --json the last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rollshare.accel.features import numeric
from rollshare.accel.history import History
from rollshare.accel.methods import DEFAULT_METHOD, REGISTRY, TRANSFORMERS_DEFAULT
from rollshare.accel.selector import (TIE, GuardPolicy, OnlineSelector, Setting, ThroughputModel, allowed_methods,
                                      choose_offline, settings_from_records)

SPLITS: dict[str, Callable[[Setting], str]] = {
    "model": lambda s: str(s.features["model"].get("name") or s.features["model"].get("params")),
    "workload": lambda s: str(s.features["workload"].get("family") or s.features["workload"].get("name")),
    "threads": lambda s: f"{s.features['hardware'].get('device')}/t{s.features['hardware'].get('threads')}",
}


def candidates(s: Setting, guard: GuardPolicy) -> list[str]:
    return allowed_methods([m for m in s.tps if m in REGISTRY], guard, training=True)


def regret(s: Setting, method: str, cands: Sequence[str]) -> float:
    return s.oracle(cands) / s.penalised(method) - 1.0


def summary(regrets: Sequence[float], tops: Sequence[float], ref_mean: float | None) -> dict:
    mean = float(np.mean(regrets)) if regrets else float("nan")
    gap = None if not ref_mean or ref_mean <= 1e-12 else 1.0 - mean / ref_mean
    return {"median_regret": round(float(np.median(regrets)), 4), "mean_regret": round(mean, 4),
            "gap_closed": None if gap is None else round(gap, 4), "top1": round(float(np.mean(tops)), 4)}


def _nearest(train: Sequence[Setting], s: Setting, guard: GuardPolicy) -> str:
    X = np.array([numeric(t.features) for t in train])
    mu, sd = X.mean(0), X.std(0) + 1e-9
    d = (((X - mu) / sd - (np.array(numeric(s.features)) - mu) / sd) ** 2).sum(1)
    near = train[int(np.argmin(d))]
    cs = candidates(near, guard)
    best = max(cs, key=near.penalised)
    return best if best in candidates(s, guard) else DEFAULT_METHOD


def _single_best(train: Sequence[Setting], guard: GuardPolicy) -> str:
    scores: dict[str, list[float]] = {}
    for t in train:
        cs = candidates(t, guard)
        for m in cs:
            scores.setdefault(m, []).append(regret(t, m, cs))
    full = {m: v for m, v in scores.items() if len(v) == len(train)} or scores
    return min(full, key=lambda m: float(np.mean(full[m])))


def cross_validate(settings: Sequence[Setting], guard: GuardPolicy, probes: Sequence[int] = (0, 3, 10),
                   seeds: int = 10, factory=None, n_trees: int = 150, log=lambda m: None) -> dict:
    rows: dict[str, list[dict]] = {}
    for kind, group_of in SPLITS.items():
        groups = sorted({group_of(s) for s in settings})
        if len(groups) < 2:
            log(f"split {kind}: only one group ({groups}), skipped")
            continue
        for g in groups:
            train = [s for s in settings if group_of(s) != g]
            test = [s for s in settings if group_of(s) == g]
            model = ThroughputModel(n_trees=n_trees, factory=factory).fit(train)
            sb = _single_best(train, guard)
            for s in test:
                cs = candidates(s, guard)
                if len(cs) < 1:
                    continue
                pick = choose_offline(model, s.features, cs)
                oracle = s.oracle(cs)
                r = {
                    "kind": kind, "group": g, "setting": s.key, "pick": pick,
                    "oracle_method": max(cs, key=s.penalised),
                    "selector": regret(s, pick, cs),
                    "single_best": regret(s, sb if sb in cs else DEFAULT_METHOD, cs),
                    "transformers_default": regret(s, TRANSFORMERS_DEFAULT if TRANSFORMERS_DEFAULT in cs
                                                   else DEFAULT_METHOD, cs),
                    "nearest_neighbour": regret(s, _nearest(train, s, guard), cs),
                    "random": float(np.mean([regret(s, m, cs) for m in cs])),
                    "random_top1": float(np.mean([s.penalised(m) * (1 + TIE) >= oracle for m in cs])),
                }
                for name in ("selector", "single_best", "transformers_default", "nearest_neighbour"):
                    r[name + "_top1"] = float(r[name] <= TIE + 1e-12)
                for k in probes:
                    vals = []
                    for seed in range(seeds):
                        vals.append(regret(s, _cold_start(model, s, cs, k, seed), cs))
                    r[f"cold_{k}"] = float(np.mean(vals))
                rows.setdefault(kind, []).append(r)
            log(f"  {kind} held out {g}: {len(test)} settings, "
                f"mean regret {np.mean([x['selector'] for x in rows.get(kind, []) if x['group'] == g]):.3f}")
    return {"rows": rows}


def _cold_start(model: ThroughputModel, s: Setting, cs: Sequence[str], k: int, seed: int) -> str:
    """The online layer's pick after k probe runs on a setting it has no measurements of."""
    rng = random.Random(seed * 7919 + k)
    sel = OnlineSelector(model, s.features, cs, rng=rng)
    for _ in range(k):
        m = sel.thompson()
        samples = s.samples.get(m)
        if s.tps.get(m) is None:
            sel.observe(m, None)
        else:
            sel.observe(m, rng.choice(samples) if samples else s.tps[m])
    return sel.best()


def aggregate(rows: dict[str, list[dict]], probes: Sequence[int]) -> dict:
    def block(rs: list[dict]) -> dict:
        sb_mean = float(np.mean([r["single_best"] for r in rs]))
        out = summary([r["selector"] for r in rs], [r["selector_top1"] for r in rs], sb_mean)
        out["baselines"] = {
            name: summary([r[name] for r in rs], [r[name + "_top1"] for r in rs], sb_mean)
            for name in ("random", "single_best", "transformers_default", "nearest_neighbour")}
        out["cold_start_regret"] = {str(k): round(float(np.mean([r[f"cold_{k}"] for r in rs])), 4) for k in probes}
        out["n"] = len(rs)
        return out

    pooled = [r for rs in rows.values() for r in rs]
    res = block(pooled)
    res["splits"] = {kind: {k: v for k, v in block(rs).items() if k != "baselines"}
                     for kind, rs in rows.items()}
    return res


def noise_ceiling(settings: Sequence[Setting], guard: GuardPolicy) -> dict:
    """How reproducible the oracle itself is: per setting, the best method by the median of the
    odd-numbered calls, judged by the median of the even-numbered ones (methods with two calls
    or more). A selector cannot beat this on top1/regret with the same measurements."""
    regrets, tops = [], []
    for s in settings:
        halves = {m: (s.samples[m][0::2], s.samples[m][1::2]) for m in candidates(s, guard)
                  if len(s.samples.get(m, [])) >= 2}
        if len(halves) < 2:
            continue
        a = {m: float(np.median(h[0])) for m, h in halves.items()}
        b = {m: float(np.median(h[1])) for m, h in halves.items()}
        pick = max(b, key=b.get)
        r = max(a.values()) / a[pick] - 1.0
        regrets.append(r)
        tops.append(float(r <= TIE + 1e-12))
    if not regrets:
        return {}
    return {"median_regret": round(float(np.median(regrets)), 4), "mean_regret": round(float(np.mean(regrets)), 4),
            "top1": round(float(np.mean(tops)), 4), "n": len(regrets)}


# ------------------------------------------------------------------ end to end

def end_to_end(history_path: Path, rounds: int, model: str = "tiny", warmup_steps: int = 20,
               data_dir: Path | None = None, threads: int = 1, log=lambda m: None) -> dict:
    """Node rounds with --gen-method auto vs hf-default, interleaved round by round, one process."""
    import copy
    import tempfile

    import torch

    from rollshare.bench.accel import MIX, default_history_path
    from rollshare.config import NodeConfig
    from rollshare.node import Node
    from rollshare.policies.tiny import embedded_policy

    cache = default_history_path(data_dir).parent / "models"
    base = embedded_policy(cache, MIX, size=model, warmup_steps=warmup_steps, show_progress=False)
    tps: dict[str, list[float]] = {"auto": [], TRANSFORMERS_DEFAULT: []}
    methods: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        import shutil

        # the nodes record their rounds: into a copy, so the benchmark leaves the history as it was
        history_copy = Path(tmp) / "history.jsonl"
        shutil.copy(history_path, history_copy)
        nodes = {}
        for name in tps:
            policy = copy.deepcopy(base)
            # rounds: the run's length, so that one-off setups (a compile) are only tried where they pay
            cfg = NodeConfig(data_dir=Path(tmp) / name, model=model, network=False, warmup_steps=warmup_steps,
                             gen_method=name, gen_history=str(history_copy), checkpoint_every=10_000,
                             threads=threads, rounds=rounds)
            nodes[name] = Node(cfg, policy=policy)
        try:
            for i in range(rounds):
                order = list(tps) if i % 2 == 0 else list(reversed(tps))
                for name in order:
                    m = nodes[name].run_round()
                    if i:  # the first round of each is warm-up
                        tps[name].append(m["tokens_per_s"])
                    if name == "auto":
                        methods.append(m.get("method", ""))
                log(f"  e2e round {i + 1}/{rounds}: auto {methods[-1]}")
        finally:
            for n in nodes.values():
                n.close()
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {"end_to_end_speedup": round(med["auto"] / med[TRANSFORMERS_DEFAULT], 4),
            "end_to_end": {"rounds": rounds - 1, "auto_tokens_per_s": round(med["auto"], 1),
                           "transformers_default_tokens_per_s": round(med[TRANSFORMERS_DEFAULT], 1),
                           "auto_methods": {m: methods.count(m) for m in sorted(set(methods))}}}


# ------------------------------------------------------------------ main

def _sklearn_factories() -> dict:
    try:
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    except ImportError:
        return {}
    return {"sklearn_gradient_boosting": lambda: GradientBoostingRegressor(n_estimators=150, max_depth=3,
                                                                          random_state=0),
            "sklearn_random_forest": lambda: RandomForestRegressor(n_estimators=200, min_samples_leaf=2,
                                                                   random_state=0)}


def main(argv: list[str] | None = None) -> int:
    from rollshare.bench.accel import default_history_path

    p = argparse.ArgumentParser(prog="rollshare bench selector", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quick", action="store_true",
                   help="fewer trees and cold-start seeds, 3 end-to-end rounds per side, no learner comparison (< 1 min)")
    p.add_argument("--history", help="history file (default <data-dir>/accel/history.jsonl)")
    p.add_argument("--data-dir", help="the node data directory holding accel/ (default: the node's)")
    p.add_argument("--rounds", type=int, help="end-to-end node rounds per side (default 12; 3 with --quick; 0 = skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the end-to-end nodes (default 1: on a shared machine more threads than "
                        "free cores stall on each other)")
    p.add_argument("--allow-lossy", action="store_true", help="let lossy methods compete (not for training rollouts)")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else None
    path = Path(args.history).expanduser() if args.history else default_history_path(data_dir)
    read = History(path).read()
    # the grid's measurements only: node rounds and peers' records are other settings and machines
    settings = settings_from_records([r for r in read.records if r.get("source") == "bench"])
    if len(settings) < 4:
        print(f"rollshare bench selector: {path} holds {len(settings)} usable settings ({read.skipped} lines "
              "skipped); run `rollshare bench accel` first to measure the methods", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    guard = GuardPolicy(allow_lossy=args.allow_lossy)
    probes = (0, 3, 10)
    n_trees = 40 if args.quick else 150
    seeds = 3 if args.quick else 20
    log(f"{len(settings)} settings from {path} ({len(read.records)} records, {read.skipped} skipped)")
    cv = cross_validate(settings, guard, probes, seeds=seeds, n_trees=n_trees, log=log)
    result = {"bench": "selector", "quick": bool(args.quick), "history": str(path), "settings": len(settings),
              "records": len(read.records), "learner": f"numpy gradient boosting ({n_trees} trees, depth 3)",
              **aggregate(cv["rows"], probes)}
    picks: dict[str, int] = {}
    for rs in cv["rows"].values():
        for r in rs:
            picks[r["oracle_method"]] = picks.get(r["oracle_method"], 0) + 1
    result["oracle_methods"] = dict(sorted(picks.items(), key=lambda kv: -kv[1]))
    result["noise_ceiling"] = noise_ceiling(settings, guard)
    by_threads: dict[str, list[Setting]] = {}
    for s in settings:
        by_threads.setdefault(SPLITS["threads"](s), []).append(s)
    result["noise_ceiling_by_threads"] = {k: noise_ceiling(v, guard) for k, v in sorted(by_threads.items())}
    if not args.quick:
        result["learners"] = {}
        for name, factory in _sklearn_factories().items():
            log(f"learner {name}")
            cv2 = cross_validate(settings, guard, (0,), seeds=1, factory=factory)
            a = aggregate(cv2["rows"], (0,))
            result["learners"][name] = {k: a[k] for k in ("median_regret", "mean_regret", "gap_closed", "top1")}
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 12)
    if rounds >= 2:
        log(f"end to end: {rounds} node rounds per side")
        result.update(end_to_end(path, rounds, data_dir=data_dir, threads=args.threads, log=log))
    else:
        result["end_to_end_speedup"] = None
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
