"""NetworkService: one node's membership in the swarm, behind a small, thread-safe, sync API.

What it is. The service owns one background thread running an asyncio loop. That loop hosts
the gRPC server (grpc_service: Fetch, Reconcile, Info, Status), the libp2p host (p2p.P2PHost,
running as a trio guest through bridge.TrioGuest) and the protocol tasks below. The round loop
talks to it only through `start`, `publish`, `status`, `info` and `stop`; none of them waits
on the network (start and stop wait for the service itself, with a timeout).

How groups move.

    publish(groups)          caller's thread: serialize and hash each group once, sign one
                             envelope per ≤256 groups (envelope.seal; per-origin seq reserved in
                             blocks in the store's SQLite file), store groups and envelope in one
                             transaction (EnvelopeIndex.put_own), queue a small Announcement (ids,
                             sizes, our gRPC endpoint). Full queue: the announcement is dropped
                             and counted; reconciliation delivers the groups anyway.
    announcer                gossips queued announcements on ANNOUNCE_TOPIC, at most one message
                             per `announce_interval_s`: what is published in between goes out
                             merged, as one message (py-libp2p spends milliseconds of CPU on every
                             node for every gossip message, whatever its size).
    announcement validator   trio side, per message: size, parse, origin == gossip sender, ids
                             and sizes sane, endpoint syntax, age, exact replay, banned sender.
    fetchers                 `fetch_concurrency` tasks drain a bounded queue of fetch jobs (jobs
                             for the same peer merge while they wait: one Fetch for many
                             announcements). The ids we lack (not stored: one indexed read on the
                             loop; not in flight; not refused lately) are fetched
                             (RolloutsClient.fetch_verified, with a timeout) from the announcer,
                             verified as they arrive, checked against replays (SeenEnvelopes)
                             and handed to the store writer. A failed fetch is logged;
                             reconciliation retries it later.
    store writer             one task: whatever verified envelopes queued up meanwhile are written
                             in one transaction in a worker thread (EnvelopeIndex.put_verified_many).
                             Their ids count as in flight until the write has finished.
    reconciler               every `reconcile_interval_s`: a random known peer, digests over the
                             age window (reconcile.py; both sides keep per-second digests, so an
                             exchange does not read the store), fetch the difference from that peer.
    peer-info heartbeat      every `peer_info_interval_s` in which we announced nothing (an
                             announcement carries our endpoint too), and soon after a new peer
                             connects: our PeerInfo on PEERS_TOPIC, so silent peers' gRPC
                             endpoints are known.
    peer exchange            on a PeerInfo from a peer we hold no connection to, while we hold
                             fewer than `target_peers`: dial it (only addresses naming its own
                             peer id, one try per `dial_backoff_s`, `max_dials` at once), so
                             nodes that were given one bootstrap address end up meshed with
                             each other and the swarm outlives its bootstrap node.

Every rejection is logged on "rollshare.net" with its reason and counted (`status()["rejected"]`).
A peer that sends something no honest peer can send (a bad signature, groups it was not asked
for, ...) is ignored for `ban_s` seconds. Per-origin quotas are the RolloutStore's.

Memory. Everything the service remembers is bounded by a count in NetworkConfig: peers
(`max_peers`), gRPC channels (`max_clients`), waiting fetch jobs (`fetch_queue` x
`fetch_job_ids`), envelopes waiting to be written (`store_queue`), announcements waiting
(`announce_queue`), and the replay memories (`seen_envelopes`, `seen_announcements`,
`settled_groups`). The envelope index's reconciliation digests hold one entry per second of the
age window.

Ownership. Every task is created by the service's main coroutine and cancelled by it on stop;
every network call has a timeout; `stop()` drains: queued announcements gossiped (up to
`drain_s`), tasks cancelled, gRPC stopped with a grace period of `drain_s` for calls in flight,
libp2p host closed, trio guest stopped, thread joined.

This module never touches torch or the round loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import math
import random
import re
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from rollshare.net.bridge import TrioGuest
from rollshare.net.envelope import (
    BAD_PUBLIC_KEY, BAD_SIGNATURE, DUPLICATE_GROUP, GROUP_ORIGIN_MISMATCH, MALFORMED, MALFORMED_HEADER,
    ORIGIN_MISMATCH, REPLAY, SENDER_MISMATCH, UNLISTED_GROUP, UNREQUESTED, EnvelopeIndex, EnvelopeLimits,
    Rejected, SeenEnvelopes, VerifiedEnvelope, envelope_id, seal)
from rollshare.net.grpc_service import RolloutsClient, RpcFailed, ServerLimits, start_server
from rollshare.net.grpc_service import stop as stop_server
from rollshare.net.identity import KeyPair, peer_id_of
from rollshare.net.p2p import GossipLimits, P2PError, P2PHost, _local_ipv4_addresses
from rollshare.proto import rollout_pb2 as pb
from rollshare.proto import wire_pb2 as wire
from rollshare.store import RolloutStore, SerializedGroup, now_ms

__all__ = ["ANNOUNCE_TOPIC", "PEERS_TOPIC", "GossipRejected", "NetworkConfig", "NetworkError", "NetworkService",
           "check_announcement", "check_peer_info", "dialable_addrs", "valid_endpoint"]

log = logging.getLogger("rollshare.net")

ANNOUNCE_TOPIC = "rollshare/rollouts/1"
PEERS_TOPIC = "rollshare/peers/1"

#: Envelope rejections that an honest peer never produces (it verified what it serves):
#: the sender is ignored for NetworkConfig.ban_s. Stale/future/replay are not among them.
_DISHONEST = frozenset({MALFORMED, MALFORMED_HEADER, BAD_PUBLIC_KEY, ORIGIN_MISMATCH, SENDER_MISMATCH,
                        BAD_SIGNATURE, UNLISTED_GROUP, DUPLICATE_GROUP, GROUP_ORIGIN_MISMATCH, UNREQUESTED})


class NetworkError(Exception):
    """The swarm could not be joined or served; the message says what to do."""


@dataclass(frozen=True)
class NetworkConfig:
    """Every knob of the network side, with its default. Times in seconds."""

    listen_host: str = "127.0.0.1"
    p2p_port: int = 0                 # 0 = any free port
    grpc_port: int = 0
    #: host written into the gRPC endpoint we announce. "" = listen_host, or this machine's
    #: first non-loopback IPv4 address when listening on 0.0.0.0
    advertise_host: str = ""
    bootstrap: tuple[str, ...] = ()   # multiaddrs (/ip4/../tcp/../p2p/..) or host:port gRPC addresses
    mdns: bool = False
    bootstrap_timeout_s: float = 10.0  # per bootstrap address, retried until then
    reconcile_interval_s: float = 2.0
    reconcile_bucket_ms: int = 10_000
    #: reconciliation window; None = the store's and the envelopes' age limit, less a minute
    window_s: float | None = None
    peer_info_interval_s: float = 5.0
    peer_ttl_s: float = 60.0          # a peer not heard from for this long is not reconciled with
    max_peers: int = 1024             # peer table size; the least recently seen go first
    #: peer exchange: while we hold fewer libp2p connections than this, dial peers we hear of
    #: in peer info gossip (so the swarm does not hang off its bootstrap node alone)
    target_peers: int = 8
    dial_timeout_s: float = 5.0       # one dial of a peer learned from gossip
    dial_backoff_s: float = 30.0      # at most one dial attempt per peer per this long
    max_dials: int = 2                # dials in flight at once
    max_reconcile_failures: int = 3   # consecutive failures before a peer is forgotten
    ban_s: float = 60.0               # ignore a peer that sent something dishonest
    rpc_timeout_s: float = 5.0        # Info and Reconcile calls
    fetch_timeout_s: float = 10.0     # one fetch job, all batches
    fetch_concurrency: int = 4        # fetch jobs running at once
    fetch_queue: int = 1024           # fetch jobs waiting; beyond, dropped (reconciliation retries)
    fetch_job_ids: int = 4096         # ids one waiting job collects from merged announcements; beyond, dropped
    store_queue: int = 32             # verified envelopes waiting to be written; fetches wait beyond
    announce_queue: int = 1024        # announcements waiting to be gossiped; beyond, dropped
    #: at most one announcement message per this interval; publishes in between are merged into
    #: the next one (a lone publish is gossiped at once)
    announce_interval_s: float = 0.2
    max_clients: int = 128            # cached gRPC channels to peers
    # Replay memory, bounded by count (about 170 bytes an entry). A replay older than that is
    # accepted again and is harmless: the store keeps a group once, a re-announced group we hold
    # is not fetched, and the age limit and quotas bound what a replayed envelope brings back.
    seen_envelopes: int = 4096        # SeenEnvelopes capacity: accepted deliveries (~0.7 MB full)
    seen_announcements: int = 4096    # exact announcement payloads remembered (~0.7 MB full)
    settled_groups: int = 16_384      # ids refused lately as replays: not asked for again (~3 MB full)
    drain_s: float = 1.0              # on stop: to gossip queued announcements, then for calls in flight
    gossip: GossipLimits = field(default_factory=GossipLimits)
    envelope: EnvelopeLimits = field(default_factory=EnvelopeLimits)
    server: ServerLimits = field(default_factory=ServerLimits)

    def with_(self, **kw: Any) -> "NetworkConfig":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------ validation (pure)

class GossipRejected(Exception):
    """A gossip message we refuse; `reason` is short and stable (a key of the rejected counts)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def split_endpoint(endpoint: str) -> tuple[str, int] | None:
    """("host", port) of a "host:port" or "[v6]:port" gRPC address, or None if it is not one."""
    if not endpoint or len(endpoint) > 300:
        return None
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return (None if ip.is_unspecified else (host[1:-1], int(port)))
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        return (host, int(port)) if _HOSTNAME.match(host) and not host.replace(".", "").isdigit() else None
    return None if ip4.is_unspecified else (host, int(port))


