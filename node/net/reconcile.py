"""Reconciliation: find the rollout groups a peer holds that we lack, in two round trips.

Gossip announcements can be lost (queues overflow, a node was offline); reconciliation makes
delivery complete. Both sides cut the window [since_ms, now] into buckets of `bucket_ms` by
each group's created_at, and summarise a bucket by a digest: (count, xor of the first 8 bytes
of every content id, read as a big-endian uint64). Then:

1. the caller sends its digests; the responder answers with the bucket starts whose digests
   differ (including buckets only one side has);
2. the caller sends every id it holds in those buckets; the responder answers with the ids it
   holds there that the caller did not list (newest first, capped).

The pure functions (`digests`, `differing`, `ids_in_buckets`, `diff`, `respond`) hold the
whole protocol; `reconcile_with` is the caller's side over a gRPC stub. The responder's side
is `respond`, which the gRPC service calls. A side offers what it can serve (groups stored
with their signed envelope), read through an `EntrySource`. A source that keeps its digests
itself (`DigestSource`, e.g. EnvelopeIndex) answers phase 1 without listing its entries and
phase 2 by listing only the differing buckets; any other source is scanned over the window.

This module never touches SQLite or sockets itself, and never fetches groups: it only names
which ids to fetch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from rollshare.proto import wire_pb2 as wire

Entry = tuple[bytes, int]   # (content id, created_at_ms)
Digest = tuple[int, int]    # (count, xor of 8-byte id prefixes)
ID_BYTES = 32


class EntrySource(Protocol):
    """Anything that lists the (cid, created_at_ms) it can serve; EnvelopeIndex is one."""

    def entries_since(self, since_ms: int) -> list[Entry]: ...


class DigestSource(EntrySource, Protocol):
    """An EntrySource that answers digests and bucket contents itself, without a full scan."""

    def digests(self, since_ms: int, bucket_ms: int) -> dict[int, "Digest"]:
        """Exactly `digests(self.entries_since(since_ms), since_ms, bucket_ms)`."""

    def entries_in(self, since_ms: int, bucket_ms: int, starts: Iterable[int]) -> list[Entry]:
        """Exactly the entries of `ids_in_buckets(self.entries_since(since_ms), starts, ...)`."""


class _Listed:
    """A plain list of entries as an EntrySource."""

    def __init__(self, entries: Sequence[Entry]):
        self.entries = entries

    def entries_since(self, since_ms: int) -> list[Entry]:
        return [e for e in self.entries if e[1] >= since_ms]


def source_digests(source: EntrySource, since_ms: int, bucket_ms: int) -> dict[int, Digest]:
    """The source's digests over [since_ms, ...)."""
    if hasattr(source, "digests"):
        return source.digests(since_ms, bucket_ms)
    return digests(source.entries_since(since_ms), since_ms, bucket_ms)


def source_ids_in(source: EntrySource, starts: Sequence[int], since_ms: int, bucket_ms: int) -> dict[bytes, int]:
    """The source's entries (cid -> created_at_ms) in the given buckets."""
    if hasattr(source, "entries_in"):
        return dict(source.entries_in(since_ms, bucket_ms, starts))
    return ids_in_buckets(source.entries_since(since_ms), starts, since_ms, bucket_ms)


@dataclass(frozen=True)
class ReconcileLimits:
    """Bounds on one reconciliation exchange, on both sides (the other side may be hostile)."""

    min_bucket_ms: int = 1_000          # finer buckets would let a caller ask for one id per bucket
    max_buckets: int = 100_000          # digests or detail starts in one message
    max_have_ids: int = 200_000         # ids the caller may list in phase 2
    max_missing_ids: int = 4_096        # ids a responder returns at once (newest first)

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"ReconcileLimits.{name} must be > 0, got {value!r}")


class ReconcileError(ValueError):
    """A reconciliation message that breaks the protocol or its limits."""


# ---------------------------------------------------------------------------- pure functions

def bucket_start(created_at_ms: int, since_ms: int, bucket_ms: int) -> int:
    """Start of the bucket holding created_at_ms: since_ms + k * bucket_ms."""
    return since_ms + (created_at_ms - since_ms) // bucket_ms * bucket_ms


def id_prefix(cid: bytes) -> int:
    """The first 8 bytes of an id as a big-endian uint64: what a digest xors."""
    return int.from_bytes(cid[:8], "big")


def digests(entries: Iterable[Entry], since_ms: int, bucket_ms: int) -> dict[int, Digest]:
    """Digest per non-empty bucket of the entries created at or after since_ms."""
    if bucket_ms <= 0:
        raise ReconcileError(f"bucket_ms must be > 0, got {bucket_ms}")
    out: dict[int, Digest] = {}
    for cid, created in entries:
        if created < since_ms:
            continue
        start = bucket_start(created, since_ms, bucket_ms)
        count, x = out.get(start, (0, 0))
        out[start] = (count + 1, x ^ id_prefix(cid))
    return out


