"""`rollshare bench gossip`: how completely and how fast a local swarm moves rollout groups.

N node processes on 127.0.0.1 (the first is the bootstrap of the others), each a real
NetworkService with its own identity, SQLite store and free ports, exchange synthetic rollout
groups of about 10 KB (valid chain_sum task specs, completion text padded to size):

1. burst:  the nodes publish `--burst` groups in total (1000), each its share, in publish()
           calls of `--batch` groups (16: one signed envelope each, as a round would), as fast
           as they can, all starting at the same instant;
2. paced:  `--rate` groups/s swarm-wide (200) for `--paced-s` seconds; every group carries its
           publish time (created_at_ms, set just before publish(); one machine, one clock);
3. raw:    the same burst groups, in the same batches, pushed over pre-opened full-mesh grpc.aio
           client streams (a minimal servicer in this module: no gossip, no signing, no store;
           the receiver parses each batch and counts its groups). Run after the swarm's services
           are stopped, best of `--raw-repeats`.

After each swarm phase the nodes get a bounded settle time (`--settle-s`) in which
reconciliation may complete delivery. Then every node's store is read back:

- delivery_ratio: delivered (group, receiver) pairs / (groups x (N-1)), burst and paced;
- groups_per_s: burst groups held by all N-1 receivers, per second from the common start to
  the last of those arrivals (the store's received_at_ms);
- p50_ms / p99_ms: paced groups, received_at_ms at the receiver - created_at_ms at the origin;
- wire_bytes_per_group: TCP payload bytes of the burst and paced phases (settle included) per
  delivered (group, receiver) pair. Counted by the kernel: `tcp_info.bytes_received` of every
  TCP socket of every node (each loopback byte is received by exactly one of our sockets), split
  by port into gRPC (fetch, reconcile, info), libp2p (Noise + yamux + GossipSub: announcements,
  peer info, heartbeats) and other. Not counted: TCP/IP headers, sockets closed mid-phase;
- payload_bytes_per_group: mean serialized RolloutGroup size;
- max_rss_mb: max over nodes of peak RSS (VmHWM) after the paced phase, before the raw phase;
  rss_start_mb / rss_end_mb: each node's RSS when the paced phase starts and ends;
- raw_grpc_groups_per_s and ratio = groups_per_s / raw_grpc_groups_per_s.

Beside them, to show where time goes: CPU seconds of all nodes per phase and per delivered
pair (getrusage), the swarm's CPU use (cores) and the machine's load average per 10 s of the
paced phase, p99 per 10 s of publish time, and the services' drop/reject/fetch counters.
All N nodes share this machine's cores (and with whatever else runs on it): the burst and the
paced rate are CPU-bound long before loopback bandwidth matters.

The nodes are forked from one launcher process that imports libp2p, gRPC and reasoning-gym
once; they run the network service only (no torch, single-threaded BLAS).

Last stdout line with --json: one JSON object with these fields and the run's parameters.
Progress goes to stderr. This module only drives NetworkService through its public API; it
never changes how the swarm works, and it never touches torch.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

TARGETS = {"delivery_ratio": 1.0, "ratio": 0.5, "p99_ms": 1000.0}
RAW_SERVICE = "rollshare.bench.RawGroups"
RAW_METHOD = f"/{RAW_SERVICE}/Push"
_MiB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """What one benchmark run does; validated once by `plan_from_args`."""

    nodes: int = 8
    burst: int = 1000               # groups published in the burst, all nodes together
    batch: int = 16                 # groups per publish() call (one envelope) in the burst
    paced_batch: int = 16           # groups per publish() call in the paced phase
    rate: float = 200.0             # paced groups per second, swarm-wide
    paced_s: float = 60.0
    settle_s: float = 30.0          # bound on the wait for complete delivery after each phase
    group_bytes: int = 10 * 1024    # target serialized size of one group
    completions: int = 8            # per group
    raw_repeats: int = 3
    form_timeout_s: float = 60.0    # bound on start-up and swarm formation
    quick: bool = False


# ----------------------------------------------------------------------- synthetic groups

def synthetic_group(origin: str, node: int, index: int, plan: Plan, created_at_ms: int):
    """One valid group (chain_sum spec regenerable by any receiver) of about plan.group_bytes."""
    from rollshare.proto import rollout_pb2 as pb

    rng = random.Random(node * 1_000_003 + index)
    per = max(16, (plan.group_bytes - 220) // plan.completions - 8)  # minus field tags and fixed fields
    completions = []
    for k in range(plan.completions):
        head = f"The answer is {rng.randrange(200)}. "
        pad = base64.b64encode(rng.randbytes(per)).decode()[: per - len(head)]
        completions.append(pb.Completion(text=head + pad, num_tokens=per // 4, reward=float(k % 2),
                                         logprob_sum=-rng.random() * 10, has_logprob=True))
    return pb.RolloutGroup(
        task=pb.TaskSpec(family="chain_sum", params_json="{}", seed=node, index=index, style="compact"),
        completions=completions, policy_id="bench@0", round=1, created_at_ms=created_at_ms, origin=origin)


# ------------------------------------------------------------------- what a node measures

def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux struct tcp_info


def tcp_bytes_received(port_classes: dict[int, str]) -> dict[int, tuple[str, int]]:
    """socket inode -> (class, bytes received so far) for every TCP socket of this process.

    The class is port_classes[local port] or port_classes[remote port] ("other" if neither):
    every byte two of our nodes exchange on loopback is received by exactly one such socket.
    """
    out: dict[int, tuple[str, int]] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
            if not link.startswith("socket:["):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # closed meanwhile
        try:
            if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            if len(info) < _TCPI_BYTES_RECEIVED + 8:
                continue
            received = struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]
            ports = [s.getsockname()[1]]
            try:
                ports.append(s.getpeername()[1])
            except OSError:
                pass  # listening or closing
            cls = next((port_classes[p] for p in ports if p in port_classes), "other")
            out[int(link[8:-1])] = (cls, received)
        except OSError:
            continue
        finally:
            s.close()
    return out


def bytes_since(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, int]:
    """Bytes received per class between two tcp_bytes_received snapshots (new sockets from 0)."""
    out: dict[str, int] = {}
    for inode, (cls, n) in after.items():
        prev = before.get(inode, (cls, 0))[1]
        out[cls] = out.get(cls, 0) + (n - prev if n >= prev else n)
    return out


# ------------------------------------------------------------------------- raw gRPC baseline

class RawGrpcMesh:
    """The baseline: full-mesh grpc.aio client streams carrying plain serialized batches.

    Its own thread and asyncio loop. A server (generic handler, bytes in) parses each batch as
    a SignedEnvelope with only `groups` set (no header, no signature) and counts its groups;
    nothing is verified or stored. `connect` opens one stream to every other node and sends an
    empty message so the HTTP/2 stream exists before the clock starts.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="raw-grpc", daemon=True)
        self._thread.start()
        self._channels: list[Any] = []
        self._streams: list[Any] = []
        self.received_groups = 0      # touched on the loop only
        self.last_received = 0.0
        self.port = self._run(self._serve())

    def _run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @staticmethod
    def _options() -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", 16 * _MiB), ("grpc.max_send_message_length", 16 * _MiB)]

    async def _serve(self) -> int:
        import grpc

        self._server = grpc.aio.server(options=self._options())
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, {
            "Push": grpc.stream_unary_rpc_method_handler(self._push, request_deserializer=None,
                                                         response_serializer=None)}),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    async def _push(self, requests, context) -> bytes:
        from rollshare.proto import wire_pb2 as wire

        async for data in requests:
            if data:
                self.received_groups += len(wire.SignedEnvelope.FromString(data).groups)
                self.last_received = time.time()
        return b""

    def connect(self, endpoints: Sequence[str]) -> None:
        self._run(self._connect(endpoints))

    async def _connect(self, endpoints: Sequence[str]) -> None:
        import grpc

        for endpoint in endpoints:
            channel = grpc.aio.insecure_channel(endpoint, options=self._options())
            self._channels.append(channel)
            await asyncio.wait_for(channel.channel_ready(), 10.0)
            call = channel.stream_unary(RAW_METHOD, request_serializer=None, response_deserializer=None)()
            await call.write(b"")
            self._streams.append(call)

    def counts(self) -> tuple[int, float]:
        """(groups received, wall time of the last batch received)."""
        async def read():
            return self.received_groups, self.last_received
        return self._run(read())

    def reset(self) -> None:
        async def zero():
            self.received_groups, self.last_received = 0, 0.0
        self._run(zero())

    def push(self, batches: Sequence[bytes], start_at: float, timeout: float = 120.0) -> tuple[float, float]:
        """Write every batch to every stream, starting at wall time start_at; (start, end) times."""
        return self._run(self._push_all(batches, start_at), timeout)

    async def _push_all(self, batches: Sequence[bytes], start_at: float) -> tuple[float, float]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.time()

        async def one(call) -> None:
            for data in batches:
                await call.write(data)

        await asyncio.gather(*(one(call) for call in self._streams))
        return started, time.time()

    def close(self) -> None:
        async def shut():
            for call in self._streams:
                call.cancel()
            for channel in self._channels:
                await channel.close()
            await self._server.stop(0.5)
        try:
            self._run(shut(), 10.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)


