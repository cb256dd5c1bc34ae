"""RolloutStore: the node's persistent, deduplicated store of rollout groups.

SQLite in WAL mode with synchronous=NORMAL: every committed insert survives a crash of the
process (kill -9); a torn write is rolled back by SQLite, never half-applied. Groups are keyed
by content id (sha256 of their deterministic serialization), so the same group arriving twice
(gossip, reconciliation, replay) is stored once. Bounds, all named and configurable:

- `max_age_s`: groups older than this (by the origin's created_at, clamped to our receive
  time so a sender cannot make a group immortal by dating it in the future) are pruned;
- `per_peer_quota`: at most this many groups per origin; a peer over quota loses its oldest
  (by created_at, ties by content id: every node evicts the same ones);
- `max_groups`: a global cap; the oldest groups go first, our own last.

Costs. A write is one transaction however many groups it carries (`put_serialized` takes groups
already serialized and hashed, e.g. by envelope verification, so nothing is encoded twice). The
per-origin quota is checked against counts kept in memory (loaded once at open, then updated by
every write through this object), so an insert never counts the table. Other parts of the node
that keep derived state (the envelope index's reconciliation digests) register a listener and
hear, after each commit, the created_at of every group added or removed.

Each thread uses its own connection (SQLite objects are not shared across threads).
This module never touches the network or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from rollshare.proto import rollout_pb2 as pb

SCHEMA_VERSION = 1
#: ids per `IN (...)` list: well under SQLite's smallest variable limit (999 before 3.32)
_SQL_CHUNK = 500


def content_id(group: pb.RolloutGroup) -> bytes:
    """sha256 of the deterministic serialization: the group's name everywhere."""
    return hashlib.sha256(group.SerializeToString(deterministic=True)).digest()


def connect_sqlite(path: str) -> sqlite3.Connection:
    """A connection as every rollshare table wants it: WAL, synchronous=NORMAL, autocommit."""
    c = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    return c


def now_ms() -> int:
    return int(time.time() * 1000)