def differing(ours: dict[int, Digest], theirs: dict[int, Digest]) -> list[int]:
    """Sorted starts of buckets whose digests differ, including buckets only one side has."""
    return sorted(s for s in ours.keys() | theirs.keys() if ours.get(s, (0, 0)) != theirs.get(s, (0, 0)))


def ids_in_buckets(entries: Iterable[Entry], starts: Iterable[int], since_ms: int, bucket_ms: int
                   ) -> dict[bytes, int]:
    """The entries (cid -> created_at_ms) that fall in the given buckets."""
    wanted = set(starts)
    return {cid: created for cid, created in entries
            if created >= since_ms and bucket_start(created, since_ms, bucket_ms) in wanted}


def diff(ours: Sequence[Entry], theirs: Sequence[Entry], since_ms: int, bucket_ms: int
         ) -> tuple[set[bytes], set[bytes]]:
    """(ids only we hold, ids only they hold) in the window, computed the way the protocol does."""
    starts = differing(digests(ours, since_ms, bucket_ms), digests(theirs, since_ms, bucket_ms))
    mine = ids_in_buckets(ours, starts, since_ms, bucket_ms)
    yours = ids_in_buckets(theirs, starts, since_ms, bucket_ms)
    return set(mine) - set(yours), set(yours) - set(mine)


def to_proto(d: dict[int, Digest]) -> list[wire.BucketDigest]:
    return [wire.BucketDigest(start_ms=s, count=c, xor=x) for s, (c, x) in sorted(d.items())]


def from_proto(buckets: Iterable[wire.BucketDigest]) -> dict[int, Digest]:
    out: dict[int, Digest] = {}
    for b in buckets:
        if b.start_ms in out:
            raise ReconcileError(f"bucket {b.start_ms} is listed twice")
        out[b.start_ms] = (b.count, b.xor)
    return out


def respond(request: wire.ReconcileRequest, entries: Sequence[Entry] | EntrySource,
            limits: ReconcileLimits = ReconcileLimits()) -> wire.ReconcileResponse:
    """The responder's answer to either phase. Raises ReconcileError on a request out of bounds.

    A request with detail_starts is phase 2; otherwise phase 1. `entries` is a list of entries
    or an EntrySource.
    """
    source = _Listed(entries) if isinstance(entries, (list, tuple)) else entries
    since, bucket = request.since_ms, request.bucket_ms
    if bucket < limits.min_bucket_ms:
        raise ReconcileError(f"bucket_ms {bucket} is below the minimum {limits.min_bucket_ms}")
    if len(request.buckets) > limits.max_buckets or len(request.detail_starts) > limits.max_buckets:
        raise ReconcileError(f"more than {limits.max_buckets} buckets in one request")
    if len(request.have_ids) > limits.max_have_ids:
        raise ReconcileError(f"{len(request.have_ids)} have_ids, at most {limits.max_have_ids} allowed")
    if not request.detail_starts:
        if request.have_ids:
            raise ReconcileError("have_ids without detail_starts")
        return wire.ReconcileResponse(
            differing_starts=differing(source_digests(source, since, bucket), from_proto(request.buckets)))
    held = source_ids_in(source, list(request.detail_starts), since, bucket)
    have = set(request.have_ids)
    missing = sorted((cid for cid in held if cid not in have), key=lambda cid: (-held[cid], cid))
    return wire.ReconcileResponse(missing_ids=missing[:limits.max_missing_ids])


# ------------------------------------------------------------------------------ caller's side

async def reconcile_with(stub, source: EntrySource, since_ms: int, bucket_ms: int, timeout: float,
                         limits: ReconcileLimits = ReconcileLimits()) -> list[bytes]:
    """Ids the peer behind `stub` (a RolloutsStub on a grpc.aio channel) holds and we lack.

    Both phases together finish within `timeout` seconds or raise the gRPC error
    (DEADLINE_EXCEEDED). A peer's answer is checked: malformed or known ids are dropped, and
    at most limits.max_missing_ids are returned.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ours = await asyncio.to_thread(source_digests, source, since_ms, bucket_ms)

    def remaining() -> float:
        return max(0.001, deadline - loop.time())

    first = await stub.Reconcile(
        wire.ReconcileRequest(since_ms=since_ms, bucket_ms=bucket_ms, buckets=to_proto(ours)),
        timeout=remaining())
    starts = sorted({s for s in first.differing_starts
                     if s >= since_ms and (s - since_ms) % bucket_ms == 0})[:limits.max_buckets]
    if not starts:
        return []
    have = await asyncio.to_thread(source_ids_in, source, starts, since_ms, bucket_ms)
    have_ids = sorted(have, key=lambda cid: (-have[cid], cid))[:limits.max_have_ids]
    second = await stub.Reconcile(
        wire.ReconcileRequest(since_ms=since_ms, bucket_ms=bucket_ms, have_ids=have_ids, detail_starts=starts),
        timeout=remaining())
    # ids outside the detailed buckets are not checked here; the fetcher skips those it holds
    out = [cid for cid in dict.fromkeys(second.missing_ids) if len(cid) == ID_BYTES and cid not in have]
    return out[:limits.max_missing_ids]