# ---------------------------------------------------------------------------- a node process

class _Worker:
    """One node of the benchmark swarm; the coordinator calls its methods over a pipe."""

    def __init__(self, index: int, root: str, plan: dict) -> None:
        from rollshare.net.identity import load_or_create_identity, peer_id_of
        from rollshare.store import RolloutStore

        self.index = index
        self.plan = Plan(**plan)
        d = Path(root) / f"node{index}"
        self.keypair = load_or_create_identity(d / "identity.key")
        self.peer_id = peer_id_of(self.keypair)
        self.store = RolloutStore(d / "rollouts.db", self_origin=self.peer_id)
        self.service = None
        self.raw = RawGrpcMesh()
        self.burst_batches: list[bytes] = []    # the burst's groups, as the raw phase sends them
        self.port_classes: dict[int, str] = {}
        self.marks: dict[str, tuple[dict[int, tuple[str, int]], float]] = {}  # name -> (sockets, CPU s)

    def hello(self) -> dict:
        return {"peer_id": self.peer_id, "raw_port": self.raw.port, "pid": os.getpid()}

    def start(self, bootstrap: Sequence[str]) -> dict:
        from rollshare.net.service import NetworkConfig, NetworkService

        cfg = NetworkConfig(listen_host="127.0.0.1", bootstrap=tuple(bootstrap))
        self.service = NetworkService(self.store, self.keypair, cfg).start()
        return {"multiaddr": self.service.multiaddrs[0], "grpc_endpoint": self.service.grpc_endpoint,
                "p2p_port": int(self.service.multiaddrs[0].split("/")[4]),
                "grpc_port": int(self.service.grpc_endpoint.rsplit(":", 1)[1])}

    def status(self) -> dict:
        return self.service.status()

    def set_ports(self, port_classes: dict[int, str]) -> None:
        self.port_classes = dict(port_classes)

    def mark(self, name: str) -> None:
        self.marks[name] = (tcp_bytes_received(self.port_classes), _cpu_s())

    def since(self, name: str) -> dict:
        """TCP bytes received per kind, and CPU seconds of this process, since mark(name)."""
        sockets, cpu = self.marks[name]
        return {"bytes": bytes_since(sockets, tcp_bytes_received(self.port_classes)), "cpu_s": _cpu_s() - cpu}

    def held(self) -> int:
        return len(self.store)

    def rows(self) -> list[tuple[bytes, str, int, int]]:
        """(cid, origin, created_at_ms, received_at_ms) of every stored group, read-only from its file."""
        with contextlib.closing(sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True)) as c:
            return c.execute("SELECT cid, origin, created_at_ms, received_at_ms FROM groups").fetchall()

    def rss(self) -> tuple[float, float]:
        return rss_mb()

    def burst(self, start_at: float, first: int, count: int) -> dict:
        """Publish `count` groups in batches of plan.batch from start_at, as fast as possible."""
        from rollshare.proto import wire_pb2 as wire
        from rollshare.store import content_id, now_ms

        p = self.plan
        groups = [synthetic_group(self.peer_id, self.index, first + k, p, 0) for k in range(count)]
        batches = [groups[i:i + p.batch] for i in range(0, count, p.batch)]
        _sleep_until(start_at)
        started = time.time()
        for batch in batches:
            t = now_ms()
            for g in batch:
                g.created_at_ms = t
            self.service.publish(batch)
        finished = time.time()
        self.burst_batches = [wire.SignedEnvelope(groups=b).SerializeToString() for b in batches]
        return {"cids": [content_id(g) for g in groups], "started": started, "finished": finished,
                "payload_bytes": [g.ByteSize() for g in groups]}

    def paced(self, start_at: float, first: int, offset_s: float, interval_s: float, until: float) -> dict:
        """Publish plan.paced_batch groups every interval_s from start_at + offset_s until `until`."""
        from rollshare.store import content_id, now_ms

        p = self.plan
        rss_start = rss_mb()[0]
        cids: list[bytes] = []
        lateness: list[float] = []
        k = 0
        while (due := start_at + offset_s + k * interval_s) < until:
            _sleep_until(due)
            lateness.append(time.time() - due)
            t = now_ms()
            groups = [synthetic_group(self.peer_id, self.index, first + len(cids) + j, p, t)
                      for j in range(p.paced_batch)]
            self.service.publish(groups)
            cids += [content_id(g) for g in groups]  # the groups themselves are not kept: RSS is measured
            k += 1
        return {"cids": cids, "rss_start_mb": rss_start, "rss_end_mb": rss_mb()[0],
                "max_late_s": max(lateness, default=0.0), "publishes": k}

    def stop_service(self) -> dict:
        status = self.service.status()
        self.service.stop()
        self.service = None
        return status

    def raw_connect(self, endpoints: Sequence[str]) -> None:
        self.raw.connect(endpoints)

    def raw_reset(self) -> None:
        self.raw.reset()

    def raw_push(self, start_at: float) -> tuple[float, float]:
        return self.raw.push(self.burst_batches, start_at)

    def raw_counts(self) -> tuple[int, float]:
        return self.raw.counts()

    def close(self) -> None:
        try:
            if self.service is not None:
                self.service.stop()
        finally:
            self.raw.close()
            self.store.close()


