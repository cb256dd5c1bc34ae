"""`rollshare swarm`: a whole swarm on this machine, one command, one table, one Ctrl-C.

    rollshare swarm --nodes 4 [--model tiny-s] [--rounds R] [--shared-groups J] [--base-dir DIR]
                    [--threads-per-node 1] [--sizes tiny-s,tiny] [--specialists] [--plot PATH]
                    [--json] [-- any `rollshare run` flags]

Heterogeneous swarms: --sizes cycles embedded model sizes over the nodes (node k runs
sizes[k % len]); --specialists warms node k up mostly on family k of the task mix
(`sapo.specialist_mix`), while every node still trains on the whole mix. Shared groups travel
as text, so nodes of different sizes or tokenizers share freely. --plot writes a PNG of each
node's moving-average reward and its sampled reward per task family over rounds (from the
nodes' rounds.jsonl) when the swarm ends.

What happens, in order:

1. Warm-up once. An embedded model size (tiny-s, tiny, tiny-m) is built and warmed up here,
   once, into <base-dir>/models (the same cache `rollshare run` keeps in its data directory,
   so a second start with the same base dir is instant). Every node then gets
   `--model <that directory>`: N nodes do not warm up N times side by side.
2. Start. N `rollshare run` processes on 127.0.0.1, each with free p2p and gRPC ports, its own
   data directory <base-dir>/nodeK (identity, store, checkpoints, rounds.jsonl) and its
   stdout/stderr in <base-dir>/nodeK/node.log. node0 is the bootstrap, but every node gets
   the same list, `--bootstrap` for each node's gRPC address (a node skips its own): a node's
   start waits until the others answer (up to the bootstrap timeout), so nobody races through
   --rounds alone, and a node whose bootstrap peer has already finished its rounds still
   starts (its own address counts as answered). A node started later (LocalSwarm.start_node)
   joins through node0. Node K trains with seed S+K (S: --seed after --, default 0). Nodes
   run in their own session: a Ctrl-C on the terminal reaches only this supervisor, which
   stops each node exactly once.
3. Watch. About every second each node is asked for its Status over gRPC (a short timeout).
   A table shows round, reward, groups out/in, peers and memory; a node that has not answered
   yet is "starting", one that died shows its exit code and the end of its log.
4. Stop. Ctrl-C or SIGTERM: SIGTERM to every node (each finishes its round, checkpoints and
   leaves the swarm), a wait of up to --stop-timeout, then SIGKILL for the rest (a second
   Ctrl-C: SIGKILL now). With --rounds the swarm also ends once every node has finished.

Exit status 0, or 1 if a node failed (exited non-zero without being asked to stop). With
--json the last stdout line is one JSON object, {"ok": ..., "nodes": [one object per node]}.

Apart from that one warm-up, this module never trains, and it never opens a node's store or
checkpoints: it talks to nodes only through the gRPC Status call, signals and their logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

#: `rollshare run` settings the swarm decides for each node; they are refused after `--`.
CONTROLLED = {
    "data_dir": "--data-dir", "p2p_port": "--p2p-port", "grpc_port": "--grpc-port",
    "listen_host": "--listen-host", "advertise_host": "--advertise-host", "bootstrap": "--bootstrap",
    "identity": "--identity", "network": "--no-network", "json_log": "--json-log", "status": "--status",
    "model": "--model", "rounds": "--rounds", "shared_groups": "--shared-groups", "threads": "--threads",
}
HOST = "127.0.0.1"
LOG_NAME = "node.log"


def free_ports(n: int, host: str = HOST) -> list[int]:
    """n distinct TCP ports that are free right now (all held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def status_dict(st) -> dict:
    """A wire.NodeStatus as the dict `rollshare status --json` prints."""
    i = st.info
    return {"peer_id": i.peer_id, "grpc_endpoint": i.grpc_endpoint, "multiaddrs": list(i.multiaddrs),
            "model": i.model, "hardware": i.hardware, "version": i.version, "round": i.round, "peers": st.peers,
            "groups_stored": st.groups_stored, "groups_in": st.groups_in, "groups_out": st.groups_out,
            "reward_ma": st.reward_ma, "tokens_per_s": st.tokens_per_s, "step_s": st.step_s, "method": st.method,
            "rejected": dict(st.rejected)}


async def query_status(endpoint: str, timeout: float = 1.0) -> dict | None:
    """The node's Status at endpoint as a dict, or None if it does not answer within timeout."""
    from rollshare.net.grpc_service import RolloutsClient, RpcFailed

    async with RolloutsClient(endpoint) as client:
        try:
            return status_dict(await client.status(timeout))
        except RpcFailed:
            return None


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------- one node

_LEFT = re.compile(r"left the swarm: groups out (\d+), in (\d+), rejected (\d+)")
_STOPPED = re.compile(r"stopped at round (\d+);")
_PEER_ID = re.compile(r"swarm: peer id (\w+),")


@dataclass
class SwarmNode:
    """One `rollshare run` process of the swarm, and what we last heard from it."""

    name: str
    data_dir: Path
    p2p_port: int = 0
    grpc_port: int = 0
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    stop_requested: bool = False   # we sent SIGTERM: a non-zero exit is not a failure
    killed: bool = False           # we sent SIGKILL
    status: dict | None = None     # last Status answer (status_dict)
    final: dict = field(default_factory=dict)  # round and counts from its last log lines, once it ended
    rss_mb_start: float | None = None  # first sample after its first round
    rss_mb: float | None = None
    rss_mb_max: float | None = None
    log_offset: int = 0            # where this run's part of the log starts
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def grpc_endpoint(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def failed(self) -> bool:
        rc = self.exit_code
        return rc is not None and rc != 0 and not self.stop_requested

    @property
    def state(self) -> str:
        rc = self.exit_code
        if self.proc is None:
            return "new"
        if rc is None:
            if self.stop_requested:
                return "stopping"
            return "running" if self.status is not None else "starting"
        if self.killed:
            return "killed"
        if self.stop_requested:
            return "stopped"
        return "done" if rc == 0 else f"exited {rc}"

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        """Start the process (again, for a restart); its output is appended to its log."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.argv = argv
        self.stop_requested = self.killed = False
        self.status = None
        self.final = {}
        self.rss_mb_start = self.rss_mb = self.rss_mb_max = None
        with open(self.log_path, "ab") as log:
            self.log_offset = log.tell()
            log.write(f"--- rollshare swarm: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.running:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """Ask it to stop after its round (SIGTERM)."""
        if self.running:
            self.stop_requested = True
            self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, now."""
        if self.running:
            self.stop_requested = self.killed = True
            self.signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        """This run's part of the log (progress bars' carriage returns turned into lines)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace").replace("\r", "\n")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> list[str]:
        return [ln for ln in self.log_text().splitlines() if ln.strip()][-lines:]

    def sample_memory(self) -> None:
        if not self.running:
            return
        mb = rss_mb(self.proc.pid)
        if mb is None:
            return
        self.rss_mb = mb
        self.rss_mb_max = max(mb, self.rss_mb_max or 0.0)
        if self.rss_mb_start is None and self.status is not None and self.status["round"] >= 1:
            self.rss_mb_start = mb

    def absorb_log(self) -> None:
        """After the process ended: its peer id, final round and counts, from what it logged.

        The last Status poll may be a second old, or missing for a node that finished quickly.
        """
        if self.running:
            return
        text = self.log_text()
        if m := _LEFT.findall(text):
            out, in_, _ = map(int, m[-1])
            self.final.update(groups_out=out, groups_in=in_)
        if m := _STOPPED.findall(text):
            self.final["round"] = int(m[-1])
        if m := _PEER_ID.findall(text):
            self.final["peer_id"] = m[-1]

    def view(self) -> dict:
        """The last Status with the final numbers on top; keys never heard of are None."""
        return {**dict.fromkeys(_VIEW_KEYS), **(self.status or {}), **self.final}

    def summary(self) -> dict:
        """What we know: view(), memory, state, and a failure's log tail."""
        v = self.view()
        out = {"node": self.name, "state": self.state, "exit_code": self.exit_code,
               "pid": self.proc.pid if self.proc else None, "peer_id": v["peer_id"],
               "grpc_endpoint": self.grpc_endpoint, "data_dir": str(self.data_dir), "log": str(self.log_path),
               **{k: v[k] for k in ("round", "reward_ma", "groups_out", "groups_in", "groups_stored", "peers",
                                    "rejected")},
               "rss_mb_start": _round1(self.rss_mb_start), "rss_mb_end": _round1(self.rss_mb),
               "rss_mb_max": _round1(self.rss_mb_max)}
        if self.failed:
            out["log_tail"] = self.log_tail(10)
        return out


_VIEW_KEYS = ("peer_id", "round", "reward_ma", "groups_out", "groups_in", "groups_stored", "peers", "rejected")


def _round1(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# ---------------------------------------------------------------------------- the swarm

class LocalSwarm:
    """N `rollshare run` processes on 127.0.0.1 (see the module doc). Also the tests' harness.

        swarm = LocalSwarm(base_dir, model_dir, run_flags=["--prompts-per-round", "4"])
        swarm.start(4)           # node0 .. node3, started together
        swarm.poll()             # refresh each node's .status (sync; poll_async inside a loop)
        swarm.stop()             # SIGTERM, wait, SIGKILL the rest
    """

    def __init__(self, base_dir: str | os.PathLike, model: str, *, rounds: int = 0, shared_groups: int | None = None,
                 threads: int = 1, run_flags: Sequence[str] = (), seed: int = 0, status_timeout: float = 1.0,
                 python: str = sys.executable, models: Sequence[str] = (),
                 node_flags: Sequence[Sequence[str]] = ()):
        self.base_dir = Path(base_dir)
        self.model = str(model)
        self.models = [str(m) for m in models]  # node k runs models[k % len] (heterogeneous swarms, specialists)
        self.node_flags = [list(f) for f in node_flags]  # node k also gets node_flags[k % len]
        self.rounds = rounds
        self.shared_groups = shared_groups
        self.threads = threads
        self.run_flags = list(run_flags)
        self.seed = seed
        self.status_timeout = status_timeout
        self.python = python
        self.nodes: list[SwarmNode] = []
        self.env = _child_env()

    def node(self, name: str) -> SwarmNode:
        return next(n for n in self.nodes if n.name == name)

    def add(self, name: str | None = None) -> SwarmNode:
        """A new node (not started) with its data directory and free ports."""
        name = name or f"node{len(self.nodes)}"
        p2p, grpc = free_ports(2)
        node = SwarmNode(name, self.base_dir / name, p2p_port=p2p, grpc_port=grpc)
        self.nodes.append(node)
        return node

    def argv(self, node: SwarmNode, bootstrap: Sequence[str]) -> list[str]:
        k = self.nodes.index(node)
        seed = self.seed + k
        model = self.models[k % len(self.models)] if self.models else self.model
        extra = self.node_flags[k % len(self.node_flags)] if self.node_flags else []
        argv = [self.python, "-m", "rollshare.cli", "run", *self.run_flags, *extra,
                "--data-dir", str(node.data_dir), "--model", model, "--seed", str(seed),
                "--listen-host", HOST, "--advertise-host", HOST,
                "--p2p-port", str(node.p2p_port), "--grpc-port", str(node.grpc_port),
                "--threads", str(self.threads), "--status", "line",
                "--json-log", str(node.data_dir / "rounds.jsonl"), "--rounds", str(self.rounds)]
        if self.shared_groups is not None:
            argv += ["--shared-groups", str(self.shared_groups)]
        for addr in bootstrap:
            argv += ["--bootstrap", addr]
        return argv

    def start(self, n: int) -> list[SwarmNode]:
        """Start n new nodes together, all with one bootstrap list (see the module doc)."""
        new = [self.add() for _ in range(n)]
        bootstrap = [x.grpc_endpoint for x in new] if len(new) > 1 else []
        for node in new:
            node.start(self.argv(node, bootstrap), self.env)
        return new

    def start_node(self, node: SwarmNode | None = None, bootstrap: Sequence[str] | None = None,
                   new_ports: bool = False) -> SwarmNode:
        """Start one node (a new one, or a stopped one again); it joins through node0 unless told otherwise."""
        if node is None:
            node = self.add()
        elif new_ports:
            node.p2p_port, node.grpc_port = free_ports(2)
        if bootstrap is None:  # node0, or the first other node still running (node0 restarting)
            others = [n for n in self.nodes if n is not node and (n is self.nodes[0] or n.running)]
            bootstrap = [others[0].grpc_endpoint] if others else []
        node.start(self.argv(node, bootstrap), self.env)
        return node

    async def poll_async(self) -> None:
        """Refresh every running node's status and memory (all asked at once, short timeout)."""
        live = [n for n in self.nodes if n.running]
        answers = await asyncio.gather(*(query_status(n.grpc_endpoint, self.status_timeout) for n in live))
        for node, st in zip(live, answers):
            if st is not None:
                node.status = st
            node.sample_memory()

    def poll(self) -> None:
        asyncio.run(self.poll_async())

    @property
    def all_exited(self) -> bool:
        return all(n.proc is not None and not n.running for n in self.nodes)

    def stop(self, timeout: float = 30.0, hurry: threading.Event | None = None) -> None:
        """SIGTERM every running node, wait up to `timeout` (or until `hurry` is set), SIGKILL the rest."""
        for n in self.nodes:
            n.terminate()
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            while n.running and time.monotonic() < deadline and not (hurry and hurry.is_set()):
                n.wait(0.1)
        for n in self.nodes:
            if n.running:
                n.kill()
            n.wait(10.0)
            n.absorb_log()

    def summary(self) -> list[dict]:
        return [n.summary() for n in self.nodes]


def _child_env() -> dict[str, str]:
    """Our environment for the nodes, without ROLLSHARE_* values the swarm decides per node."""
    env = dict(os.environ)
    for name in CONTROLLED:
        env.pop(f"ROLLSHARE_{name.upper()}", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ---------------------------------------------------------------------------- the table

COLUMNS = [("node", "<8"), ("state", "<11"), ("round", ">7"), ("reward(ma)", ">10"), ("out", ">7"),
           ("in", ">7"), ("stored", ">7"), ("peers", ">5"), ("rss MB", ">7")]


def table_lines(nodes: Sequence[SwarmNode], tails: bool = True) -> list[str]:
    """The swarm table; below it, the end of the log of every node that failed."""
    def row(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{fmt}}" for c, (_, fmt) in zip(cells, COLUMNS)).rstrip()

    lines = [row([name for name, _ in COLUMNS])]
    for n in nodes:
        v = n.view()
        nums = [_cell(v["round"]), _cell(v["reward_ma"], ".3f"), _cell(v["groups_out"]), _cell(v["groups_in"]),
                _cell(v["groups_stored"]), _cell(v["peers"]), _cell(n.rss_mb if n.running else None, ".0f")]
        lines.append(row([n.name, n.state, *nums]))
    if tails:
        for n in nodes:
            if n.failed:
                lines.append(f"{n.name} exited with code {n.exit_code}; end of {n.log_path}:")
                lines += [f"    {ln[:200]}" for ln in n.log_tail(5)]
    return lines


def _cell(value, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


class LiveTable:
    """Redraws the table in place on a terminal; elsewhere prints it every `every_s` seconds."""

    def __init__(self, stream: TextIO, live: bool | None = None, every_s: float = 5.0):
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.every_s = every_s
        self._height = 0
        self._last = float("-inf")
        self._reported: set[str] = set()

    def release(self) -> None:
        """Leave the drawn table where it is: the next one starts below (after other output)."""
        self._height = 0

    def show(self, nodes: Sequence[SwarmNode], force: bool = False) -> None:
        if self.live:
            lines = table_lines(nodes)
            up = f"\x1b[{self._height}F" if self._height else ""
            self.stream.write(up + "".join(f"{ln}\x1b[K\n" for ln in lines) + "\x1b[J")
            self._height = len(lines)
            self.stream.flush()
            return
        # a log, not a screen: a failure's log tail is printed once, the table every few seconds
        fresh = [n for n in nodes if n.failed and n.name not in self._reported]
        if fresh or force or time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self._reported.update(n.name for n in fresh)
            lines = table_lines(nodes, tails=False)
            for n in fresh:
                lines.append(f"{n.name} exited with code {n.exit_code}; end of {n.log_path}:")
                lines += [f"    {ln[:200]}" for ln in n.log_tail(10)]
            self.stream.write("\n".join(lines) + "\n\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="node processes to start")
    p.add_argument("--model", default="tiny-s",
                   help="tiny-s | tiny | tiny-m (warmed up once, shared) | smollm2 | a model directory "
                        "(default tiny-s)")
    p.add_argument("--rounds", type=int, default=0, metavar="R",
                   help="rounds per node, then the swarm ends (default 0: until Ctrl-C)")
    p.add_argument("--shared-groups", type=int, metavar="J", help="groups from other peers per batch")
    p.add_argument("--base-dir", type=Path, metavar="DIR",
                   help="one data directory per node under it, kept (default: a fresh temporary directory)")
    p.add_argument("--threads-per-node", type=int, default=1, metavar="T", help="torch threads per node (default 1)")
    p.add_argument("--stop-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a node gets to stop after SIGTERM before SIGKILL (default 30)")
    p.add_argument("--sizes", metavar="S1,S2", help="embedded sizes cycled over the nodes (heterogeneous swarm), "
                                                   "e.g. tiny-s,tiny; overrides --model")
    p.add_argument("--specialists", action="store_true",
                   help="warm node k up mostly on family k of the task mix (all still train on the whole mix)")
    p.add_argument("--specialist-focus", type=float, default=0.9, metavar="F",
                   help="share of a specialist's warm-up on its own family (default 0.9)")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of reward and per-family reward over rounds")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object with every node")
    p.epilog = "Any `rollshare run` flag may follow --, e.g. rollshare swarm --nodes 4 -- --prompts-per-round 8"


def _run_parser() -> argparse.ArgumentParser:
    from rollshare.cli import _add_network_flags, _add_node_flags

    p = argparse.ArgumentParser(prog="rollshare swarm ... --", add_help=False,
                                description="`rollshare run` flags for every node")
    _add_node_flags(p)
    _add_network_flags(p)
    return p


def node_config(args: argparse.Namespace, run_flags: Sequence[str]):
    """The NodeConfig every node shares (validated), from swarm options and the flags after --."""
    from rollshare.cli import config_from_args
    from rollshare.config import ConfigError

    if args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    if args.threads_per_node < 1:
        raise ConfigError(f"--threads-per-node must be >= 1, got {args.threads_per_node}")
    run_args = _run_parser().parse_args(list(run_flags))
    taken = [flag for dest, flag in CONTROLLED.items()
             if getattr(run_args, dest, None) not in (None, ())]
    if taken:
        raise ConfigError(f"{', '.join(taken)} after -- : the swarm sets these for each node; use the swarm's own "
                          "options (--model, --rounds, --shared-groups, --threads-per-node) and drop the rest")
    for dest, value in (("model", args.model), ("rounds", args.rounds), ("shared_groups", args.shared_groups),
                        ("threads", args.threads_per_node), ("data_dir", Path(tempfile.gettempdir()))):
        setattr(run_args, dest, value)
    return config_from_args(run_args, _child_env())  # the environment the nodes will see


def prepare_model(cfg, base_dir: Path, log=None) -> str:
    """The --model value for the nodes: an embedded size is warmed up once into base_dir/models."""
    from rollshare.policies.tiny import SIZES, embedded_policy
    from rollshare.tasks import parse_mix

    if cfg.model not in SIZES:
        return str(Path(cfg.model).expanduser().resolve()) if cfg.model != "smollm2" else cfg.model
    if log:
        log(f"preparing the {cfg.model} model once for all nodes (cached in {base_dir / 'models'})")
    policy = embedded_policy(base_dir / "models", parse_mix(cfg.tasks), size=cfg.model,
                             warmup_steps=cfg.warmup_steps, seed=cfg.seed, lr=cfg.lr, show_progress=True)
    return str(base_dir / "models" / policy.name)


def prepare_models(cfg, args: argparse.Namespace, base_dir: Path, log=None) -> list[str]:
    """One --model value per node: heterogeneous sizes and specialist warm-ups, each built once."""
    from rollshare.policies.tiny import SIZES, embedded_policy
    from rollshare.sapo import specialist_mix
    from rollshare.tasks import parse_mix

    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()] if getattr(args, "sizes", None) else [cfg.model]
    bad = [x for x in sizes if x not in SIZES]
    if (getattr(args, "specialists", False) or len(sizes) > 1) and bad:
        from rollshare.config import ConfigError

        raise ConfigError(f"--sizes/--specialists need embedded sizes ({', '.join(SIZES)}), got {', '.join(bad)}")
    if not getattr(args, "specialists", False) and len(sizes) == 1:
        return [prepare_model(cfg.with_(model=sizes[0]), base_dir, log)]
    fams = list(parse_mix(cfg.tasks))
    out = []
    for k in range(args.nodes):
        size = sizes[k % len(sizes)]
        mix = (parse_mix(specialist_mix(fams, k, args.specialist_focus)) if args.specialists
               else parse_mix(cfg.warmup_tasks or cfg.tasks))
        if log:
            log(f"node{k}: {size} warmed up on {', '.join(f'{f} {w:.0%}' for f, w in mix.items())}")
        pol = embedded_policy(base_dir / "models", mix, size=size, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                              lr=cfg.lr, show_progress=True)
        out.append(str(base_dir / "models" / pol.name))
    return out


def plot_swarm(nodes: Sequence[SwarmNode], path: Path, window: int = 20) -> Path:
    """PNG: each node's moving-average reward, and its sampled reward per family, over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {}
    for n in nodes:
        f = n.data_dir / "rounds.jsonl"
        logs[n.name] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
    fams = sorted({fam for rows in logs.values() for m in rows for fam in m.get("family_reward", {})})
    fig, axes = plt.subplots(1, 1 + len(fams), figsize=(4.2 * (1 + len(fams)), 3.6), squeeze=False)

    def ma(xs: list[float]) -> list[float]:
        return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]

    for name, rows in logs.items():
        axes[0][0].plot([m["round"] for m in rows], ma([m["reward"] for m in rows]), label=name)
        for j, fam in enumerate(fams):
            pts = [(m["round"], m["family_reward"][fam]) for m in rows if fam in m.get("family_reward", {})]
            if pts:
                axes[0][j + 1].plot([r for r, _ in pts], ma([v for _, v in pts]), label=name)
    axes[0][0].set_title(f"reward (moving avg {window})")
    for j, fam in enumerate(fams):
        axes[0][j + 1].set_title(f"{fam}: sampled reward", fontsize=9)
        axes[0][j + 1].set_ylim(-0.02, 1.02)
    for ax in axes[0]:
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def cmd_swarm(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """`rollshare swarm`: see the module doc."""
    from rollshare.config import ConfigError

    run_flags = list(rest[1:] if rest and rest[0] == "--" else rest)
    cfg = node_config(args, run_flags)  # ConfigError: cli prints it
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.base_dir is not None:
        base_dir = args.base_dir.expanduser().resolve()
        if base_dir.exists() and not base_dir.is_dir():
            raise ConfigError(f"--base-dir {base_dir} exists and is not a directory")
        base_dir.mkdir(parents=True, exist_ok=True)
    else:
        base_dir = Path(tempfile.mkdtemp(prefix="rollshare-swarm-"))
    models = prepare_models(cfg, args, base_dir, log)
    model = models[0]
    swarm = LocalSwarm(base_dir, model, rounds=args.rounds, shared_groups=args.shared_groups,
                       threads=args.threads_per_node, run_flags=run_flags, seed=cfg.seed, models=models)
    out = sys.stderr if args.json else sys.stdout
    table = LiveTable(out)
    started = time.monotonic()
    log(f"rollshare swarm: {args.nodes} nodes in {base_dir} (logs: nodeK/{LOG_NAME}); "
        + ("Ctrl-C stops them all" if not args.rounds else f"{args.rounds} rounds each, Ctrl-C stops early"))
    try:
        swarm.start(args.nodes)
        asyncio.run(_watch(swarm, table))
    finally:
        hurry = threading.Event()
        previous = {s: signal.signal(s, lambda *_: hurry.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            running = [n for n in swarm.nodes if n.running]
            table.release()
            if running:
                log(f"stopping {len(running)} nodes (up to {args.stop_timeout:g} s; Ctrl-C again kills them now)")
            swarm.stop(args.stop_timeout, hurry)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    table.show(swarm.nodes, force=True)
    nodes = swarm.summary()
    ok = not any(n.failed for n in swarm.nodes)
    if args.plot:
        log(f"plot: {plot_swarm(swarm.nodes, args.plot.expanduser().resolve())}")
    log(f"swarm ended after {time.monotonic() - started:.0f} s; data and logs in {base_dir}")
    if args.json:
        print(json.dumps({"ok": ok, "base_dir": str(base_dir), "model": model,
                          "wall_s": round(time.monotonic() - started, 1), "nodes": nodes}), flush=True)
    return 0 if ok else 1


async def _watch(swarm: LocalSwarm, table: LiveTable, refresh_s: float = 1.0) -> None:
    """Poll and redraw until every node has exited or we are told to stop (SIGINT/SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    try:
        while not stop.is_set() and not swarm.all_exited:
            await swarm.poll_async()
            table.show(swarm.nodes)
            try:
                await asyncio.wait_for(stop.wait(), refresh_s)
            except TimeoutError:
                pass
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)


