"""The `rollshare` command line: run a node, evaluate it, benchmark it, ask a running node.

Every flag maps onto one NodeConfig field; ROLLSHARE_<FIELD> environment variables give
defaults (for containers; ROLLSHARE_BOOTSTRAP is comma-separated, booleans are 1/0). Bad input
ends in one line on stderr that says what to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

from rollshare.config import DEFAULT_GRPC_PORT, ConfigError, NodeConfig, default_data_dir

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
    g.add_argument("--warmup-tasks", help="warm-up mix of the embedded model, e.g. 'spell_backward:9,chain_sum:1' for "
                                          "a specialist (default: the --tasks mix)")
    g.add_argument("--eps-low", type=float)
    g.add_argument("--eps-high", type=float)
    g.add_argument("--beta", type=float, help="KL coefficient (default 0: no reference model)")
    g.add_argument("--reward-fn", help="custom reward 'module:function', TRL signature f(completions, **kw)")
    g.add_argument("--checkpoint-every", type=int, help=f"rounds between checkpoints (default {d.checkpoint_every})")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    g.add_argument("--json-log", help="append one JSON object per round to this file")
    g.add_argument("--status", choices=["auto", "line", "off"], help="live status line (default auto)")
    g.add_argument("--gen-method", help="generation method: auto (the selector picks each round, learning from "
                                        "`rollshare bench accel` and its own rounds) or a method name such as policy, "
                                        f"hf-default (default {d.gen_method})")
    g.add_argument("--gen-history", help="measurement history of the selector (default <data-dir>/accel/history.jsonl)")
    g.add_argument("--allow-lossy-rollouts", action="store_true", default=None,
                   help="let lossy methods (int8, half precision) generate training rollouts, within a measured "
                        "divergence bound (default: lossless methods only)")


def _add_network_flags(p: argparse.ArgumentParser) -> None:
    d = NodeConfig()
    g = p.add_argument_group("swarm")
    g.add_argument("--no-network", dest="network", action="store_false", default=None,
                   help="train alone: no libp2p, no gRPC, nothing shared")
    g.add_argument("--bootstrap", action="append", metavar="ADDR",
                   help="join the swarm through this peer: a multiaddr /ip4/H/tcp/P/p2p/ID or the host:port of its "
                        "gRPC service (repeatable; env ROLLSHARE_BOOTSTRAP, comma-separated)")
    g.add_argument("--listen-host", help=f"address to listen on (default {d.listen_host})")
    g.add_argument("--p2p-port", type=int, help=f"libp2p TCP port, 0 = any free port (default {d.p2p_port})")
    g.add_argument("--grpc-port", type=int, help=f"gRPC port, 0 = any free port (default {d.grpc_port})")
    g.add_argument("--advertise-host", help="host peers use to reach our gRPC service (default: this machine's address)")
    g.add_argument("--identity", help="ed25519 key file (default <data-dir>/identity.key; made on first start)")
    g.add_argument("--shared-groups", type=int, metavar="J",
                   help=f"groups from other peers in each training batch (default {d.shared_groups})")
    g.add_argument("--sapo-strategy", choices=["paper", "need", "shaped", "inject", "inject_need"],
                   help="how shared groups are picked and used: paper (drop zero-advantage, uniform), need "
                        "(prefer families we fail and the peer solves), shaped (paper, shared tokens policy-shaped), "
                        "inject (merge the peer's completions into "
                        f"our own group of the question), inject_need (both) (default {d.sapo_strategy})")
    g.add_argument("--shared-window", dest="shared_window_s", type=float, metavar="S",
                   help="use shared groups at most S seconds old (default 0: the store's max age)")
    g.add_argument("--offpolicy-shaping", type=float, metavar="GAMMA",
                   help=f"γ of the policy shaping p/(p+γ) for injected peer tokens; 0 = ratio against our own "
                        f"log-probs (default {d.offpolicy_shaping:g})")
    g.add_argument("--mdns", action="store_true", default=None, help="find peers on the local network with mDNS")
    g.add_argument("--reconcile-interval", dest="reconcile_interval_s", type=float,
                   help=f"seconds between reconciliations with a random peer (default {d.reconcile_interval_s:g})")
    g.add_argument("-v", "--verbose", action="store_true", help="log swarm events (INFO)")


def _env_value(name: str, type_name: str, raw: str):
    """A ROLLSHARE_* environment value converted to the field's type; ConfigError if it does not fit."""
    if type_name == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"environment {name}={raw!r} is not a valid bool; use 1 or 0")
    if type_name.startswith("tuple"):
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    typ = {"int": int, "float": float, "Path": Path}.get(type_name, str)
    try:
        return typ(raw)
    except ValueError:
        raise ConfigError(f"environment {name}={raw!r} is not a valid {typ.__name__}") from None


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> NodeConfig:
    """Flags override ROLLSHARE_* environment variables, which override defaults."""
    env = os.environ if env is None else env
    kw = {}
    for f in dataclasses.fields(NodeConfig):
        v = getattr(args, f.name, None)
        if isinstance(v, list):
            v = tuple(v)
        name = f"ROLLSHARE_{f.name.upper()}"
        if v is None and name in env:
            v = _env_value(name, str(f.type), env[name])
        if v is not None:
            kw[f.name] = v
    return NodeConfig(**kw).validate()