def _cpu_s() -> float:
    """CPU seconds (user + system) this process has used, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.05) if left > 0.002 else left)


def _worker_main(fd: int, index: int) -> int:
    """A node process: answer the coordinator's calls until it says exit (or goes away)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"node{index} %(levelname)s %(name)s: %(message)s")
    from rollshare.net.p2p import route_libp2p_logs

    route_libp2p_logs(logging.WARNING)
    conn = Connection(fd)
    worker: _Worker | None = None
    try:
        while True:
            try:
                method, kwargs = conn.recv()
            except EOFError:
                break  # the coordinator is gone
            if method == "exit":
                conn.send(("ok", None))
                break
            try:
                if method == "init":
                    worker = _Worker(index, **kwargs)
                    conn.send(("ok", worker.hello()))
                else:
                    conn.send(("ok", getattr(worker, method)(**kwargs)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        if worker is not None:
            worker.close()
    return 0


# ------------------------------------------------------------------------------ coordinator

class BenchError(RuntimeError):
    """The benchmark could not run; the message says which node and what happened."""


class _Nodes:
    """The node processes, and calls to them (one at a time per node, many nodes at once).

    One launcher process imports the node's libraries once (libp2p, reasoning-gym, gRPC: about
    2.5 s of CPU each time) and forks the N nodes from there, before any thread exists; each
    node talks to us over its own socket pair.
    """

    def __init__(self, n: int):
        pairs = [socket.socketpair() for _ in range(n)]
        fds = [theirs.fileno() for _, theirs in pairs]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no threads before fork
        self.launcher = subprocess.Popen(
            [sys.executable, "-m", "rollshare.bench.gossip", "--launch-fds", ",".join(map(str, fds))],
            pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        self.conns: list[Connection] = []
        for ours, theirs in pairs:
            theirs.close()
            self.conns.append(Connection(ours.detach()))
        self.pids: list[int] = []

    def init(self, root: str, plan: Plan) -> list[dict]:
        hello = self.all("init", timeout=plan.form_timeout_s, root=root, plan=asdict(plan))
        self.pids = [h["pid"] for h in hello]
        return hello

    def send(self, i: int, method: str, **kwargs) -> None:
        self.conns[i].send((method, kwargs))

    def receive(self, i: int, method: str, timeout: float) -> Any:
        if not self.conns[i].poll(timeout):
            raise BenchError(f"node {i} did not answer {method} within {timeout:g} s")
        try:
            status, value = self.conns[i].recv()
        except (EOFError, ConnectionResetError):
            raise BenchError(f"node {i} exited during {method}; see its messages on stderr") from None
        if status != "ok":
            raise BenchError(f"node {i} failed in {method}:\n{value}")
        return value

    def call(self, i: int, method: str, timeout: float = 30.0, **kwargs) -> Any:
        self.send(i, method, **kwargs)
        return self.receive(i, method, timeout)

    def all(self, method: str, timeout: float = 30.0, per_node: Callable[[int], dict] | None = None,
            every: tuple[float, Callable[[], None]] | None = None, **kwargs) -> list[Any]:
        """Call `method` on every node at once; per_node(i) adds node-specific arguments.

        every=(seconds, fn): call fn at that period while waiting for the answers.
        """
        for i in range(len(self.conns)):
            self.send(i, method, **kwargs, **(per_node(i) if per_node else {}))
        deadline = time.monotonic() + timeout
        if every is not None:
            period, fn = every
            next_tick = time.monotonic() + period
            for conn in self.conns:
                while not conn.poll(max(0.0, min(next_tick, deadline) - time.monotonic())):
                    if time.monotonic() >= deadline:
                        break
                    if time.monotonic() >= next_tick:
                        fn()
                        next_tick += period
        return [self.receive(i, method, max(0.1, deadline - time.monotonic())) for i in range(len(self.conns))]

    def cpu_s(self) -> float:
        """CPU seconds the node processes have used so far, all threads (from /proc, no call to them)."""
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def close(self, timeout: float = 30.0) -> None:
        """Ask every node to stop; whatever is still running after `timeout` is killed."""
        for conn in self.conns:
            try:
                conn.send(("exit", {}))
            except OSError:
                pass  # that node is gone already
        try:
            self.launcher.wait(timeout)  # it exits once all its nodes have
        except subprocess.TimeoutExpired:
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.launcher.kill()
            self.launcher.wait(5.0)
        for conn in self.conns:
            conn.close()


def _launch(fds: list[int]) -> int:
    """The launcher: import the node's libraries once, fork one node per socket, wait for them all."""
    import grpc.aio  # noqa: F401  (imported here so every node inherits it)

    import rollshare.net.service  # noqa: F401
    import rollshare.proto.wire_pb2  # noqa: F401

    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        print(f"rollshare bench gossip: the launcher runs {threads} threads before forking; nodes may hang",
              file=sys.stderr)
    children = []
    for i, fd in enumerate(fds):
        pid = os.fork()
        if pid == 0:
            for later in fds[i + 1:]:  # the earlier ones the launcher closed already
                os.close(later)
            code = 1
            try:
                code = _worker_main(fd, i)
            finally:
                sys.stderr.flush()
                os._exit(code)  # a node never returns into this loop; gRPC/libp2p threads must not hold it open
        children.append(pid)
        os.close(fd)
    worst = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status) != 0)
    return worst


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values; None if there are none."""
    if not values:
        return None
    s = sorted(values)
    return float(s[max(0, math.ceil(q / 100 * len(s)) - 1)])


def _wait_delivered(nodes: _Nodes, expected: int, bound_s: float, log: Callable[[str], None]) -> float:
    """Poll until every node holds `expected` groups or bound_s passes; the seconds waited."""
    t0 = time.monotonic()
    while True:
        held = nodes.all("held")
        if min(held) >= expected or time.monotonic() - t0 > bound_s:
            waited = time.monotonic() - t0
            log(f"  held per node {held} of {expected} after {waited:.1f} s")
            return waited
        time.sleep(0.2)


def _delivery(published: dict[bytes, int], rows: list[list[tuple]], n: int) -> dict:
    """Who holds what: delivered pairs, per-group arrival times (wall ms) at each receiver."""
    arrivals: dict[bytes, list[tuple[int, int]]] = {cid: [] for cid in published}  # (created, received)
    for node, node_rows in enumerate(rows):
        for cid, _origin, created, received in node_rows:
            origin = published.get(cid)
            if origin is not None and origin != node:
                arrivals[cid].append((created, received))
    delivered = sum(len(a) for a in arrivals.values())
    return {"arrivals": arrivals, "delivered": delivered, "expected": len(published) * (n - 1)}


def run(plan: Plan, log: Callable[[str], None]) -> dict:
    """Run the three phases on a fresh local swarm; return the result object."""
    n = plan.nodes
    t_run = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rollshare-bench-gossip-") as root:
        log(f"starting {n} node processes")
        nodes = _Nodes(n)
        try:
            hello = nodes.init(root, plan)
            return _run(nodes, hello, plan, log, t_run)
        finally:
            log("stopping the node processes")
            nodes.close()


def _run(nodes: _Nodes, hello: list[dict], plan: Plan, log: Callable[[str], None], t_run: float) -> dict:
    n = plan.nodes
    load_at_start = round(os.getloadavg()[0], 2)  # other work on this machine competes for the same cores
    first = nodes.call(0, "start", timeout=plan.form_timeout_s, bootstrap=[])
    for i in range(1, n):  # the others join through the first, all at once
        nodes.send(i, "start", bootstrap=[first["multiaddr"]])
    started = [first] + [nodes.receive(i, "start", plan.form_timeout_s) for i in range(1, n)]
    classes = {s["grpc_port"]: "grpc" for s in started}
    classes |= {s["p2p_port"]: "libp2p" for s in started}
    classes |= {h["raw_port"]: "raw_grpc" for h in hello}
    nodes.all("set_ports", port_classes=classes)

    # the swarm has formed when every node knows every other's gRPC endpoint (learned by gossip)
    deadline = time.monotonic() + plan.form_timeout_s
    while True:
        statuses = nodes.all("status")
        if all(s["known_peers"] >= n - 1 for s in statuses):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the swarm did not form within {plan.form_timeout_s:g} s: known peers per node "
                             f"{[s['known_peers'] for s in statuses]}, expected {n - 1} each")
        time.sleep(0.2)
    log(f"swarm formed in {time.monotonic() - t_run:.1f} s since launch")

    # ---------------------------------------------------------------- phase 1: burst
    published: dict[bytes, int] = {}          # cid -> origin node
    shares = [plan.burst // n + (1 if i < plan.burst % n else 0) for i in range(n)]
    firsts = [sum(shares[:i]) for i in range(n)]
    nodes.all("mark", name="burst")
    start_at = time.time() + 0.5
    log(f"burst: {plan.burst} groups, {plan.batch} per publish")
    burst = nodes.all("burst", timeout=120.0, per_node=lambda i: {"start_at": start_at, "first": firsts[i],
                                                                  "count": shares[i]})
    for i, b in enumerate(burst):
        published.update((cid, i) for cid in b["cids"])
    payload = [s for b in burst for s in b["payload_bytes"]]
    burst_settle = _wait_delivered(nodes, plan.burst, plan.settle_s, log)
    burst_use = _usage(nodes.all("since", name="burst"))
    d_burst = _delivery(dict(published), nodes.all("rows", timeout=60.0), n)
    full = [max(r for _, r in a) for a in d_burst["arrivals"].values() if len(a) == n - 1]
    burst_s = (max(full) / 1000 - start_at) if full else None
    groups_per_s = len(full) / burst_s if full else 0.0
    publish_s = max(b["finished"] for b in burst) - start_at
    log(f"  burst delivered {d_burst['delivered']}/{d_burst['expected']} pairs; {len(full)} groups on all "
        f"peers in {burst_s or 0:.2f} s -> {groups_per_s:.0f} groups/s (publishing took {publish_s:.2f} s)")

    # ---------------------------------------------------------------- phase 2: paced
    interval = plan.paced_batch * n / plan.rate   # per node
    start_at = time.time() + 0.5
    until = start_at + plan.paced_s
    nodes.all("mark", name="paced")
    log(f"paced: {plan.rate:g} groups/s for {plan.paced_s:g} s, {plan.paced_batch} per publish "
        f"(each node every {interval:.2f} s)")
    cpu_marks = [nodes.cpu_s()]                   # the swarm's CPU use per 10 s, and the machine's load
    load_marks: list[float] = []

    def sample() -> None:
        cpu_marks.append(nodes.cpu_s())
        load_marks.append(round(os.getloadavg()[0], 1))

    paced = nodes.all("paced", timeout=plan.paced_s + 60.0, every=(10.0, sample), per_node=lambda i: {
        "start_at": start_at, "first": 1_000_000, "offset_s": i * interval / n, "interval_s": interval,
        "until": until})
    cores_per_10s = [round((b - a) / 10.0, 2) for a, b in zip(cpu_marks, cpu_marks[1:])]
    paced_ids: dict[bytes, int] = {}
    for i, p in enumerate(paced):
        paced_ids.update((cid, i) for cid in p["cids"])
    total = len(published) + len(paced_ids)
    paced_settle = _wait_delivered(nodes, total, plan.settle_s, log)
    paced_use = _usage(nodes.all("since", name="paced"))
    rss = nodes.all("rss")
    rows = nodes.all("rows", timeout=60.0)
    d_paced = _delivery(paced_ids, rows, n)
    d_all = _delivery({**published, **paced_ids}, rows, n)
    latencies = [r - c for a in d_paced["arrivals"].values() for c, r in a]
    by_window: dict[int, list[int]] = {}   # p99 per 10 s of publish time: does a backlog build up?
    last_window = max(0, math.ceil(plan.paced_s / 10) - 1)
    for a in d_paced["arrivals"].values():
        for c, r in a:
            by_window.setdefault(min(last_window, max(0, int((c / 1000 - start_at) // 10))), []).append(r - c)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    log(f"  paced delivered {d_paced['delivered']}/{d_paced['expected']} pairs; latency p50 {p50} ms, "
        f"p99 {p99} ms")
    final = nodes.all("stop_service", timeout=60.0)

    # ---------------------------------------------------------------- phase 3: raw gRPC
    raw_endpoints = [f"127.0.0.1:{h['raw_port']}" for h in hello]
    nodes.all("raw_connect", per_node=lambda i: {"endpoints": raw_endpoints[:i] + raw_endpoints[i + 1:]})
    raw_runs: list[tuple[float, dict]] = []   # (groups/s, usage)
    for rep in range(plan.raw_repeats):
        nodes.all("raw_reset")
        nodes.all("mark", name="raw")
        start_at = time.time() + 0.3
        nodes.all("raw_push", timeout=120.0, start_at=start_at)
        want = [plan.burst - s for s in shares]
        t0 = time.monotonic()
        while True:
            counts = nodes.all("raw_counts")
            if all(c[0] >= w for c, w in zip(counts, want)) or time.monotonic() - t0 > 30.0:
                break
            time.sleep(0.05)
        got = sum(c[0] for c in counts)
        raw_s = max(c[1] for c in counts) - start_at
        complete = all(c[0] >= w for c, w in zip(counts, want))
        raw_runs.append((plan.burst / raw_s if complete and raw_s > 0 else 0.0,
                         _usage(nodes.all("since", name="raw"))))
        log(f"raw gRPC run {rep + 1}: {got}/{sum(want)} group deliveries in {raw_s:.3f} s -> "
            f"{raw_runs[-1][0]:.0f} groups/s")
    raw_groups_per_s, raw_use = max(raw_runs, key=lambda r: r[0])

    # ---------------------------------------------------------------- result
    wire_bytes = _sum_dicts([burst_use["bytes"], paced_use["bytes"]])
    raw_pairs = plan.burst * (n - 1)
    payload_bytes = statistics.fmean(payload)
    ratio = groups_per_s / raw_groups_per_s if raw_groups_per_s else None
    counters = _sum_dicts([{**{f"dropped.{k}": v for k, v in s["dropped"].items()},
                            **{f"rejected.{k}": v for k, v in s["rejected"].items()},
                            "fetch_failures": s["fetch_failures"], "reconciles": s["reconciles"]}
                           for s in final])
    result = {
        "delivery_ratio": round(d_all["delivered"] / d_all["expected"], 6),
        "groups_per_s": round(groups_per_s, 1),
        "p50_ms": p50,
        "p99_ms": p99,
        "wire_bytes_per_group": round(sum(wire_bytes.values()) / max(1, d_all["delivered"]), 1),
        "payload_bytes_per_group": round(payload_bytes, 1),
        "max_rss_mb": round(max(h for _, h in rss), 1),
        "raw_grpc_groups_per_s": round(raw_groups_per_s, 1),
        "ratio": round(ratio, 3) if ratio is not None else None,
        "rss_start_mb": [round(p["rss_start_mb"], 1) for p in paced],
        "rss_end_mb": [round(p["rss_end_mb"], 1) for p in paced],
        "targets_met": {
            "delivery_ratio": d_all["delivered"] == d_all["expected"],
            "ratio": ratio is not None and ratio >= TARGETS["ratio"],
            "p99_ms": p99 is not None and p99 <= TARGETS["p99_ms"],
        },
        "burst": {
            "groups": len(published), "delivered_pairs": d_burst["delivered"], "expected_pairs": d_burst["expected"],
            "groups_on_all_peers": len(full), "seconds_to_all": round(burst_s, 3) if burst_s else None,
            "publish_seconds": round(publish_s, 3), "settle_wait_s": round(burst_settle, 2),
            "wire_bytes": burst_use["bytes"], "cpu_s": burst_use["cpu_s"],
            "cpu_ms_per_delivery": round(1000 * burst_use["cpu_s"] / max(1, d_burst["delivered"]), 3),
        },
        "paced": {
            "groups": len(paced_ids), "rate_achieved": round(len(paced_ids) / plan.paced_s, 1),
            "delivered_pairs": d_paced["delivered"], "expected_pairs": d_paced["expected"],
            "p90_ms": _percentile(latencies, 90), "max_ms": _percentile(latencies, 100),
            "p99_ms_per_10s": [_percentile(by_window[k], 99) for k in sorted(by_window)],
            "swarm_cpu_cores_per_10s": cores_per_10s, "loadavg_1m_per_10s": load_marks,
            "max_publish_late_s": round(max(p["max_late_s"] for p in paced), 3),
            "settle_wait_s": round(paced_settle, 2), "wire_bytes": paced_use["bytes"], "cpu_s": paced_use["cpu_s"],
        },
        "wire": {"counted": "tcp_info.bytes_received of every TCP socket of every node, burst+paced incl. settle",
                 "bytes_by_kind": wire_bytes},
        "raw": {"runs_groups_per_s": [round(r, 1) for r, _ in raw_runs],
                "wire_bytes_per_group": round(sum(raw_use["bytes"].values()) / raw_pairs, 1),
                "cpu_s": raw_use["cpu_s"], "cpu_ms_per_delivery": round(1000 * raw_use["cpu_s"] / raw_pairs, 3)},
        "counters": counters,
        "nodes": n, "groups": plan.burst, "group_bytes": plan.group_bytes, "completions": plan.completions,
        "batch": plan.batch, "paced_batch": plan.paced_batch, "rate": plan.rate, "paced_s": plan.paced_s,
        "settle_s": plan.settle_s, "quick": plan.quick, "cpus": os.cpu_count(), "loadavg_1m_at_start": load_at_start,
        "seconds": round(time.monotonic() - t_run, 1),
    }
    return result


def _usage(per_node: Sequence[dict]) -> dict:
    """Sum of the nodes' `since` answers: TCP bytes per kind and CPU seconds."""
    return {"bytes": _sum_dicts([u["bytes"] for u in per_node]),
            "cpu_s": round(sum(u["cpu_s"] for u in per_node), 2)}


def _sum_dicts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------ CLI

def plan_from_args(args: argparse.Namespace) -> Plan:
    quick = args.quick
    plan = Plan(
        nodes=args.nodes, burst=args.burst, batch=args.batch,
        paced_batch=args.paced_batch or args.batch, rate=args.rate,
        paced_s=args.paced_s if args.paced_s is not None else (10.0 if quick else 60.0),
        settle_s=args.settle_s if args.settle_s is not None else (15.0 if quick else 30.0),
        group_bytes=args.group_bytes, completions=args.completions,
        raw_repeats=args.raw_repeats if args.raw_repeats is not None else (1 if quick else 3), quick=quick)
    problems = [msg for bad, msg in [
        (plan.nodes < 2, "--nodes must be at least 2"),
        (plan.burst < plan.nodes, "--burst must give every node at least one group"),
        (not 1 <= plan.batch <= 256 or not 1 <= plan.paced_batch <= 256, "--batch must be in 1..256"),
        (plan.rate <= 0 or plan.paced_s <= 0, "--rate and --paced-s must be > 0"),
        (plan.group_bytes < 256, "--group-bytes must be at least 256"),
        (not 1 <= plan.completions <= 64, "--completions must be in 1..64"),
        (plan.group_bytes // plan.completions > 8000, "--group-bytes / --completions must stay under 8000 "
                                                       "(the per-completion text cap)"),
        (plan.raw_repeats < 1, "--raw-repeats must be >= 1"),
    ] if bad]
    if problems:
        raise SystemExit("rollshare bench gossip: " + "; ".join(problems))
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rollshare bench gossip", description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=8, help="node processes (default 8)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--quick", action="store_true", help="short phases (paced 10 s), under a minute")
    ap.add_argument("--burst", type=int, default=1000, help="groups in the burst, all nodes together (default 1000)")
    ap.add_argument("--batch", type=int, default=16, help="groups per publish() (default 16)")
    ap.add_argument("--paced-batch", type=int, help="groups per publish() in the paced phase (default --batch)")
    ap.add_argument("--rate", type=float, default=200.0, help="paced groups/s swarm-wide (default 200)")
    ap.add_argument("--paced-s", type=float, help="paced phase length (default 60, quick 10)")
    ap.add_argument("--settle-s", type=float, help="bound on the wait for complete delivery after each phase (default 30, quick 15)")
    ap.add_argument("--group-bytes", type=int, default=10 * 1024, help="serialized group size (default 10240)")
    ap.add_argument("--completions", type=int, default=8, help="completions per group (default 8)")
    ap.add_argument("--raw-repeats", type=int, help="raw gRPC runs, best counts (default 3, quick 1)")
    ap.add_argument("--launch-fds", help=argparse.SUPPRESS)  # internal: the process that forks the nodes
    args = ap.parse_args(argv)
    if args.launch_fds:
        return _launch([int(fd) for fd in args.launch_fds.split(",")])
    plan = plan_from_args(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        result = run(plan, log)
    except BenchError as e:
        print(f"rollshare bench gossip: {e}", file=sys.stderr)
        return 1
    log(f"delivery {result['delivery_ratio']}, {result['groups_per_s']} groups/s (raw gRPC "
        f"{result['raw_grpc_groups_per_s']}, ratio {result['ratio']}), p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, {result['wire_bytes_per_group']} wire bytes per group "
        f"(payload {result['payload_bytes_per_group']}), max RSS {result['max_rss_mb']} MB")
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
