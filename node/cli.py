"""The `rollshare` command line: run a node, evaluate it, benchmark it.

Every flag maps onto one NodeConfig field; ROLLSHARE_<FIELD> environment variables give
defaults (for containers). Bad input ends in one line on stderr that says what to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from rollshare.config import ConfigError, NodeConfig, default_data_dir

EXIT_USAGE = 2


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    d = NodeConfig()
    g = p.add_argument_group("node")
    g.add_argument("--data-dir", type=Path, help=f"node state (default {default_data_dir()})")
    g.add_argument("--model", help="tiny-s | tiny | tiny-m (embedded, built on the spot) | smollm2 | a model directory "
                                   f"(default {d.model})")
    g.add_argument("--tasks", help=f"task mix 'family[:weight],...' (default {d.tasks})")
    g.add_argument("--prompt-style", choices=["compact", "full"])
    g.add_argument("--rounds", type=int, help="rounds to run, 0 = until stopped (default 0)")
    g.add_argument("--prompts-per-round", type=int, help=f"own groups per round (default {d.prompts_per_round})")
    g.add_argument("--group-size", type=int, help=f"completions per question (default {d.group_size})")
    g.add_argument("--max-new-tokens", type=int, help=f"(default {d.max_new_tokens})")
    g.add_argument("--temperature", type=float, help=f"(default {d.temperature})")
    g.add_argument("--lr", type=float, help=f"GRPO learning rate (default {d.lr})")
    g.add_argument("--warmup-steps", type=int, help=f"supervised warm-up of the embedded model (default {d.warmup_steps})")
    g.add_argument("--eps-low", type=float)
    g.add_argument("--eps-high", type=float)
    g.add_argument("--beta", type=float, help="KL coefficient (default 0: no reference model)")
    g.add_argument("--reward-fn", help="custom reward 'module:function', TRL signature f(completions, **kw)")
    g.add_argument("--checkpoint-every", type=int, help=f"rounds between checkpoints (default {d.checkpoint_every})")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    g.add_argument("--json-log", help="append one JSON object per round to this file")
    g.add_argument("--status", choices=["auto", "line", "off"], help="live status line (default auto)")


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> NodeConfig:
    """Flags override ROLLSHARE_* environment variables, which override defaults."""
    env = os.environ if env is None else env
    kw = {}
    for f in dataclasses.fields(NodeConfig):
        v = getattr(args, f.name, None)
        if v is None and f"ROLLSHARE_{f.name.upper()}" in env:
            raw = env[f"ROLLSHARE_{f.name.upper()}"]
            typ = {"int": int, "float": float, "Path": Path}.get(str(f.type), str)
            try:
                v = typ(raw)
            except ValueError:
                raise ConfigError(f"environment ROLLSHARE_{f.name.upper()}={raw!r} is not a valid {typ.__name__}") from None
        if v is not None:
            kw[f.name] = v
    return NodeConfig(**kw).validate()


def cmd_run(args: argparse.Namespace) -> int:
    from rollshare.node import Node
    from rollshare.status import StatusLine

    cfg = config_from_args(args)
    stop = {"flag": False}

    def on_signal(signum, frame):
        if stop["flag"]:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop["flag"] = True
        print("\nstopping after this round (Ctrl-C again to stop now)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with Node(cfg, log=log) as node:
        status = StatusLine(cfg.status)
        log(f"rollshare node: policy {node.policy.name} ({node.policy.num_parameters / 1e6:.2f}M params), "
            f"tasks {cfg.tasks}, data {node.data_dir}, starting at round {node.round}")
        try:
            node.run(cfg.rounds, on_round=status.update, should_stop=lambda: stop["flag"])
        finally:
            status.close()
        log(f"stopped at round {node.round}; checkpoint in {node.ckpt.root}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rollshare.node import Node, evaluate
    from rollshare.tasks import parse_mix

    cfg = config_from_args(args)
    families = list(parse_mix(args.families)) if args.families else list(parse_mix(cfg.tasks))
    with Node(cfg, log=lambda m: print(m, file=sys.stderr)) as node:
        acc = evaluate(node.policy, families, n=args.n, style=cfg.prompt_style,
                       max_new_tokens=max(cfg.max_new_tokens, 8))
        result = {"round": node.round, "policy": node.policy.name, "n": args.n, "accuracy": acc}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"greedy accuracy on {args.n} held-out items per family (round {result['round']}):")
        for fam, a in acc.items():
            print(f"  {fam:<20} {a:6.1%}")
    return 0


BENCHES = {
    "learn": "rollshare.bench.learn",
    "train": "rollshare.bench.train",
}


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    mod = importlib.import_module(BENCHES[args.name])
    return int(mod.main(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollshare", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run a node (trains until stopped; Ctrl-C stops cleanly)")
    _add_node_flags(r)
    e = sub.add_parser("eval", help="greedy accuracy per task family on held-out items")
    _add_node_flags(e)
    e.add_argument("--families", help="families to evaluate (default: the node's task mix)")
    e.add_argument("-n", type=int, default=200, help="held-out items per family (default 200)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    b = sub.add_parser("bench", help="benchmarks (each prints one JSON object last with --json)")
    b.add_argument("name", choices=sorted(BENCHES))
    return p


def main(argv: list[str] | None = None) -> int:
    from rollshare.checkpoint import CheckpointError
    from rollshare.policies import PolicyError
    from rollshare.tasks import TaskError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "eval":
            return cmd_eval(args)
        if args.cmd == "bench":
            return cmd_bench(args, rest)
    except (ConfigError, TaskError, PolicyError, CheckpointError) as e:
        print(f"rollshare: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
