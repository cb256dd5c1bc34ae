"""Signed performance records: how nodes share their measurements of generation methods.

A node batches its own measurements (history records of rollshare.accel, schema
`history.SCHEMA`) into a `PerfBatch`, signs it with its ed25519 identity (domain
"rollshare/perf/v1\\n", so the signature can never pass for an envelope's) and gossips it on
`PERF_TOPIC`, a topic of its own. `PerfExchange` is the protocol: it queues what we measured,
gossips it at most once per `interval_s`, and checks what arrives.

`verify_perf_batch` treats every byte as hostile and stops at the first failure with a reason
(a key of the host's rejection counters), in this order:

    size cap → protobuf parse → batch parse → public key (ed25519 only) → origin is the key's
    peer id → origin is the gossip sender → signature → record count → per-record schema
    (version, method name, status, features JSON size and shape, finite numbers in range)
    → freshness (created_at within [now - max_age, now + max_future]) → replay (origin, seq)
    → per-peer quota (a token bucket of records)

Accepted records go to the local history marked `source = "peer:<origin>"`; the learner then
counts them at the next start like our own. This module never touches torch or sockets: the
NetworkService subscribes it and hands it bytes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from rollshare.accel.history import SCHEMA, History, HistoryError, setting_key, validate_record
from rollshare.net import identity
from rollshare.net.identity import KeyPair
from rollshare.proto import perf_pb2 as pp
from rollshare.store import now_ms as _now_ms  # the parameter now_ms shadows the name

PERF_TOPIC = "rollshare/perf/1"
SIGNING_DOMAIN = b"rollshare/perf/v1\n"
_METHOD_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

# Rejection reasons, in the order verify_perf_batch checks them.
OVERSIZED = "perf_oversized"
MALFORMED = "perf_malformed"
BAD_PUBLIC_KEY = "perf_bad_public_key"
ORIGIN_MISMATCH = "perf_origin_mismatch"
SENDER_MISMATCH = "perf_sender_mismatch"
BAD_SIGNATURE = "perf_bad_signature"
TOO_MANY_RECORDS = "perf_too_many_records"
WRONG_SCHEMA = "perf_wrong_schema"
BAD_RECORD = "perf_bad_record"
STALE = "perf_stale"
FUTURE = "perf_future"
REPLAY = "perf_replay"
QUOTA = "perf_quota"
REASONS = (OVERSIZED, MALFORMED, BAD_PUBLIC_KEY, ORIGIN_MISMATCH, SENDER_MISMATCH, BAD_SIGNATURE, TOO_MANY_RECORDS,
           WRONG_SCHEMA, BAD_RECORD, STALE, FUTURE, REPLAY, QUOTA)


class PerfRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PerfLimits:
    max_batch_bytes: int = 64 * 1024
    max_records: int = 64
    max_features_bytes: int = 4096
    max_tokens_per_s: float = 1e9
    max_age_s: float = 24 * 3600.0
    max_future_s: float = 60.0
    quota_records: float = 256.0  # per peer: bucket size ...
    quota_refill_per_s: float = 256.0 / 600.0  # ... refilled over ten minutes
    max_peers_tracked: int = 4096


def record_to_pb(r: dict) -> pp.PerfRecord:
    return pp.PerfRecord(schema=int(r["schema"]), method=r["method"], status=r["status"],
                         features_json=json.dumps(r["features"], separators=(",", ":"), sort_keys=True),
                         tokens_per_s=float(r.get("tokens_per_s", 0.0)), latency_s=float(r.get("latency_s", 0.0)),
                         peak_mem_mb=float(r.get("peak_mem_mb", 0.0)),
                         measured_at_ms=int(float(r.get("time", time.time())) * 1000),
                         lossless=bool(r.get("lossless", True)))


def sign_perf_batch(keypair: KeyPair, records: Sequence[dict], seq: int,
                    created_at_ms: int | None = None) -> pp.SignedPerfBatch:
    """Our own measurements, signed. ValueError if there are none."""
    if not records:
        raise ValueError("a perf batch carries at least one record")
    batch = pp.PerfBatch(origin=identity.peer_id_of(keypair),
                         created_at_ms=_now_ms() if created_at_ms is None else created_at_ms, seq=seq,
                         records=[record_to_pb(r) for r in records]).SerializeToString(deterministic=True)
    return pp.SignedPerfBatch(batch=batch, signature=identity.sign(keypair, SIGNING_DOMAIN + batch),
                              public_key=keypair.public_key.serialize())


def _check_record(rec: pp.PerfRecord, limits: PerfLimits) -> dict:
    if rec.schema != SCHEMA:
        raise PerfRejected(WRONG_SCHEMA, f"record schema {rec.schema}, expected {SCHEMA}")
    if not _METHOD_NAME.match(rec.method):
        raise PerfRejected(BAD_RECORD, "method name")
    if len(rec.features_json) > limits.max_features_bytes:
        raise PerfRejected(BAD_RECORD, f"features of {len(rec.features_json)} bytes")
    for name in ("tokens_per_s", "latency_s", "peak_mem_mb"):
        v = getattr(rec, name)
        if not math.isfinite(v) or v < 0 or v > limits.max_tokens_per_s:
            raise PerfRejected(BAD_RECORD, f"{name} {v}")
    try:
        features = json.loads(rec.features_json)
    except ValueError:
        raise PerfRejected(BAD_RECORD, "features are not JSON") from None
    r = {"schema": rec.schema, "time": rec.measured_at_ms / 1000.0, "method": rec.method, "status": rec.status,
         "features": features, "tokens_per_s": rec.tokens_per_s, "latency_s": rec.latency_s,
         "peak_mem_mb": rec.peak_mem_mb, "lossless": rec.lossless}
    try:
        validate_record(r)
        if not all(_finite_json(features[k]) for k in ("workload", "model", "hardware")):
            raise HistoryError("features hold a non-finite number or nest too deep")
    except HistoryError as e:
        raise PerfRejected(BAD_RECORD, str(e)) from None
    return r


def _finite_json(v, depth: int = 0) -> bool:
    if depth > 4:
        return False
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _finite_json(x, depth + 1) for k, x in v.items())
    if isinstance(v, list):
        return all(_finite_json(x, depth + 1) for x in v)
    return v is None or isinstance(v, (str, int, bool))


def verify_perf_batch(data: bytes, sender: str | None, limits: PerfLimits = PerfLimits(),
                      now_ms: int | None = None) -> tuple[pp.PerfBatch, list[dict]]:
    """(batch, records as history dicts) or PerfRejected; quota and replay are PerfExchange's."""
    now = _now_ms() if now_ms is None else now_ms
    if len(data) > limits.max_batch_bytes:
        raise PerfRejected(OVERSIZED, f"{len(data)} bytes > {limits.max_batch_bytes}")
    try:
        signed = pp.SignedPerfBatch.FromString(bytes(data))
        batch = pp.PerfBatch.FromString(signed.batch)
    except Exception as e:  # DecodeError, or anything else the parser throws at garbage
        raise PerfRejected(MALFORMED, type(e).__name__) from None
    key = signed.public_key
    if not identity.is_ed25519_public_key(key):
        raise PerfRejected(BAD_PUBLIC_KEY, "ed25519 keys only")
    try:
        origin = identity.peer_id_from_public_key(key)
    except Exception:  # noqa: BLE001 - any failure to read the key is a bad key
        raise PerfRejected(BAD_PUBLIC_KEY, "unreadable key") from None
    if batch.origin != origin:
        raise PerfRejected(ORIGIN_MISMATCH, "origin is not the key's peer id")
    if sender is not None and sender != origin:
        raise PerfRejected(SENDER_MISMATCH, f"sent by {sender}, signed by {origin}")
    if not identity.verify_signature(key, SIGNING_DOMAIN + signed.batch, signed.signature):
        raise PerfRejected(BAD_SIGNATURE)
    if not 0 < len(batch.records) <= limits.max_records:
        raise PerfRejected(TOO_MANY_RECORDS, f"{len(batch.records)} records (1..{limits.max_records})")
    records = [_check_record(r, limits) for r in batch.records]
    if batch.created_at_ms < now - limits.max_age_s * 1000:
        raise PerfRejected(STALE)
    if batch.created_at_ms > now + limits.max_future_s * 1000:
        raise PerfRejected(FUTURE)
    for r in records:
        r["source"] = f"peer:{origin}"
        r["setting"] = setting_key(r["features"])
    return batch, records