def valid_endpoint(endpoint: str) -> bool:
    """True for a dialable "host:port" (IPv4, [IPv6] or a DNS name; not 0.0.0.0)."""
    return split_endpoint(endpoint) is not None


def check_announcement(sender: str, data: bytes, limits: EnvelopeLimits = EnvelopeLimits(),
                       now: int | None = None) -> wire.Announcement:
    """Parse and check a gossiped Announcement from `sender`; raise GossipRejected if it is bad."""
    now = now_ms() if now is None else now
    try:
        ann = wire.Announcement.FromString(data)
    except Exception as e:
        raise GossipRejected("malformed", f"not an Announcement: {type(e).__name__}") from None
    if ann.origin != sender:
        raise GossipRejected("origin_mismatch", f"announcement names origin {ann.origin[:64]!r}, sent by {sender}")
    n = len(ann.group_ids)
    if not 1 <= n <= limits.max_groups:
        raise GossipRejected("bad_ids", f"{n} group ids (allowed 1..{limits.max_groups})")
    if any(len(cid) != 32 for cid in ann.group_ids) or len(set(ann.group_ids)) != n:
        raise GossipRejected("bad_ids", "group ids must be distinct 32-byte sha256 digests")
    if len(ann.envelope_id) != 32:
        raise GossipRejected("bad_ids", "envelope id is not a 32-byte sha256 digest")
    if len(ann.sizes) != n or any(not 0 < s <= limits.max_envelope_bytes for s in ann.sizes):
        raise GossipRejected("bad_sizes", f"{len(ann.sizes)} sizes for {n} ids, each must be in "
                                          f"1..{limits.max_envelope_bytes}")
    if not valid_endpoint(ann.grpc_endpoint):
        raise GossipRejected("bad_endpoint", f"{ann.grpc_endpoint[:80]!r} is not a host:port address")
    if ann.created_at_ms < now - int(limits.max_age_s * 1000):
        raise GossipRejected("stale", f"created {(now - ann.created_at_ms) / 1000:.0f} s ago")
    if ann.created_at_ms > now + int(limits.max_future_s * 1000):
        raise GossipRejected("future", f"dated {(ann.created_at_ms - now) / 1000:.0f} s in the future")
    return ann


_MAX_MULTIADDRS, _MAX_TEXT = 32, 256
#: a multiaddr we would dial: IP address, TCP port, and the peer id it must prove in the handshake
_DIALABLE = re.compile(r"^/(ip4/[0-9.]{7,15}|ip6/[0-9A-Fa-f:.]{2,45})/tcp/[0-9]{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]{32,64}$")