def _hardware_summary() -> str:
    import torch

    s = f"{os.cpu_count()} CPU"
    if torch.cuda.is_available():
        s += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return s


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from rollshare.net.p2p import route_libp2p_logs

    route_libp2p_logs(logging.WARNING)


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
    keypair, origin = None, ""
    if cfg.network:
        from rollshare.net.identity import IdentityError, load_or_create_identity, peer_id_of

        _setup_logging(getattr(args, "verbose", False))
        try:
            keypair = load_or_create_identity(cfg.identity_path)
        except IdentityError as e:
            raise ConfigError(str(e)) from None
        origin = peer_id_of(keypair)
    with Node(cfg, log=log, origin=origin) as node:
        status = StatusLine(cfg.status)
        log(f"rollshare node: policy {node.policy.name} ({node.policy.num_parameters / 1e6:.2f}M params), "
            f"tasks {cfg.tasks}, data {node.data_dir}, starting at round {node.round}")
        net = _start_network(cfg, node, keypair, log) if cfg.network else None
        try:
            if net is None:
                on_round = status.update
            else:
                def on_round(m: dict) -> None:
                    s = net.status()
                    status.update({**m, "peers": s["peers"], "groups_in": s["groups_in"],
                                   "groups_out": s["groups_out"]})
            node.run(cfg.rounds, on_round=on_round, should_stop=lambda: stop["flag"])
        finally:
            status.close()
            if net is not None:
                s = net.status()
                net.stop()
                log(f"left the swarm: groups out {s['groups_out']}, in {s['groups_in']}, "
                    f"rejected {sum(s['rejected'].values())}")
        log(f"stopped at round {node.round}; checkpoint in {node.ckpt.root}")
    return 0


def _start_network(cfg: NodeConfig, node, keypair, log):
    """Join the swarm and plug SwarmSharing into the node; ConfigError (one line) if that fails."""
    from rollshare.net.service import NetworkConfig, NetworkError, NetworkService
    from rollshare.sharing import SwarmSharing

    net_cfg = NetworkConfig(listen_host=cfg.listen_host, p2p_port=cfg.p2p_port, grpc_port=cfg.grpc_port,
                            advertise_host=cfg.advertise_host, bootstrap=tuple(cfg.bootstrap), mdns=cfg.mdns,
                            reconcile_interval_s=cfg.reconcile_interval_s)
    from rollshare.net.perf_records import PerfExchange

    perf = PerfExchange(keypair, node.generation.history)  # our measurements out, peers' into our history
    net = NetworkService(node.store, keypair, net_cfg, metrics=lambda: node.last or {"round": node.round},
                         model=node.policy.name, hardware=_hardware_summary(), perf=perf)
    node.generation.share_with(perf)
    try:
        net.start()
    except NetworkError as e:
        raise ConfigError(str(e)) from None
    node.sharing = SwarmSharing(net, node.store, node.origin, reward_fn=node.reward_fn, seed=cfg.seed,
                                window_s=cfg.shared_window_s)
    info = net.info()
    log(f"swarm: peer id {info['peer_id']}, gRPC {info['grpc_endpoint']}, p2p {info['multiaddrs'][0]}; "
        f"others join with --bootstrap {info['grpc_endpoint']}")
    return net