def chunked(items: Sequence, size: int = _SQL_CHUNK) -> Iterator[Sequence]:
    """Consecutive slices of at most `size` items (for `IN (...)` lists)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def placeholders(n: int) -> str:
    return ",".join("?" * n)


@dataclass(frozen=True)
class StoreLimits:
    max_age_s: float = 3600.0
    per_peer_quota: int = 5000
    max_groups: int = 200_000


@dataclass(frozen=True)
class StoredGroup:
    cid: bytes
    origin: str
    group: pb.RolloutGroup
    received_at_ms: int


@dataclass(frozen=True)
class SerializedGroup:
    """A group with its deterministic serialization and content id, computed once.

    Invariant: `cid == sha256(data)` and `data` is `group` serialized deterministically.
    """

    cid: bytes
    data: bytes
    group: pb.RolloutGroup

    @classmethod
    def of(cls, group: pb.RolloutGroup) -> "SerializedGroup":
        data = group.SerializeToString(deterministic=True)
        return cls(hashlib.sha256(data).digest(), data, group)


@dataclass
class Transaction:
    """One write transaction of the store (see `RolloutStore.transaction`)."""

    conn: sqlite3.Connection
    #: created_at_ms of every group added or removed; handed to the listeners after commit
    changed: list[int] = field(default_factory=list)
    #: origin -> change in its number of groups; applied to the store's counts after commit
    count_delta: dict[str, int] = field(default_factory=dict)


Listener = Callable[[list[int]], None]


class RolloutStore:
    def __init__(self, path: str | os.PathLike, limits: StoreLimits = StoreLimits(), self_origin: str = ""):
        self.path = str(path)
        self.limits = limits
        self.self_origin = self_origin
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._listeners: list[Listener] = []
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS groups (
                    cid BLOB PRIMARY KEY,
                    origin TEXT NOT NULL,
                    round INTEGER NOT NULL,
                    created_at_ms INTEGER NOT NULL,
                    received_at_ms INTEGER NOT NULL,
                    family TEXT NOT NULL,
                    size INTEGER NOT NULL,
                    data BLOB NOT NULL
                );
                -- per-origin, oldest first with ties broken by cid: quota eviction reads it alone
                CREATE INDEX IF NOT EXISTS groups_origin_cid ON groups(origin, created_at_ms, cid);
                DROP INDEX IF EXISTS groups_origin;
                CREATE INDEX IF NOT EXISTS groups_created ON groups(created_at_ms);
                """
            )
            row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"rollout store {self.path} has schema {row[0]}, this node expects "
                                   f"{SCHEMA_VERSION}; move it away to start a fresh store")
        #: origin -> groups stored: the per-peer quota's counter (read once here, then kept up to date)
        self._per_origin: dict[str, int] = self.count_by_origin()

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = connect_sqlite(self.path)
        return c

    def connection(self) -> sqlite3.Connection:
        """This thread's connection to the store's file, for reads (the envelope index keeps its
        tables in the same file). Write through `transaction()`."""
        return self._conn()

    def close(self) -> None:
        """Close the calling thread's connection (another call reopens it)."""
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def add_listener(self, fn: Listener) -> None:
        """Call fn(created_at_ms of the groups added or removed) after each commit that changed groups.

        It runs on the writing thread, under the store's write lock: keep it quick, never write
        to the store from it.
        """
        self._listeners.append(fn)

    # ------------------------------------------------------------------ writes
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error) under the
        store's write lock. Other tables in this file (the envelope index's) may be written
        through `tx.conn` in the same transaction; groups only through `put_serialized(tx=...)`."""
        with self._write_lock:
            c = self._conn()
            c.execute("BEGIN IMMEDIATE")
            tx = Transaction(c)
            try:
                yield tx
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            for origin, delta in tx.count_delta.items():
                n = self._per_origin.get(origin, 0) + delta
                if n > 0:
                    self._per_origin[origin] = n
                else:
                    self._per_origin.pop(origin, None)
            if tx.changed:
                for fn in self._listeners:
                    fn(tx.changed)

    def put(self, group: pb.RolloutGroup, origin: str | None = None) -> tuple[bytes, bool]:
        """Store a group. Returns (content id, True if it was new)."""
        return self.put_many([group], origin)[0]

    def put_many(self, groups: Sequence[pb.RolloutGroup], origin: str | None = None) -> list[tuple[bytes, bool]]:
        """Store groups in one transaction. Returns (content id, True if it was new) per group."""
        return self.put_serialized([SerializedGroup.of(g) for g in groups], origin)

    def put_serialized(self, items: Sequence[SerializedGroup], origin: str | None = None,
                       tx: Transaction | None = None) -> list[tuple[bytes, bool]]:
        """Store groups already serialized and hashed, in one transaction (or inside `tx`).

        origin: the origin to file them under; None = each group's own `origin` field.
        Returns (content id, True if it was new) per item. Origins over quota lose their oldest.
        """
        if tx is None:
            with self.transaction() as tx:
                return self.put_serialized(items, origin, tx)
        c = tx.conn
        received = now_ms()
        out = []
        added: dict[str, int] = {}
        for it in items:
            g = it.group
            org = origin if origin is not None else g.origin
            created = min(int(g.created_at_ms), received)  # no dating into the future
            new = c.execute(
                "INSERT OR IGNORE INTO groups VALUES (?,?,?,?,?,?,?,?)",
                (it.cid, org, int(g.round), created, received, g.task.family, len(it.data), it.data),
            ).rowcount == 1
            out.append((it.cid, new))
            if new:
                added[org] = added.get(org, 0) + 1
                tx.changed.append(created)
        for org, n in added.items():
            tx.count_delta[org] = tx.count_delta.get(org, 0) + n
            self._enforce_quota(tx, org)
        return out

    def _enforce_quota(self, tx: Transaction, origin: str) -> None:
        """Drop an origin's oldest groups beyond per_peer_quota (never our own)."""
        if origin == self.self_origin:
            return
        over = self._per_origin.get(origin, 0) + tx.count_delta.get(origin, 0) - self.limits.per_peer_quota
        if over > 0:
            rows = tx.conn.execute("SELECT cid, created_at_ms FROM groups WHERE origin=? "
                                   "ORDER BY created_at_ms ASC, cid ASC LIMIT ?", (origin, over)).fetchall()
            self._delete(tx, [(cid, created, origin) for cid, created in rows])

    @staticmethod
    def _delete(tx: Transaction, rows: Sequence[tuple[bytes, int, str]]) -> int:
        """Delete the given (cid, created_at_ms, origin) rows; record the change. Returns rows deleted."""
        tx.conn.executemany("DELETE FROM groups WHERE cid=?", [(cid,) for cid, _, _ in rows])
        for _, created, origin in rows:
            tx.changed.append(created)
            tx.count_delta[origin] = tx.count_delta.get(origin, 0) - 1
        return len(rows)

    def prune(self, now: int | None = None) -> int:
        """Drop groups past the age limit, then the oldest beyond the global cap."""
        now = now_ms() if now is None else now
        with self.transaction() as tx:
            c = tx.conn
            n = self._delete(tx, c.execute("SELECT cid, created_at_ms, origin FROM groups WHERE created_at_ms < ?",
                                           (now - int(self.limits.max_age_s * 1000),)).fetchall())
            total = c.execute("SELECT COUNT(*) FROM groups").fetchone()[0]
            if total > self.limits.max_groups:
                n += self._delete(tx, c.execute(
                    "SELECT cid, created_at_ms, origin FROM groups ORDER BY origin = ? ASC, created_at_ms ASC, "
                    "cid ASC LIMIT ?", (self.self_origin, total - self.limits.max_groups)).fetchall())
        return n

    # ------------------------------------------------------------------- reads
    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM groups").fetchone()[0]

    def has(self, cid: bytes) -> bool:
        return self._conn().execute("SELECT 1 FROM groups WHERE cid=?", (cid,)).fetchone() is not None

    def missing(self, cids: Sequence[bytes]) -> list[bytes]:
        """The given ids that are not stored, in their order (one indexed query per 500 ids)."""
        held: set[bytes] = set()
        c = self._conn()
        for part in chunked(cids):
            held.update(r[0] for r in c.execute(
                f"SELECT cid FROM groups WHERE cid IN ({placeholders(len(part))})", part))
        return [cid for cid in cids if cid not in held]

    def get(self, cids: Iterable[bytes]) -> list[StoredGroup]:
        c = self._conn()
        out = []
        for cid in cids:
            row = c.execute("SELECT cid, origin, data, received_at_ms FROM groups WHERE cid=?", (cid,)).fetchone()
            if row:
                out.append(self._row(row))
        return out

    def ids_since(self, since_ms: int) -> list[bytes]:
        """Content ids of groups created at or after since_ms (for reconciliation digests)."""
        rows = self._conn().execute("SELECT cid FROM groups WHERE created_at_ms >= ? ORDER BY cid",
                                    (since_ms,)).fetchall()
        return [r[0] for r in rows]

    def count(self, origin: str, tx: Transaction | None = None) -> int:
        """Groups stored from `origin` (kept in memory; inside `tx`, including its changes so far)."""
        return self._per_origin.get(origin, 0) + (tx.count_delta.get(origin, 0) if tx is not None else 0)

    def count_by_origin(self) -> dict[str, int]:
        return dict(self._conn().execute("SELECT origin, COUNT(*) FROM groups GROUP BY origin").fetchall())

    def recent(self, since_ms: int, exclude_origin: str | None = None, limit: int = 10_000) -> list[StoredGroup]:
        """Groups created at or after since_ms, newest first, optionally excluding one origin."""
        q = "SELECT cid, origin, data, received_at_ms FROM groups WHERE created_at_ms >= ?"
        args: list = [since_ms]
        if exclude_origin is not None:
            q += " AND origin != ?"
            args.append(exclude_origin)
        q += " ORDER BY created_at_ms DESC LIMIT ?"
        args.append(limit)
        return [self._row(r) for r in self._conn().execute(q, args).fetchall()]

    def sample(self, n: int, rng: random.Random, since_ms: int, exclude_origin: str | None = None
               ) -> list[StoredGroup]:
        pool = self.recent(since_ms, exclude_origin)
        return rng.sample(pool, min(n, len(pool)))

    @staticmethod
    def _row(row) -> StoredGroup:
        g = pb.RolloutGroup()
        g.ParseFromString(row[2])
        return StoredGroup(cid=row[0], origin=row[1], group=g, received_at_ms=row[3])
