"""`rollshare bench sapo`: does sharing pay? The SAPO paper's table on tiny models, and our strategies.

Swarms of N nodes (default 4 × tiny-s), every node trained on the same four task families,
I own + J shared groups per round:

    8/0, 6/2, 4/4, 2/6   the paper's sampler (drop zero-advantage, uniform, age limit)
    4/0                  half the generation of 8/0, nothing shared (what 4/4 costs without sharing)
    4/4 <strategy>       each of our strategies (--strategies); "best" is the one with the highest
                         specialist cumulative reward (picked on the same seeds: say so when quoting it)

on (a) a homogeneous swarm (every node warmed up on the uniform mix) and (b) a specialist swarm
(node k warmed up mostly on family k; `sapo.specialist_mix`). Seeds are paired: config A and
config B of one seed start from the same warmed-up models and draw the same task stream.

Two paths produce rows, and each row says which:

- `in-process`: N `Node` objects in this process, one round each in turn, exchanging groups
  through `SwarmSharing` over a loopback publisher that writes into the other nodes' stores
  (stamped with a round clock: 1 round = 1 s, so the age limit is counted in rounds). Same
  sampler, strategies and trainer code as a real node.
- `processes`: `rollshare swarm`'s LocalSwarm, real `rollshare run` processes over libp2p +
  gRPC on 127.0.0.1 (--process-rows), each with its own model directory; rewards from each
  node's rounds.jsonl, accuracy from its final checkpoint. Nodes run at their own pace.

Per row: cumulative reward (sum over rounds of each node's own mean reward, averaged over nodes
and seeds), final greedy held-out accuracy per family (test items disjoint from training
items), cross-family accuracy (specialists: accuracy on families other than the node's own),
local completions generated per node, wall time.

Last stdout line with --json: {"homogeneous": {config: cum reward}, "specialists": {...},
"gain_paper_4_4", "gain_best", "gain_best_vs_4_0", "cross_family_acc_silo",
"cross_family_acc_best", "seeds", "plot", "rows": [...], ...}. Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import signal
import sys
import threading
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

#: set when the benchmark is interrupted: a real-process swarm in progress is stopped at once
_STOP = threading.Event()

FAMILIES = ["chain_sum", "basic_arithmetic", "spell_backward", "base_conversion"]
PAPER_CONFIGS = [("8/0", 8, 0), ("6/2", 6, 2), ("4/4", 4, 4), ("2/6", 2, 6), ("4/0", 4, 0)]
MA = 20  # rounds in the plotted moving average


@dataclass(frozen=True)
class RunSpec:
    """One swarm run: one configuration, one swarm kind, one seed."""

    kind: str  # "homogeneous" | "specialists"
    label: str  # "8/0", "4/4", "4/4 inject", ...
    own: int  # I
    shared: int  # J
    strategy: str
    seed: int
    rounds: int
    nodes: int = 4
    sizes: tuple[str, ...] = ("tiny-s",)  # cycled over nodes: heterogeneous swarms mix sizes
    warmup_steps: int = 300
    focus: float = 0.9  # specialists: warm-up weight of the node's own family
    lr: float = 5e-4
    group_size: int = 8
    max_new_tokens: int = 5  # the node's default; base_conversion answers of 5+ digits need more
    window_rounds: int = 4  # age limit of shared groups
    offpolicy_shaping: float = 0.1
    eval_every: int = 0  # rounds between accuracy snapshots (0: only at the end)
    eval_n: int = 100
    path: str = "in-process"
    families: tuple[str, ...] = tuple(FAMILIES)

    def node_seed(self, k: int) -> int:
        return 1000 * self.seed + k

    def size(self, k: int) -> str:
        return self.sizes[k % len(self.sizes)]

    def warmup_mix(self, k: int) -> str:
        from rollshare.sapo import specialist_mix

        if self.kind == "specialists":
            return specialist_mix(self.families, k, self.focus)
        return ",".join(self.families)

    def specialty(self, k: int) -> str | None:
        return self.families[k % len(self.families)] if self.kind == "specialists" else None


def prepare_models(spec: RunSpec, cache: Path) -> list[Path]:
    """Node k's warmed-up model directory (built once, cached: every config of a seed shares it)."""
    from rollshare.policies.tiny import embedded_policy
    from rollshare.tasks import parse_mix

    out = []
    for k in range(spec.nodes):
        pol = embedded_policy(cache, parse_mix(spec.warmup_mix(k)), size=spec.size(k),
                              warmup_steps=spec.warmup_steps, seed=spec.node_seed(k), show_progress=False)
        out.append(cache / pol.name)
    return out