def cmd_keygen(args: argparse.Namespace) -> int:
    from rollshare.net.identity import IdentityError, keygen, peer_id_of

    if args.identity:
        path = Path(args.identity).expanduser()
    elif os.environ.get("ROLLSHARE_IDENTITY"):
        path = Path(os.environ["ROLLSHARE_IDENTITY"]).expanduser()
    else:
        data_dir = args.data_dir or Path(os.environ.get("ROLLSHARE_DATA_DIR") or default_data_dir())
        path = Path(data_dir).expanduser() / "identity.key"
    try:
        kp = keygen(path, force=args.force)
    except IdentityError as e:
        raise ConfigError(str(e)) from None
    print(peer_id_of(kp))
    print(f"wrote {path} (mode 0600)", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from rollshare.proto import wire_pb2 as wire
    from rollshare.proto import wire_pb2_grpc as wire_grpc

    addr = args.addr or f"127.0.0.1:{DEFAULT_GRPC_PORT}"
    try:
        with grpc.insecure_channel(addr) as channel:
            st = wire_grpc.RolloutsStub(channel).Status(wire.StatusRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"rollshare: error: no rollshare node answered at {addr} within {args.timeout:g} s; check the "
                  f"address (a node's gRPC port, default {DEFAULT_GRPC_PORT}) and that `rollshare run` is running there",
                  file=sys.stderr)
        else:
            print(f"rollshare: error: the node at {addr} refused Status: {e.code().name}: {e.details()}",
                  file=sys.stderr)
        return 1
    i = st.info
    d = {"peer_id": i.peer_id, "grpc_endpoint": i.grpc_endpoint, "multiaddrs": list(i.multiaddrs),
         "model": i.model, "hardware": i.hardware, "version": i.version, "round": i.round, "peers": st.peers,
         "groups_stored": st.groups_stored, "groups_in": st.groups_in, "groups_out": st.groups_out,
         "reward_ma": st.reward_ma, "tokens_per_s": st.tokens_per_s, "step_s": st.step_s, "method": st.method,
         "rejected": dict(st.rejected)}
    if args.json:
        print(json.dumps(d))
        return 0
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(d["rejected"].items())) or "none"
    rows = [
        ("node", f"{d['peer_id']}  (rollshare {d['version'] or '?'})"),
        ("model", f"{d['model']} on {d['hardware']}"),
        ("round", str(d["round"])),
        ("reward (ma)", f"{d['reward_ma']:.3f}"),
        ("speed", f"{d['tokens_per_s']:.0f} tok/s, step {d['step_s'] * 1000:.0f} ms"
                  + (f", gen {d['method']}" if d["method"] else "")),
        ("peers", str(d["peers"])),
        ("groups", f"stored {d['groups_stored']}, in {d['groups_in']}, out {d['groups_out']}"),
        ("rejected", rejected),
        ("gRPC", d["grpc_endpoint"]),
        *[("p2p" if k == 0 else "", a) for k, a in enumerate(d["multiaddrs"])],
    ]
    for k, v in rows:
        print(f"{k:<12} {v}")
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
    "gossip": "rollshare.bench.gossip",
    "sapo": "rollshare.bench.sapo",
    "accel": "rollshare.bench.accel",
    "selector": "rollshare.bench.selector",
}


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    mod = importlib.import_module(BENCHES[args.name])
    return int(mod.main(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollshare", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run a node, a swarm member (trains until stopped; Ctrl-C stops cleanly)")
    _add_node_flags(r)
    _add_network_flags(r)
    k = sub.add_parser("keygen", help="make the node's ed25519 identity and print its peer id")
    k.add_argument("--identity", help="key file (default <data-dir>/identity.key)")
    k.add_argument("--data-dir", type=Path, help=f"(default {default_data_dir()})")
    k.add_argument("--force", action="store_true", help="replace an existing key (the peer id changes)")
    s = sub.add_parser("status", help="ask a running node over gRPC")
    s.add_argument("addr", nargs="?", help=f"host:port of its gRPC service (default 127.0.0.1:{DEFAULT_GRPC_PORT})")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    e = sub.add_parser("eval", help="greedy accuracy per task family on held-out items")
    _add_node_flags(e)
    e.add_argument("--families", help="families to evaluate (default: the node's task mix)")
    e.add_argument("-n", type=int, default=200, help="held-out items per family (default 200)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    # no -h of its own: `rollshare bench NAME --help` shows the benchmark's own flags
    b = sub.add_parser("bench", help="benchmarks (each prints one JSON object last with --json)", add_help=False)
    b.add_argument("name", choices=sorted(BENCHES))
    from rollshare import swarm

    w = sub.add_parser("swarm", help="N nodes on this machine with a live table (Ctrl-C stops them all)",
                       description="Start N `rollshare run` processes on 127.0.0.1 (free ports, "
                       "node0 the bootstrap), show a live table, stop them all on Ctrl-C.")
    swarm.add_arguments(w)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd not in ("bench", "swarm") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd in ("keygen", "status"):  # quick commands: no torch import
        try:
            return cmd_keygen(args) if args.cmd == "keygen" else cmd_status(args)
        except ConfigError as e:
            print(f"rollshare: error: {e}", file=sys.stderr)
            return EXIT_USAGE

    from rollshare.checkpoint import CheckpointError
    from rollshare.policies import PolicyError
    from rollshare.tasks import TaskError

    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "eval":
            return cmd_eval(args)
        if args.cmd == "bench":
            return cmd_bench(args, rest)
        if args.cmd == "swarm":
            from rollshare.swarm import cmd_swarm

            return cmd_swarm(args, rest)
    except (ConfigError, TaskError, PolicyError, CheckpointError) as e:
        print(f"rollshare: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