def check_peer_info(sender: str, data: bytes) -> wire.PeerInfo:
    """Parse and check a gossiped PeerInfo from `sender`; raise GossipRejected if it is bad."""
    try:
        info = wire.PeerInfo.FromString(data)
    except Exception as e:
        raise GossipRejected("malformed", f"not a PeerInfo: {type(e).__name__}") from None
    if info.peer_id != sender:
        raise GossipRejected("origin_mismatch", f"peer info of {info.peer_id[:64]!r}, sent by {sender}")
    if not valid_endpoint(info.grpc_endpoint):
        raise GossipRejected("bad_endpoint", f"{info.grpc_endpoint[:80]!r} is not a host:port address")
    if len(info.multiaddrs) > _MAX_MULTIADDRS or any(len(a) > _MAX_TEXT for a in info.multiaddrs):
        raise GossipRejected("field_too_long", f"{len(info.multiaddrs)} multiaddrs")
    if max(len(info.model), len(info.hardware), len(info.version)) > _MAX_TEXT:
        raise GossipRejected("field_too_long", "model, hardware or version")
    return info


def dialable_addrs(peer_id: str, multiaddrs: Sequence[str], limit: int = 4) -> list[str]:
    """The addresses of a gossiped PeerInfo we would dial: IP + TCP + exactly that peer's id, a few."""
    return [a for a in dict.fromkeys(multiaddrs) if _DIALABLE.match(a) and a.endswith(f"/p2p/{peer_id}")][:limit]


# ----------------------------------------------------------------------------- small parts