class _Quota:
    """Per-peer token buckets of records (LRU-bounded)."""

    def __init__(self, size: float, refill_per_s: float, max_peers: int, clock=time.monotonic):
        self.size, self.refill, self.max_peers, self.clock = size, refill_per_s, max_peers, clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, peer: str, n: int) -> bool:
        now = self.clock()
        level, t = self._buckets.pop(peer, (self.size, now))
        level = min(self.size, level + (now - t) * self.refill)
        ok = level >= n
        self._buckets[peer] = (level - n if ok else level, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return ok


class PerfExchange:
    """The perf-records protocol: queue ours, gossip them, verify and keep theirs.

        ex = PerfExchange(keypair, history)
        ex.share(records)                         # any thread; never waits
        svc = NetworkService(..., perf=ex)        # validates/handles PERF_TOPIC, runs ex.run(gossip)
    """

    def __init__(self, keypair: KeyPair, history: History | None, limits: PerfLimits = PerfLimits(),
                 interval_s: float = 30.0, max_pending: int = 1024, clock=time.monotonic):
        self.keypair, self.history, self.limits, self.interval_s = keypair, history, limits, interval_s
        self.peer_id = identity.peer_id_of(keypair)
        self._lock = threading.Lock()
        self._pending: collections.deque[dict] = collections.deque(maxlen=max_pending)
        self._quota = _Quota(limits.quota_records, limits.quota_refill_per_s, limits.max_peers_tracked, clock)
        self._last_seq: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._accepted: collections.OrderedDict[bytes, list[dict]] = collections.OrderedDict()
        self._seq = int(time.time() * 1000)  # increasing across restarts without stored state
        self.rejected: collections.Counter[str] = collections.Counter()
        self.records_in = 0
        self.records_out = 0

    # ------------------------------------------------------------ ours
    def share(self, records: Sequence[dict]) -> None:
        """Queue our own measurements for the next gossip (oldest dropped beyond max_pending)."""
        with self._lock:
            self._pending.extend(r for r in records if str(r.get("source", "")).startswith(("bench", "node")))

    def next_batch(self) -> bytes | None:
        with self._lock:
            take = [self._pending.popleft() for _ in range(min(len(self._pending), self.limits.max_records))]
        while take:
            self._seq += 1
            data = sign_perf_batch(self.keypair, take, self._seq).SerializeToString()
            if len(data) <= self.limits.max_batch_bytes:
                self.records_out += len(take)
                return data
            take = take[: len(take) // 2]  # too big: send fewer (the rest is dropped, measurements recur)
        return None

    async def run(self, gossip: Callable[[str, bytes], Awaitable[None]], sleep=None) -> None:
        """Gossip queued records at most once per interval_s; owned and cancelled by the service."""
        sleep = sleep or asyncio.sleep
        while True:
            await sleep(self.interval_s)
            data = self.next_batch()
            if data is not None:
                await gossip(PERF_TOPIC, data)

    # ------------------------------------------------------------ theirs
    def validate(self, sender: str, data: bytes) -> str | None:
        """Topic validator: None to accept, or the reason (also counted in `rejected`)."""
        try:
            batch, records = verify_perf_batch(data, sender, self.limits)
            last = self._last_seq.get(batch.origin)
            if last is not None and batch.seq <= last:
                raise PerfRejected(REPLAY, f"seq {batch.seq} <= {last}")
            if not self._quota.take(batch.origin, len(records)):
                raise PerfRejected(QUOTA, f"{batch.origin} sent over {self.limits.quota_records:g} records "
                                          "in its window")
        except PerfRejected as r:
            with self._lock:
                self.rejected[r.reason] += 1
            return r.reason
        self._last_seq[batch.origin] = batch.seq
        self._last_seq.move_to_end(batch.origin)
        while len(self._last_seq) > self.limits.max_peers_tracked:
            self._last_seq.popitem(last=False)
        self._accepted[hashlib.sha256(data).digest()] = records
        while len(self._accepted) > 64:
            self._accepted.popitem(last=False)
        return None

    def on_message(self, sender: str, data: bytes) -> None:
        """Handler for accepted messages: append their records to the history."""
        records = self._accepted.pop(hashlib.sha256(data).digest(), None)
        if records is None:  # not validated by us (should not happen): check it now
            if self.validate(sender, data) is not None:
                return
            records = self._accepted.pop(hashlib.sha256(data).digest(), [])
        self.records_in += len(records)
        if self.history is not None and records:
            try:
                self.history.extend(records)
            except (OSError, HistoryError):
                with self._lock:
                    self.rejected["perf_unwritable"] += 1

    def status(self) -> dict:
        with self._lock:
            return {"records_in": self.records_in, "records_out": self.records_out, "pending": len(self._pending),
                    "rejected": dict(self.rejected)}