def node_config(spec: RunSpec, k: int, data_dir: Path, model: Path):
    from rollshare.config import NodeConfig

    return NodeConfig(data_dir=data_dir, model=str(model), tasks=",".join(spec.families), seed=spec.node_seed(k),
                      prompts_per_round=spec.own, shared_groups=spec.shared, sapo_strategy=spec.strategy,
                      group_size=spec.group_size, lr=spec.lr, offpolicy_shaping=spec.offpolicy_shaping,
                      shared_window_s=float(spec.window_rounds), checkpoint_every=10**9, status="off", threads=1,
                      max_new_tokens=spec.max_new_tokens)


def cross_family(spec: RunSpec, acc: Sequence[dict[str, float]]) -> float | None:
    """Mean accuracy of specialists on the families that are not their own."""
    if spec.kind != "specialists":
        return None
    vals = [a[f] for k, a in enumerate(acc) for f in spec.families if f != spec.specialty(k)]
    return sum(vals) / len(vals) if vals else None


# ------------------------------------------------------------------------------ in-process


class LoopbackExchange:
    """N in-process nodes' publisher: a published group goes into every other node's store,
    stamped with the round clock (created_at_ms = round × 1000)."""

    def __init__(self):
        self.round = 0
        self.stores: dict[str, object] = {}

    def clock(self) -> int:
        return self.round * 1000

    def publisher(self, origin: str):
        exchange = self

        class Publisher:
            def publish(self, groups) -> None:
                from rollshare.proto import rollout_pb2 as pb

                stamped = []
                for g in groups:
                    c = pb.RolloutGroup()
                    c.CopyFrom(g)
                    c.created_at_ms = exchange.clock()
                    stamped.append(c)
                for o, store in exchange.stores.items():
                    if o != origin:
                        store.put_many(stamped, origin=origin)

        return Publisher()


