"""`rollshare bench learn`: does the default `rollshare run` setup learn, and how fast?

Runs the default node (embedded model built and warmed up on the spot, default task mix,
default hyper-parameters) from a fresh data directory for a fixed training-time budget, and
reports the mean sampled reward over the first and the last 50 rounds. Warm-up time is
reported separately and is not part of the training budget.

Last stdout line with --json: {"reward_first", "reward_last", "gain", "train_seconds", "rounds", ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from rollshare.config import NodeConfig

WINDOW = 50


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rollshare bench learn", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute, warm-up included)")
    ap.add_argument("--seconds", type=float, help="training-time budget (default 120, quick 30)")
    ap.add_argument("--max-rounds", type=int, default=0, help="stop after this many rounds (0 = time only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--data-dir", type=Path, help="default: a fresh temporary directory")
    ap.add_argument("--lr", type=float, help="GRPO learning rate (default: the node's default)")
    ap.add_argument("--warmup-steps", type=int, help="supervised warm-up steps (default: the node's; quick 150)")
    args = ap.parse_args(argv)
    budget = args.seconds or (30.0 if args.quick else 120.0)
    from rollshare.node import Node, evaluate

    with tempfile.TemporaryDirectory(prefix="rollshare-bench-learn-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        cfg = NodeConfig(data_dir=data_dir, seed=args.seed, threads=args.threads, checkpoint_every=10**9,
                         status="off", network=False)
        if args.quick:
            cfg = cfg.with_(warmup_steps=150)
        if args.lr:
            cfg = cfg.with_(lr=args.lr)
        if args.warmup_steps is not None:
            cfg = cfg.with_(warmup_steps=args.warmup_steps)
        t0 = time.monotonic()
        with Node(cfg, log=lambda m: print(m, file=sys.stderr)) as node:
            setup_s = time.monotonic() - t0
            acc_before = evaluate(node.policy, list(node.mix), n=200)
            rewards: list[float] = []
            t_train = time.monotonic()
            last_print = 0.0
            while time.monotonic() - t_train < budget and (not args.max_rounds or len(rewards) < args.max_rounds):
                m = node.run_round()
                rewards.append(m["reward"])
                now = time.monotonic()
                if now - last_print > 2 or len(rewards) == 1:
                    last_print = now
                    sys.stderr.write(f"\rtraining {now - t_train:5.1f}/{budget:.0f}s  round {len(rewards):5d}  "
                                     f"reward(ma50) {m['reward_ma']:.3f}  step {m['step_s'] * 1000:4.0f} ms")
                    sys.stderr.flush()
            train_s = time.monotonic() - t_train
            sys.stderr.write("\n")
            acc_after = evaluate(node.policy, list(node.mix), n=200)
            policy_name, params = node.policy.name, node.policy.num_parameters
    w = min(WINDOW, max(1, len(rewards) // 2))
    first = sum(rewards[:w]) / w
    last = sum(rewards[-w:]) / w
    result = {
        "bench": "learn",
        "reward_first": round(first, 4),
        "reward_last": round(last, 4),
        "gain": round(last - first, 4),
        "train_seconds": round(train_s, 1),
        "rounds": len(rewards),
        "window": w,
        "heldout_greedy_acc_before": acc_before,
        "heldout_greedy_acc_after": acc_after,
        "setup_seconds": round(setup_s, 1),
        "policy": policy_name,
        "params": params,
        "tasks": cfg.tasks,
        "prompts_per_round": cfg.prompts_per_round,
        "group_size": cfg.group_size,
        "lr": cfg.lr,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"reward {first:.3f} -> {last:.3f} (+{last - first:.3f}) over {len(rewards)} rounds "
              f"in {train_s:.0f}s of training; held-out greedy {acc_before} -> {acc_after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