class _SeqCounter:
    """Per-origin envelope sequence numbers, in the store's SQLite file (table publish_seq).

    Numbers are reserved `block` at a time: the table holds the highest number reserved, and it
    is committed before any number of the block is used, so seq keeps increasing across restarts
    (a restart skips what was left of the block). One commit per `block` envelopes, not per envelope.
    """

    def __init__(self, path: str, origin: str, block: int = 64):
        self.origin = origin
        self.block = block
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("CREATE TABLE IF NOT EXISTS publish_seq (origin TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
        self._next = self._end = 0  # the next number to hand out; the end of the reserved block

    def next(self) -> int:
        with self._lock:
            if self._next >= self._end:
                high = self._conn.execute(
                    "INSERT INTO publish_seq VALUES (?, ?) ON CONFLICT(origin) DO UPDATE SET seq = seq + ? "
                    "RETURNING seq", (self.origin, self.block, self.block)).fetchone()[0]
                self._next, self._end = high - self.block + 1, high + 1
            self._next += 1
            return self._next - 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Lru:
    """A bounded set that forgets the oldest entries first."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._d: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self._d

    def add(self, key: bytes) -> bool:
        """Remember `key`; False if it was already remembered."""
        if key in self._d:
            self._d.move_to_end(key)
            return False
        self._d[key] = None
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return True


@dataclass
class _Peer:
    endpoint: str = ""
    pinned: bool = False          # endpoint we reached it by (bootstrap): not overwritten by gossip
    last_seen: float = 0.0        # time.monotonic()
    failures: int = 0             # consecutive failed reconciliations
    banned_until: float = 0.0
    info: wire.PeerInfo | None = None
    next_dial: float = 0.0        # time.monotonic() before which we do not dial it again


@dataclass(frozen=True)
class _FetchJob:
    peer: str
    endpoint: str
    ids: tuple[bytes, ...]
    expected_sender: str | None   # the announcer must have signed what it serves; None for relays
    why: str                      # "announcement", "reconcile", "request"


class _FetchQueue:
    """Fetch jobs waiting for a fetcher. Jobs for the same peer, endpoint, expected sender and
    reason merge into one while they wait, so a burst of announcements from one peer becomes
    one Fetch. Bounded: at most `max_jobs` waiting jobs of at most `max_ids` ids each; `put`
    refuses the rest (reconciliation fetches it later). Loop-thread only.
    """

    def __init__(self, max_jobs: int, max_ids: int):
        self.max_jobs, self.max_ids = max_jobs, max_ids
        self._jobs: collections.OrderedDict[tuple, dict[bytes, None]] = collections.OrderedDict()
        self._ready = asyncio.Event()

    def put(self, job: _FetchJob) -> bool:
        """Queue or merge the job; False if (part of) it did not fit."""
        key = (job.peer, job.endpoint, job.expected_sender, job.why)
        ids = self._jobs.get(key)
        if ids is None:
            if len(self._jobs) >= self.max_jobs:
                return False
            ids = self._jobs[key] = {}
        room = self.max_ids - len(ids)
        ids.update(dict.fromkeys(job.ids[:room]))
        self._ready.set()
        return len(job.ids) <= room

    async def get(self) -> _FetchJob:
        """The job that waited longest (with everything merged into it)."""
        while not self._jobs:
            self._ready.clear()
            await self._ready.wait()
        (peer, endpoint, expected_sender, why), ids = self._jobs.popitem(last=False)
        return _FetchJob(peer, endpoint, tuple(ids), expected_sender, why)


def _chunks(items: Sequence[SerializedGroup], max_groups: int, max_bytes: int) -> Iterable[list[SerializedGroup]]:
    batch: list[SerializedGroup] = []
    size = 0
    for g in items:
        s = len(g.data) + 8
        if batch and (len(batch) >= max_groups or size + s > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(g)
        size += s
    if batch:
        yield batch


def _merge_announcements(anns: Sequence[wire.Announcement], max_groups: int) -> list[wire.Announcement]:
    """Our queued announcements as few messages: consecutive ones merge while they list at most
    max_groups ids together. A merged announcement names the newest envelope it covers."""
    out: list[wire.Announcement] = []
    for ann in anns:
        last = out[-1] if out else None
        if last is not None and len(last.group_ids) + len(ann.group_ids) <= max_groups:
            last.group_ids.extend(ann.group_ids)
            last.sizes.extend(ann.sizes)
            last.envelope_id, last.round, last.created_at_ms = ann.envelope_id, ann.round, ann.created_at_ms
        else:
            merged = wire.Announcement()
            merged.CopyFrom(ann)
            out.append(merged)
    return out


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("rollshare")
    except Exception:
        return ""


# ------------------------------------------------------------------------------ the service

class NetworkService:
    """A swarm member: gossip of announcements, gRPC data plane, reconciliation. See the module doc.

        svc = NetworkService(store, keypair, NetworkConfig(bootstrap=("1.2.3.4:4102",)))
        svc.start()                  # NetworkError if a port is taken or no bootstrap peer answers
        svc.publish(groups)          # never waits for the network
        svc.status()                 # {"peers": 3, "groups_in": 120, "groups_out": 48, ...}
        svc.stop()
    """

    def __init__(self, store: RolloutStore, keypair: KeyPair, config: NetworkConfig = NetworkConfig(), *,
                 metrics: Callable[[], dict] | None = None, model: str = "", hardware: str = "",
                 perf: Any = None):
        self.store = store
        self.perf = perf  # a rollshare.net.perf_records.PerfExchange: perf records on their own topic
        self.keypair = keypair
        self.cfg = config
        self.peer_id = peer_id_of(keypair)
        self.index = EnvelopeIndex(store)
        self.model = model
        self.hardware = hardware
        self._metrics = metrics
        self._seq = _SeqCounter(store.path, self.peer_id)
        self._rng = random.Random()
        window = config.window_s
        if window is None:
            window = min(store.limits.max_age_s, config.envelope.max_age_s) - 60.0
        self.window_ms = int(max(1.0, window) * 1000)

        # state shared with other threads: guarded by _lock
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()   # groups_out, groups_in, ...
        self._rejected: collections.Counter[str] = collections.Counter()  # fetch-level reasons
        self._dropped: collections.Counter[str] = collections.Counter()   # work we let go (queues full)
        self._snapshot: dict[str, Any] = {"peers": 0, "connected": [], "known_peers": 0, "gossip_rejected": {}}
        self.grpc_endpoint = ""
        self.multiaddrs: list[str] = []

        # lifecycle
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._start_error: str | None = None  # a message only: a traceback would keep gRPC objects alive
        self._running = False
        self._stop_requested = False
        self._stop_event: asyncio.Event | None = None

        # loop-thread state (the trio guest shares this thread)
        self._guest: TrioGuest | None = None
        self._host: P2PHost | None = None
        self._server = None
        self._peers: dict[str, _Peer] = {}
        self._connected: set[str] = set()
        self._clients: collections.OrderedDict[str, RolloutsClient] = collections.OrderedDict()
        self._inflight: set[bytes] = set()
        self._settled = _Lru(config.settled_groups)  # refused as replays: not fetched again for a while
        self._seen_envelopes = SeenEnvelopes(config.seen_envelopes)
        self._seen_announcements = _Lru(config.seen_announcements)
        self._background: set[asyncio.Task] = set()
        self._dialing = 0  # peer-exchange dials in flight
        self._last_peer_info = 0.0
        self._last_announced = -math.inf  # time.monotonic() of our last announcement gossiped

    # ================================================================= sync API (any thread)

    def start(self, timeout: float | None = None) -> "NetworkService":
        """Start listening and join the swarm; return once listening and bootstrapped.

        Raises NetworkError if a port is taken, or if bootstrap addresses were given and none
        answered within bootstrap_timeout_s.
        """
        if self._thread is not None:
            raise RuntimeError("NetworkService.start() can only be called once; make a new one")
        timeout = self.cfg.bootstrap_timeout_s + 20.0 if timeout is None else timeout
        self._thread = threading.Thread(target=self._thread_main, name=f"rollshare-net-{self.peer_id[-6:]}",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise NetworkError(f"the network service did not start within {timeout:g} s")
        if self._start_error is not None:
            self._thread.join(10.0)
            self._seq.close()
            raise NetworkError(self._start_error)
        log.info("swarm member %s: p2p %s, gRPC %s", self.peer_id, ", ".join(self.multiaddrs[:2]),
                 self.grpc_endpoint)
        return self

    def publish(self, groups: Sequence[pb.RolloutGroup]) -> None:
        """Sign, store and announce our groups. Never waits for the network.

        Each group's `origin` must be this node's peer id. Groups are stored (deduplicated) and
        recorded with their envelope so peers can fetch them; the announcement is queued for
        gossip (dropped and counted if the queue is full: reconciliation delivers anyway).
        """
        items = [SerializedGroup.of(g) for g in groups]  # serialized and hashed once, for signing and storing
        for chunk in _chunks(items, self.cfg.envelope.max_groups, self.cfg.envelope.max_envelope_bytes // 2):
            first = chunk[0].group
            sealed = seal(chunk, self.keypair, policy_id=first.policy_id, round=int(first.round),
                          seq=self._seq.next())
            self.index.put_own(sealed, chunk)
            header = wire.EnvelopeHeader.FromString(sealed.header)
            ann = wire.Announcement(origin=self.peer_id, envelope_id=envelope_id(sealed), group_ids=header.group_ids,
                                    sizes=[len(it.data) for it in chunk], grpc_endpoint=self.grpc_endpoint,
                                    round=header.round, created_at_ms=header.created_at_ms)
            with self._lock:
                self._counts["groups_out"] += len(chunk)
                self._counts["envelopes_out"] += 1
            self._submit(self._enqueue_announcement, ann)

    def status(self) -> dict:
        """A snapshot for people and status lines (refreshed by the service twice a second)."""
        with self._lock:
            snap = dict(self._snapshot)
            rejected = collections.Counter(self._rejected)
            rejected.update(snap.pop("gossip_rejected"))
            return {
                "running": self._running,
                "peer_id": self.peer_id,
                "grpc_endpoint": self.grpc_endpoint,
                "multiaddrs": list(self.multiaddrs),
                **snap,
                "groups_out": self._counts["groups_out"],
                "groups_in": self._counts["groups_in"],
                "envelopes_out": self._counts["envelopes_out"],
                "envelopes_in": self._counts["envelopes_in"],
                "announcements_out": self._counts["announcements_out"],
                "fetches": self._counts["fetches"],
                "fetch_failures": self._counts["fetch_failures"],
                "reconciles": self._counts["reconciles"],
                "dials": self._counts["dials"],
                "rejected": dict(rejected),
                "dropped": dict(self._dropped),
            }

    def info(self) -> dict:
        """Who and where this node is: peer id, multiaddrs, gRPC endpoint."""
        return {"peer_id": self.peer_id, "multiaddrs": list(self.multiaddrs), "grpc_endpoint": self.grpc_endpoint}

    def fetch(self, endpoint: str, ids: Sequence[bytes], timeout: float | None = None) -> int:
        """Fetch the given groups (those we do not hold) from a peer now; return how many were new.

        For tools and tests; the service fetches by itself. Blocks up to `timeout`.
        """
        timeout = self.cfg.fetch_timeout_s if timeout is None else timeout
        job = _FetchJob("", endpoint, tuple(ids), None, "request")
        return self._call(self._fetch(job, timeout=timeout), timeout + 2.0)

    def gossip_raw(self, topic: str, data: bytes, timeout: float = 10.0) -> None:
        """Publish raw bytes on a topic, bypassing envelopes (for tests and benchmarks)."""
        self._call(self._gossip(topic, data, raise_errors=True), timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Drain and stop: cancel every task, stop gRPC (grace 1 s), close the host, join the thread.

        Idempotent. Raises NetworkError if the service thread does not end within `timeout`.
        """
        thread = self._thread
        if thread is None or self._stop_requested and not thread.is_alive():
            return
        self._stop_requested = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._request_stop)
        thread.join(timeout)
        if thread.is_alive():
            raise NetworkError(f"the network service did not stop within {timeout:g} s")
        self._seq.close()
        self.index.close()  # the calling thread's connection (publish used it)

    # ===================================================================== loop-thread side

    def _submit(self, fn: Callable, *args: Any) -> None:
        """Hand a plain callback to the loop from any thread; dropped (and counted) if not running."""
        loop = self._loop
        if loop is None or not self._running:
            with self._lock:
                self._dropped["not_running"] += 1
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile
            with self._lock:
                self._dropped["not_running"] += 1

    def _call(self, coro, timeout: float):
        loop = self._loop
        if loop is None or not self._running:
            coro.close()
            raise NetworkError("the network service is not running")
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"network call did not finish within {timeout:g} s") from None

    def _request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # never leave start() waiting
            if not self._started.is_set():
                self._start_error = _start_message(e)
            log.error("network service crashed", exc_info=True)
        finally:
            self._running = False
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        # SQLite work off the loop (batched writes, reconciliation digests, big reads); each thread
        # holds its own connection and page cache, so few threads
        self._loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"rollshare-db-{self.peer_id[-6:]}"))
        self._stop_event = asyncio.Event()
        self._announcements: asyncio.Queue[wire.Announcement] = asyncio.Queue(self.cfg.announce_queue)
        self._fetch_jobs = _FetchQueue(self.cfg.fetch_queue, self.cfg.fetch_job_ids)
        self._writes: asyncio.Queue[tuple[VerifiedEnvelope, asyncio.Future[int]]] = asyncio.Queue(
            self.cfg.store_queue)
        self._reconcile_wake = asyncio.Event()
        self._peer_info_wake = asyncio.Event()
        try:
            await self._open()
        except BaseException as e:
            self._start_error = _start_message(e)
            if not isinstance(e, NetworkError):
                log.debug("network start failed", exc_info=True)
            await self._close()
            self._started.set()
            return
        self._running = not self._stop_requested
        self._refresh_snapshot()
        self._started.set()
        tasks = [asyncio.create_task(coro, name=name) for name, coro in [
            ("announcer", self._announcer()),
            ("store-writer", self._store_writer()),
            ("reconciler", self._reconciler()),
            ("peer-info", self._peer_info_loop()),
            ("housekeeping", self._housekeeping()),
            *([("perf", self.perf.run(self._gossip))] if self.perf is not None else []),
            *[(f"fetcher-{i}", self._fetcher()) for i in range(self.cfg.fetch_concurrency)],
        ]]
        stop = asyncio.create_task(self._stop_event.wait())
        guest_end = asyncio.create_task(self._guest.wait())
        try:
            if not self._stop_requested:
                await asyncio.wait([stop, guest_end], return_when=asyncio.FIRST_COMPLETED)
            if guest_end.done() and not stop.done():
                log.error("the libp2p side stopped unexpectedly (%r); the node continues without the swarm",
                          guest_end.exception() if not guest_end.cancelled() else "cancelled")
        finally:
            self._running = False
            if not guest_end.done():  # drain: gossip what publish() queued, so peers can still fetch it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._announcements.join(), self.cfg.drain_s)
            for t in [*tasks, stop, guest_end, *self._background]:
                t.cancel()
            await asyncio.gather(*tasks, stop, guest_end, *self._background, return_exceptions=True)
            await self._close()

    async def _open(self) -> None:
        cfg = self.cfg
        self._guest = TrioGuest(name=f"libp2p-{self.peer_id[-6:]}")
        await self._guest.start()
        self._host = P2PHost(self.keypair, listen_host=cfg.listen_host, listen_port=cfg.p2p_port, limits=cfg.gossip,
                             heartbeat_s=1.0, enable_mdns=cfg.mdns, connect_timeout=cfg.bootstrap_timeout_s)
        try:
            await self._guest.start_task(self._host.run, timeout=30.0)
        except P2PError as e:
            raise NetworkError(f"libp2p {e} (--p2p-port)") from None
        try:
            self._server, port = await start_server(cfg.listen_host, cfg.grpc_port, self.index, info=self._info_pb,
                                                    status=self._status_pb, limits=cfg.server)
        except OSError as e:
            raise NetworkError(f"{e} (--grpc-port)") from None
        self.grpc_endpoint = _endpoint(self._advertise_host(), port)
        self.multiaddrs = self._host.listen_addrs()
        self._host.set_validator(ANNOUNCE_TOPIC, self._validate_announcement)
        self._host.set_validator(PEERS_TOPIC, self._validate_peer_info)
        await self._guest.call(self._host.subscribe, ANNOUNCE_TOPIC, self._on_announcement)
        await self._guest.call(self._host.subscribe, PEERS_TOPIC, self._on_peer_info)
        if self.perf is not None:
            from rollshare.net.perf_records import PERF_TOPIC

            self._host.set_validator(PERF_TOPIC, self.perf.validate)
            await self._guest.call(self._host.subscribe, PERF_TOPIC, self.perf.on_message)
        await self._bootstrap()

    async def _close(self) -> None:
        for client in list(self._clients.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2.0)
        self._clients.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stop_server(self._server, grace=self.cfg.drain_s), self.cfg.drain_s + 5.0)
            self._server = None
        if self._guest is not None:
            if self._host is not None and self._guest.running:
                with contextlib.suppress(Exception):
                    await self._guest.call(self._host.close, 5.0, timeout=7.0)
            try:
                await self._guest.stop(timeout=10.0)
            except Exception as e:
                log.warning("libp2p did not stop cleanly: %r", e)
        self.index.close()
        self.store.close()  # this thread's connection only

    def _advertise_host(self) -> str:
        if self.cfg.advertise_host:
            return self.cfg.advertise_host
        host = self.cfg.listen_host
        if host in ("0.0.0.0", "::"):
            others = [ip for ip in _local_ipv4_addresses() if ip != "127.0.0.1"]
            return others[0] if others else "127.0.0.1"
        return host

    # -------------------------------------------------------------------------- bootstrap

    async def _bootstrap(self) -> None:
        addrs = list(dict.fromkeys(self.cfg.bootstrap))
        if not addrs:
            return
        results = await asyncio.gather(*(self._bootstrap_one(a) for a in addrs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in errors:
            if not isinstance(r, NetworkError):
                raise r
        if len(errors) == len(addrs):
            if len(errors) == 1:
                raise errors[0]
            raise NetworkError("none of the bootstrap peers answered: " + "; ".join(map(str, errors)))
        for e in errors:
            log.warning("%s", e)

    async def _bootstrap_one(self, addr: str) -> str:
        """Connect to one bootstrap address, retrying until bootstrap_timeout_s; return its peer id."""
        loop = asyncio.get_running_loop()
        timeout = self.cfg.bootstrap_timeout_s
        deadline = loop.time() + timeout
        last: Exception | None = None
        while (left := deadline - loop.time()) > 0:
            try:
                if addr.startswith("/"):
                    if addr.rstrip("/").endswith(f"/p2p/{self.peer_id}"):
                        return self.peer_id  # our own address (one list for the whole swarm)
                    peer = await self._guest.call(self._host.connect, addr, left, timeout=left + 1.0)
                    self._peer(peer).last_seen = time.monotonic()
                    return peer
                return await self._bootstrap_grpc(addr, left)
            except (P2PError, RpcFailed, TimeoutError, OSError) as e:
                last = e
                await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))
        detail = f" (last error: {last})" if last is not None else ""
        raise NetworkError(f"bootstrap peer {addr} did not answer within {timeout:g} s; check the address or start "
                           f"without --bootstrap{detail}")

    async def _bootstrap_grpc(self, endpoint: str, left: float) -> str:
        """host:port: ask the node's Info for its peer id and multiaddrs, then dial one of them."""
        hp = split_endpoint(endpoint)
        if hp is None:
            raise NetworkError(f"bootstrap address {endpoint!r} is neither a multiaddr (/ip4/HOST/tcp/PORT/p2p/ID) "
                               "nor host:port")
        info = await self._client(endpoint).info(timeout=min(left, self.cfg.rpc_timeout_s))
        if info.peer_id == self.peer_id:
            return self.peer_id
        if not info.peer_id or len(info.multiaddrs) > _MAX_MULTIADDRS:
            raise NetworkError(f"bootstrap peer {endpoint} sent an unusable Info (no peer id or too many addresses)")
        # Prefer the host we reached its gRPC on (a service name, a NATed address), then what it lists.
        candidates: list[str] = []
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                hp[0], hp[1], type=socket.SOCK_STREAM), timeout=min(left, 5.0))
            ips = [ai[4][0] for ai in infos]
        except (OSError, TimeoutError):
            ips = []
        for ma in info.multiaddrs:
            m = re.match(r"^/ip[46]/[^/]+/tcp/(\d+)/p2p/(\w+)$", ma)
            if m and m.group(2) == info.peer_id:
                for ip in ips[:2]:
                    candidates.append(f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{m.group(1)}/p2p/{info.peer_id}")
        candidates += [ma for ma in info.multiaddrs if ma.endswith(f"/p2p/{info.peer_id}")]
        last: Exception | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + left
        for ma in dict.fromkeys(candidates):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                per_try = min(remaining, 5.0)
                await self._guest.call(self._host.connect, ma, per_try, timeout=per_try + 1.0)
            except (P2PError, TimeoutError) as e:
                last = e
                continue
            peer = self._peer(info.peer_id)
            peer.endpoint, peer.pinned, peer.info = endpoint, True, info
            peer.last_seen = time.monotonic()
            self._reconcile_wake.set()
            return info.peer_id
        raise P2PError(f"none of the libp2p addresses of {endpoint} answered ({last})")

    # ------------------------------------------------------------------------- gossip in

    def _validate_announcement(self, sender: str, data: bytes) -> str | None:
        """Topic validator (trio side, same thread as the loop): a reason to reject, or None."""
        try:
            check_announcement(sender, data, self.cfg.envelope)
            if self._banned(sender):
                raise GossipRejected("banned", f"{sender} sent something dishonest recently")
            if not self._seen_announcements.add(hashlib.sha256(data).digest()):
                raise GossipRejected(REPLAY, "this exact announcement was received before")
        except GossipRejected as r:
            log.info("rejected announcement from %s: %s", sender, r)
            return r.reason
        return None

    def _validate_peer_info(self, sender: str, data: bytes) -> str | None:
        try:
            check_peer_info(sender, data)
        except GossipRejected as r:
            log.info("rejected peer info from %s: %s", sender, r)
            return r.reason
        return None

    def _on_announcement(self, sender: str, data: bytes) -> None:
        ann = wire.Announcement.FromString(data)  # validated already
        self._guest.call_soon_asyncio(self._handle_announcement, sender, ann)

    def _on_peer_info(self, sender: str, data: bytes) -> None:
        info = wire.PeerInfo.FromString(data)
        self._guest.call_soon_asyncio(self._handle_peer_info, sender, info)

    def _handle_announcement(self, sender: str, ann: wire.Announcement) -> None:
        self._learn(sender, ann.grpc_endpoint)
        if not self._fetch_jobs.put(_FetchJob(sender, ann.grpc_endpoint, tuple(ann.group_ids), sender,
                                              "announcement")):
            with self._lock:
                self._dropped["fetch_queue_full"] += 1

    def _handle_peer_info(self, sender: str, info: wire.PeerInfo) -> None:
        peer = self._learn(sender, info.grpc_endpoint)
        peer.info = info
        self._maybe_dial(sender, peer, info)

    # ------------------------------------------------------------------- peer exchange

    def _maybe_dial(self, peer_id: str, peer: _Peer, info: wire.PeerInfo) -> None:
        """Dial a peer we heard of through gossip (relayed by others), while we have few connections.

        Only addresses that name the peer itself (/ip4|ip6/HOST/tcp/PORT/p2p/<its id>) are tried,
        a handful at most, one attempt per peer per dial_backoff_s, max_dials at once: a hostile
        peer info can make us try a few wrong addresses now and then, and the Noise handshake
        refuses any host that is not that peer.
        """
        now = time.monotonic()
        if (peer_id == self.peer_id or self._dialing >= self.cfg.max_dials or now < peer.next_dial
                or self._banned(peer_id) or self._host is None):
            return
        connected = self._host.peers()
        if peer_id in connected or len(connected) >= self.cfg.target_peers:
            return
        addrs = dialable_addrs(peer_id, info.multiaddrs)
        if not addrs:
            return
        peer.next_dial = now + self.cfg.dial_backoff_s
        self._dialing += 1
        self._spawn(self._dial(peer_id, addrs))

    async def _dial(self, peer_id: str, addrs: list[str]) -> None:
        try:
            for addr in addrs:
                t = self.cfg.dial_timeout_s
                try:
                    await self._guest.call(self._host.connect, addr, t, timeout=t + 1.0)
                except (P2PError, TimeoutError) as e:
                    log.debug("peer exchange: %s", e)
                    continue
                with self._lock:
                    self._counts["dials"] += 1
                log.info("peer exchange: connected to %s at %s", peer_id, addr)
                return
            with self._lock:
                self._dropped["dial_failed"] += 1
        finally:
            self._dialing -= 1

    def _peer(self, peer_id: str) -> _Peer:
        p = self._peers.get(peer_id)
        if p is None:
            if len(self._peers) >= self.cfg.max_peers:
                oldest = min(self._peers, key=lambda k: self._peers[k].last_seen)
                del self._peers[oldest]
            p = self._peers[peer_id] = _Peer()
        return p

    def _learn(self, peer_id: str, endpoint: str) -> _Peer:
        new = peer_id not in self._peers or not self._peers[peer_id].endpoint
        p = self._peer(peer_id)
        if not p.pinned:
            p.endpoint = endpoint
        p.last_seen = time.monotonic()
        if new:
            log.info("peer %s serves gRPC at %s", peer_id, p.endpoint)
            self._reconcile_wake.set()
            self._peer_info_wake.set()  # let it learn our endpoint without waiting a full period
        return p

    def _banned(self, peer_id: str) -> bool:
        p = self._peers.get(peer_id)
        return p is not None and p.banned_until > time.monotonic()

    # ------------------------------------------------------------------------ gossip out

    def _enqueue_announcement(self, ann: wire.Announcement) -> None:
        try:
            self._announcements.put_nowait(ann)
        except asyncio.QueueFull:
            with self._lock:
                self._dropped["announce_queue_full"] += 1

    async def _announcer(self) -> None:
        """Gossip queued announcements, at most one message per announce_interval_s: what queues
        up meanwhile goes out merged."""
        loop = asyncio.get_running_loop()
        last_sent = -math.inf
        while True:
            waiting = [await self._announcements.get()]
            try:
                await asyncio.sleep(max(0.0, last_sent + self.cfg.announce_interval_s - loop.time()))
                while not self._announcements.empty():
                    waiting.append(self._announcements.get_nowait())
                for ann in _merge_announcements(waiting, self.cfg.envelope.max_groups):
                    await self._gossip(ANNOUNCE_TOPIC, ann.SerializeToString())
                    with self._lock:
                        self._counts["announcements_out"] += 1
                last_sent = loop.time()
                self._last_announced = time.monotonic()
            finally:
                for _ in waiting:
                    self._announcements.task_done()

    async def _gossip(self, topic: str, data: bytes, raise_errors: bool = False) -> None:
        try:
            await self._guest.call(self._host.publish, topic, data, timeout=10.0)
        except (P2PError, TimeoutError, ValueError) as e:
            with self._lock:
                self._dropped["gossip_failed"] += 1
            log.info("could not gossip on %s: %s", topic, e)
            if raise_errors:
                raise

    def _peer_info_pb(self) -> wire.PeerInfo:
        m = self._metrics() if self._metrics else {}
        return wire.PeerInfo(peer_id=self.peer_id, multiaddrs=self.multiaddrs[:_MAX_MULTIADDRS],
                             grpc_endpoint=self.grpc_endpoint, model=self.model[:_MAX_TEXT],
                             hardware=self.hardware[:_MAX_TEXT], round=int(m.get("round", 0) or 0),
                             version=_version())

    async def _peer_info_loop(self) -> None:
        while True:
            self._last_peer_info = time.monotonic()
            await self._gossip(PEERS_TOPIC, self._peer_info_pb().SerializeToString())
            while True:  # until a new peer arrives, or a period passes in which we announced nothing
                try:
                    await asyncio.wait_for(self._peer_info_wake.wait(), self.cfg.peer_info_interval_s)
                    break
                except TimeoutError:
                    # our announcements carry our endpoint and keep us heard of: no heartbeat needed
                    if time.monotonic() - self._last_announced >= self.cfg.peer_info_interval_s:
                        break
            self._peer_info_wake.clear()
            # at most one early heartbeat per second, however many peers arrive
            await asyncio.sleep(max(0.0, self._last_peer_info + 1.0 - time.monotonic()))

    # --------------------------------------------------------------------------- fetching

    def _client(self, endpoint: str) -> RolloutsClient:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = RolloutsClient(endpoint, self.cfg.server)
            while len(self._clients) > self.cfg.max_clients:
                _, old = self._clients.popitem(last=False)
                self._spawn(old.close())
        else:
            self._clients.move_to_end(endpoint)
        return client

    def _spawn(self, coro) -> None:
        """A short background task owned by the service (cancelled on stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetcher(self) -> None:
        while True:
            job = await self._fetch_jobs.get()
            try:
                await self._fetch(job)
            except Exception:
                log.exception("fetch from %s failed unexpectedly", job.endpoint)

    async def _fetch(self, job: _FetchJob, timeout: float | None = None) -> int:
        """Fetch what we lack of job.ids from job.endpoint, verify, store. Returns groups new to us.

        Envelopes are verified here as they arrive and handed to the store writer; the ids stay
        in flight (not fetched again by anyone) until their write has finished.
        """
        if job.peer and self._banned(job.peer):
            return 0
        want = [cid for cid in dict.fromkeys(job.ids)
                if cid not in self._inflight and (job.why == "request" or cid not in self._settled)]
        # one indexed SQLite read on the loop: cheaper than a hand-off to a thread
        want = self.store.missing(want) if want else want
        if not want:
            return 0
        self._inflight.update(want)
        with self._lock:
            self._counts["fetches"] += 1
        writes: list[asyncio.Future[int]] = []
        try:
            client = self._client(job.endpoint)
            stream = client.fetch_verified(want, self.cfg.fetch_timeout_s if timeout is None else timeout,
                                           limits=self.cfg.envelope, expected_sender=job.expected_sender,
                                           on_reject=lambda r: self._reject_envelope(r, job))
            async with contextlib.aclosing(stream):
                async for verified in stream:
                    write = await self._accept(verified, job)
                    if write is not None:
                        writes.append(write)
        except RpcFailed as e:
            with self._lock:
                self._counts["fetch_failures"] += 1
            log.info("fetch of %d groups (%s) failed: %s", len(want), job.why, e)
        finally:
            try:
                done = await asyncio.gather(*writes, return_exceptions=True)
            finally:
                self._inflight.difference_update(want)
        return sum(n for n in done if isinstance(n, int))

    async def _accept(self, verified: VerifiedEnvelope, job: _FetchJob) -> asyncio.Future[int] | None:
        """Replay check, then queue the write; a future of the number of groups new to us."""
        if not self._seen_envelopes.add(verified):
            for cid in verified.cids:  # we lack them (evicted), but this delivery was taken before
                self._settled.add(cid)
            self._reject_envelope(Rejected(REPLAY, f"envelope {verified.envelope_id.hex()[:16]} from "
                                                   f"{verified.origin} with these groups was accepted before"), job)
            return None
        written: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._writes.put((verified, written))
        return written

    async def _store_writer(self) -> None:
        """Write verified envelopes: everything queued meanwhile goes into one transaction, in a thread."""
        batch: list[tuple[VerifiedEnvelope, asyncio.Future[int]]] = []
        try:
            while True:
                batch = [await self._writes.get()]
                while not self._writes.empty():
                    batch.append(self._writes.get_nowait())
                try:
                    results = await asyncio.to_thread(self.index.put_verified_many, [v for v, _ in batch])
                    new = [sum(1 for _, is_new in r if is_new) for r in results]
                    with self._lock:
                        self._counts["groups_in"] += sum(new)
                        self._counts["envelopes_in"] += len(batch)
                except Exception as e:
                    log.error("could not store %d fetched envelopes: %r", len(batch), e)
                    new = [0] * len(batch)
                for (_, written), n in zip(batch, new):
                    if not written.done():  # its fetch may have been cancelled meanwhile
                        written.set_result(n)
                batch = []
        finally:  # stopping: nobody waits for writes that will not happen
            while not self._writes.empty():
                batch.append(self._writes.get_nowait())
            for _, written in batch:
                written.cancel()

    def _reject_envelope(self, r: Rejected, job: _FetchJob) -> None:
        with self._lock:
            self._rejected[r.reason] += 1
        log.warning("rejected envelope from %s at %s (%s): %s", job.peer or "a peer", job.endpoint, job.why, r)
        if r.reason in _DISHONEST and job.peer:
            self._peer(job.peer).banned_until = time.monotonic() + self.cfg.ban_s
            log.warning("ignoring peer %s for %g s", job.peer, self.cfg.ban_s)

    # ---------------------------------------------------------------------- reconciliation

    def _pick_peer(self) -> tuple[str, _Peer] | None:
        now = time.monotonic()
        candidates = [(k, p) for k, p in self._peers.items()
                      if p.endpoint and p.banned_until <= now
                      and (now - p.last_seen <= self.cfg.peer_ttl_s or k in self._connected)]
        return self._rng.choice(candidates) if candidates else None

    async def _reconciler(self) -> None:
        while True:
            picked = self._pick_peer()
            if picked is not None:
                await self._reconcile_once(*picked)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconcile_wake.wait(), self.cfg.reconcile_interval_s)
            self._reconcile_wake.clear()

    async def _reconcile_once(self, peer_id: str, peer: _Peer) -> None:
        # bucket edges on multiples of the bucket size: both sides answer from their kept digests
        since = now_ms() - self.window_ms
        since -= since % self.cfg.reconcile_bucket_ms
        try:
            ids = await self._client(peer.endpoint).reconcile(self.index, since, self.cfg.reconcile_bucket_ms,
                                                              timeout=self.cfg.rpc_timeout_s)
        except RpcFailed as e:
            peer.failures += 1
            log.info("reconcile with %s failed (%d in a row): %s", peer_id, peer.failures, e)
            if peer.failures >= self.cfg.max_reconcile_failures and self._peers.get(peer_id) is peer:
                del self._peers[peer_id]  # heard of again when it gossips
            return
        peer.failures = 0
        peer.last_seen = time.monotonic()
        with self._lock:
            self._counts["reconciles"] += 1
        if ids:
            n = await self._fetch(_FetchJob(peer_id, peer.endpoint, tuple(ids), None, "reconcile"))
            if n:
                log.info("reconcile with %s: %d groups we lacked", peer_id, n)

    # ------------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._refresh_snapshot()

    def _refresh_snapshot(self) -> None:
        connected = set(self._host.peers()) if self._host is not None else set()
        if connected - self._connected:
            self._peer_info_wake.set()  # new neighbours: tell them where our gRPC is
        self._connected = connected
        gossip_rejected: collections.Counter[str] = collections.Counter()
        if self._host is not None:
            for (_, reason), n in list(self._host.rejected.items()):
                gossip_rejected[reason] += n
        with self._lock:
            self._snapshot = {"peers": len(connected), "connected": sorted(connected),
                              "known_peers": sum(1 for p in self._peers.values() if p.endpoint),
                              "gossip_rejected": dict(gossip_rejected)}

    # --------------------------------------------------------------------- gRPC callbacks

    async def _info_pb(self) -> wire.PeerInfo:
        return self._peer_info_pb()

    async def _status_pb(self) -> wire.NodeStatus:
        m = self._metrics() if self._metrics else {}
        stored = await asyncio.to_thread(len, self.store)
        s = self.status()
        return wire.NodeStatus(
            info=self._peer_info_pb(), peers=s["peers"], groups_stored=stored, groups_out=s["groups_out"],
            groups_in=s["groups_in"], reward_ma=float(m.get("reward_ma", 0.0) or 0.0),
            tokens_per_s=float(m.get("tokens_per_s", 0.0) or 0.0), step_s=float(m.get("step_s", 0.0) or 0.0),
            method=str(m.get("method", "") or ""), rejected={k: int(v) for k, v in s["rejected"].items()})


def _start_message(e: BaseException) -> str:
    return str(e) if isinstance(e, NetworkError) else f"could not start networking: {type(e).__name__}: {e}"


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