def run_inprocess(spec: RunSpec, work: Path, log=None) -> dict:
    import torch
    from rollshare.node import Node, evaluate
    from rollshare.sharing import SwarmSharing
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    models = prepare_models(spec, work / "models")
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    ex = LoopbackExchange()
    nodes = []
    for k in range(spec.nodes):
        n = Node(node_config(spec, k, run_dir / f"node{k}", models[k]), origin=f"node{k}", show_progress=False)
        ex.stores[n.origin] = n.store
        n.sharing = SwarmSharing(ex.publisher(n.origin), n.store, n.origin, seed=spec.node_seed(k),
                                 window_s=float(spec.window_rounds), clock=ex.clock)
        nodes.append(n)
    rewards = [[] for _ in nodes]
    completions = [0] * len(nodes)
    acc_curve: list[dict] = []
    t0 = time.monotonic()
    try:
        for r in range(spec.rounds):
            ex.round = r + 1
            for k, n in enumerate(nodes):
                m = n.run_round()
                rewards[k].append(m["reward"])
                completions[k] += m["completions"]
            if spec.eval_every and (r + 1) % spec.eval_every == 0 and r + 1 < spec.rounds:
                acc_curve.append({"round": r + 1, "acc": [evaluate(n.policy, spec.families, n=spec.eval_n // 2)
                                                          for n in nodes]})
            if log and (r + 1) % 25 == 0:
                log(f"{spec.kind} {spec.label} seed {spec.seed}: round {r + 1}/{spec.rounds} "
                    f"reward {sum(x[-1] for x in rewards) / len(nodes):.3f} ({time.monotonic() - t0:.0f}s)")
        wall = time.monotonic() - t0
        acc = [evaluate(n.policy, spec.families, n=spec.eval_n) for n in nodes]
        acc_curve.append({"round": spec.rounds, "acc": acc})
    finally:
        for n in nodes:
            n.close()
    return _result(spec, rewards, completions, acc, acc_curve, wall)


def _result(spec: RunSpec, rewards: list[list[float]], completions: list[int], acc: list[dict],
            acc_curve: list[dict], wall: float) -> dict:
    cum = [sum(r) for r in rewards]
    T = min(len(r) for r in rewards)
    return {
        "spec": asdict(spec),
        "cum_reward": sum(cum) / len(cum),
        "cum_reward_per_node": cum,
        "reward_curve": [sum(r[t] for r in rewards) / len(rewards) for t in range(T)],
        "acc_per_node": acc,
        "acc_curve": acc_curve,
        "cross_family_acc": cross_family(spec, acc),
        "completions_per_node": sum(completions) / len(completions),
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------- processes


def run_processes(spec: RunSpec, work: Path, log=None, timeout_s: float = 3600) -> dict:
    """The same run through real `rollshare run` processes over libp2p + gRPC (LocalSwarm)."""
    import torch
    from rollshare.checkpoint import CheckpointManager
    from rollshare.node import evaluate
    from rollshare.policies import Policy
    from rollshare.swarm import LocalSwarm

    models = prepare_models(spec, work / "models")
    run_dir = Path(tempfile.mkdtemp(prefix="swarm-", dir=work))
    cfg = node_config(spec, 0, run_dir, models[0])
    flags = ["--tasks", cfg.tasks, "--prompts-per-round", str(spec.own), "--group-size", str(spec.group_size),
             "--lr", str(spec.lr), "--max-new-tokens", str(spec.max_new_tokens), "--sapo-strategy", spec.strategy,
             "--offpolicy-shaping", str(spec.offpolicy_shaping),
             "--checkpoint-every", "1000000", "--reconcile-interval", "1"]
    # real nodes run on wall time: the age limit is window_rounds × 2 s (a tiny-s node's round
    # took 0.3-1 s on 2 shared cores, so this spans a few more rounds than in-process)
    flags += ["--shared-window", str(2.0 * spec.window_rounds)]
    swarm = LocalSwarm(run_dir, str(models[0]), rounds=spec.rounds, shared_groups=spec.shared, threads=1,
                       run_flags=flags, seed=spec.node_seed(0), models=[str(m) for m in models])
    t0 = time.monotonic()
    try:
        swarm.start(spec.nodes)
        while not swarm.all_exited:
            if _STOP.is_set():
                raise KeyboardInterrupt("bench sapo interrupted")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"process swarm did not finish {spec.rounds} rounds in {timeout_s:g} s")
            time.sleep(1.0)
    finally:
        swarm.stop(30.0)
    wall = time.monotonic() - t0
    failed = [n.name for n in swarm.nodes if n.exit_code != 0]
    if failed:
        tails = "\n".join(f"{n.name}: " + " | ".join(n.log_tail(5)) for n in swarm.nodes if n.name in failed)
        raise RuntimeError(f"swarm nodes failed: {failed}\n{tails}")
    rewards, completions, acc = [], [], []
    torch.set_num_threads(1)
    for k, n in enumerate(swarm.nodes):
        rows = [json.loads(line) for line in (n.data_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
        rewards.append([m["reward"] for m in rows])
        completions.append(sum(m.get("completions", 0) for m in rows))
        ck = CheckpointManager(n.data_dir / "checkpoints").latest()
        pol = Policy.from_pretrained(ck.path)
        acc.append(evaluate(pol, spec.families, n=spec.eval_n))
    return _result(spec, rewards, completions, acc, [{"round": spec.rounds, "acc": acc}], wall)


# ------------------------------------------------------------------------------- the table


def _warm(args: tuple) -> None:
    """Build node k's model of a (kind, seed) (one-node spec whose node 0 stands for node k)."""
    import torch
    from transformers.utils import logging as hf_logging

    spec, k, work = args
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    from rollshare.policies.tiny import embedded_policy
    from rollshare.tasks import parse_mix

    embedded_policy(Path(work) / "models", parse_mix(spec.warmup_mix(k)), size=spec.sizes[0],
                    warmup_steps=spec.warmup_steps, seed=spec.node_seed(k), show_progress=False)


def _job(args: tuple) -> dict:
    spec, work = args
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t = time.monotonic()
    r = run_processes(spec, Path(work), log) if spec.path == "processes" else run_inprocess(spec, Path(work), log)
    log(f"done {spec.path} {spec.kind} {spec.label} seed {spec.seed}: cum reward {r['cum_reward']:.1f}, "
        f"cross-family acc {r['cross_family_acc']}, {time.monotonic() - t:.0f}s")
    return r


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(results: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Rows by (path, kind, label): means over seeds."""
    by: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        s = r["spec"]
        by.setdefault((s["path"], s["kind"], s["label"]), []).append(r)
    rows = {}
    for key, rs in by.items():
        fams = rs[0]["spec"]["families"]
        T = min(len(r["reward_curve"]) for r in rs)
        rows[key] = {
            "path": key[0], "swarm": key[1], "config": key[2], "strategy": rs[0]["spec"]["strategy"],
            "own": rs[0]["spec"]["own"], "shared": rs[0]["spec"]["shared"],
            "seeds": sorted(r["spec"]["seed"] for r in rs),
            "cum_reward": _mean([r["cum_reward"] for r in rs]),
            "cum_reward_per_seed": [round(r["cum_reward"], 2) for r in rs],
            "final_acc": {f: round(_mean([a[f] for r in rs for a in r["acc_per_node"]]), 4) for f in fams},
            "cross_family_acc": _mean([r["cross_family_acc"] for r in rs]),
            "completions_per_node": _mean([r["completions_per_node"] for r in rs]),
            "wall_s": _mean([r["wall_s"] for r in rs]),
            "reward_curve": [sum(r["reward_curve"][t] for r in rs) / len(rs) for t in range(T)],
            "acc_curve": _acc_curve(rs),
        }
        c, w = rows[key]["reward_curve"], max(1, min(MA, T // 2))
        rows[key]["reward_first"] = sum(c[:w]) / w  # mean reward of the first and last rounds:
        rows[key]["reward_last"] = sum(c[-w:]) / w  # has the silo risen, has 2/6 collapsed?
    return rows


def _acc_curve(rs: list[dict]) -> list[dict]:
    """Per snapshot: mean accuracy per family over seeds and over the nodes that are not its specialist."""
    out = []
    for i, snap in enumerate(rs[0]["acc_curve"]):
        fam_acc = {}
        for f in rs[0]["spec"]["families"]:
            vals = []
            for r in rs:
                if i >= len(r["acc_curve"]):
                    continue
                spec = RunSpec(**{**r["spec"], "sizes": tuple(r["spec"]["sizes"]),
                                  "families": tuple(r["spec"]["families"])})
                vals += [a[f] for k, a in enumerate(r["acc_curve"][i]["acc"]) if spec.specialty(k) != f]
            fam_acc[f] = _mean(vals)
        out.append({"round": snap["round"], "acc": fam_acc})
    return out


def plot(rows: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("homogeneous", "specialists") if any(key[1] == k for key in rows)]
    fams = next(iter(rows.values()))["final_acc"].keys()
    fig, axes = plt.subplots(2, max(2, len(fams)), figsize=(4.2 * max(2, len(fams)), 7.5), squeeze=False)
    for j, kind in enumerate(kinds):
        ax = axes[0][j]
        for (p, k, label), row in sorted(rows.items()):
            if k != kind:
                continue
            c = row["reward_curve"]
            ma = [sum(c[max(0, t - MA + 1):t + 1]) / len(c[max(0, t - MA + 1):t + 1]) for t in range(len(c))]
            ax.plot(range(1, len(ma) + 1), ma, label=f"{label}" + (" (proc)" if p == "processes" else ""))
        ax.set_title(f"{kind}: reward (moving avg {MA})")
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    for j in range(len(kinds), axes.shape[1]):
        axes[0][j].axis("off")
    for j, f in enumerate(fams):
        ax = axes[1][j]
        for (p, k, label), row in sorted(rows.items()):
            if k != "specialists" or p != "in-process" or len(row["acc_curve"]) < 1:
                continue
            xs = [s["round"] for s in row["acc_curve"]]
            ax.plot(xs, [s["acc"][f] for s in row["acc_curve"]], marker="o", ms=3, label=label)
        ax.set_title(f"specialists: {f} accuracy\n(nodes it is not the specialty of)", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(bottom=-0.01)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rollshare bench sapo", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--quick", action="store_true", help="a small run (2 nodes, 1 seed, few rounds; a few minutes)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--sizes", default="tiny-s", help="model sizes cycled over nodes, e.g. tiny-s,tiny")
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--focus", type=float, default=0.9, help="specialists: warm-up weight on the node's own family")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-new-tokens", type=int, default=5, help="per completion (the node's default 5)")
    ap.add_argument("--window-rounds", type=int, default=4, help="age limit of shared groups, in rounds")
    ap.add_argument("--offpolicy-shaping", type=float, default=0.1)
    ap.add_argument("--strategies", default="inject,inject_need,shaped,2/6:shaped",
                    help="our strategies: NAME (run at 4/4) or I/J:NAME")
    ap.add_argument("--kinds", default="homogeneous,specialists")
    ap.add_argument("--configs", default="8/0,6/2,4/4,2/6,4/0", help="paper-sampler configurations I/J")
    ap.add_argument("--eval-every", type=int, default=0, help="accuracy snapshots (default: rounds/5)")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out items per family")
    ap.add_argument("--process-rows", default="", help="also through real processes, e.g. "
                    "'specialists:8/0,specialists:4/4 inject' (first seed only)")
    ap.add_argument("--process-seeds", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each one thread)")
    ap.add_argument("--work-dir", type=Path, help="models and node data (default: a temporary directory)")
    ap.add_argument("--plot", type=Path, help="PNG path (default sapo.png in the work dir)")
    ap.add_argument("--out", type=Path, help="also write every run's full result here (JSON)")
    ap.add_argument("--from-runs", type=Path, help="summarise and plot the runs an earlier --out wrote (no training)")
    args = ap.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        def interrupted(*_):
            raise KeyboardInterrupt("terminated")

        signal.signal(signal.SIGTERM, interrupted)  # like Ctrl-C: node processes are stopped, not orphaned
    if args.quick:
        args.seeds, args.rounds, args.nodes, args.warmup_steps, args.eval_n = 1, 30, 2, 150, 40
        args.configs, args.strategies = "8/0,4/4,4/0", "inject_need"
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)  # one thread per run: runs go side by side (--jobs), not threads
    hf_logging.disable_progress_bar()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rollshare-bench-sapo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = RunSpec(kind="", label="", own=0, shared=0, strategy="paper", seed=0, rounds=args.rounds,
                   nodes=args.nodes, sizes=tuple(args.sizes.split(",")), warmup_steps=args.warmup_steps,
                   focus=args.focus, lr=args.lr, max_new_tokens=args.max_new_tokens,
                   window_rounds=args.window_rounds,
                   offpolicy_shaping=args.offpolicy_shaping,
                   eval_every=args.eval_every or max(1, args.rounds // 5), eval_n=args.eval_n)
    configs = {lab: (i, j, "paper") for lab, i, j in PAPER_CONFIGS if lab in args.configs.split(",")}
    for s in [x for x in args.strategies.split(",") if x]:  # "NAME" (at 4/4) or "I/J:NAME"
        ij, _, name = s.rpartition(":")
        i, j = map(int, (ij or "4/4").split("/"))
        configs[f"{i}/{j} {name}"] = (i, j, name)
    specs = [replace(base, kind=kind, label=lab, own=i, shared=j, strategy=st, seed=seed)
             for seed in range(args.seeds) for kind in args.kinds.split(",") for lab, (i, j, st) in configs.items()]
    for item in [x for x in args.process_rows.split(",") if x]:
        kind, _, lab = item.partition(":")
        i, j, st = configs[lab]
        specs += [replace(base, kind=kind, label=lab, own=i, shared=j, strategy=st, seed=seed, path="processes",
                          eval_every=0) for seed in range(args.process_seeds)]
    t0 = time.monotonic()
    if args.from_runs:
        results = json.loads(args.from_runs.read_text())["runs"]
        first = results[0]["spec"]
        args.seeds = len({r["spec"]["seed"] for r in results})
        args.nodes, args.rounds, args.sizes = first["nodes"], first["rounds"], ",".join(first["sizes"])
    else:
        results = run_all(base, specs, args, work, log)
    rows = aggregate(results)
    summary = summarise(rows, args)
    plot_path = args.plot or work / "sapo.png"
    plot(rows, plot_path, title=f"rollshare bench sapo: {args.nodes} nodes × {args.sizes}, {args.rounds} rounds, "
                                f"{args.seeds} seeds")
    summary["plot"] = str(plot_path)
    summary["total_wall_s"] = round(time.monotonic() - t0 if not args.from_runs else
                                    sum(r["wall_s"] for r in results), 1)
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": results}))
    if args.json:
        print(json.dumps(summary))
    else:
        for r in summary["rows"]:
            print(f"{r['path']:<10} {r['swarm']:<12} {r['config']:<16} cum {r['cum_reward']:8.2f}  "
                  f"cross {r['cross_family_acc']}  acc {r['final_acc']}")
        print({k: v for k, v in summary.items() if k != "rows"})
    return 0


def run_all(base: RunSpec, specs: list[RunSpec], args, work: Path, log) -> list[dict]:
    """Warm every model once (node by node, in parallel, before runs would race to build the same
    one), then the in-process runs (--jobs at a time) with the real-process swarms beside them."""
    warm = [(replace(base, kind=kind, seed=seed, nodes=1, sizes=(base.size(k),)), k, str(work))
            for seed in range(args.seeds) for kind in args.kinds.split(",") for k in range(args.nodes)]
    log(f"bench sapo: warming up {len(warm)} models, then {len(specs)} runs ({args.nodes} nodes, "
        f"{args.rounds} rounds) in {work}")
    jobs = [(s, str(work)) for s in specs]
    inproc = [j for j in jobs if j[0].path == "in-process"]
    procs = [j for j in jobs if j[0].path == "processes"]
    pool = mp.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
    try:
        list(pool.imap_unordered(_warm, warm)) if pool else [_warm(w) for w in warm]
        with ThreadPoolExecutor(1) as side:  # real swarms one at a time, beside the in-process runs
            try:
                proc_results = side.submit(lambda: [_job(j) for j in procs])
                results = pool.map(_job, inproc, chunksize=1) if pool else [_job(j) for j in inproc]
                return results + proc_results.result()
            except BaseException:
                _STOP.set()  # the side thread stops its swarm (and its node processes) before we leave
                raise
    except BaseException:
        if pool:
            pool.terminate()  # in-process runs are not waited for
        raise
    finally:
        if pool:
            pool.close()
            pool.join()


def summarise(rows: dict, args) -> dict:
    def cum(kind: str, label: str, path: str = "in-process") -> float | None:
        r = rows.get((path, kind, label))
        return None if r is None else round(r["cum_reward"], 2)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else round(a / b, 3)

    out: dict = {"bench": "sapo"}
    for kind in ("homogeneous", "specialists"):
        out[kind] = {lab: round(r["cum_reward"], 2) for (p, k, lab), r in rows.items()
                     if k == kind and p == "in-process"}
    ours = {lab: c for lab, c in out["specialists"].items() if lab.startswith("4/4 ")}
    best = max(ours, key=ours.get) if ours else None
    out["best_strategy"] = best
    out["gain_paper_4_4"] = ratio(cum("specialists", "4/4"), cum("specialists", "8/0"))
    out["gain_best"] = ratio(cum("specialists", best), cum("specialists", "8/0")) if best else None
    out["gain_best_vs_4_0"] = ratio(cum("specialists", best), cum("specialists", "4/0")) if best else None
    out["gain_2_6"] = ratio(cum("specialists", "2/6"), cum("specialists", "8/0"))
    out["homogeneous_gain_best"] = ratio(cum("homogeneous", best), cum("homogeneous", "8/0")) if best else None
    silo = rows.get(("in-process", "specialists", "8/0"))
    b = rows.get(("in-process", "specialists", best)) if best else None
    out["cross_family_acc_silo"] = None if silo is None else round(silo["cross_family_acc"], 4)
    out["cross_family_acc_best"] = None if b is None else round(b["cross_family_acc"], 4)
    out["seeds"] = args.seeds
    out["processes"] = {f"{k} {lab}": round(r["cum_reward"], 2) for (p, k, lab), r in rows.items() if p == "processes"}
    out["rows"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                    if k not in ("reward_curve", "acc_curve")} for r in rows.values()]
    out.update(nodes=args.nodes, rounds=args.rounds, sizes=args.sizes, quick=args.quick)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
