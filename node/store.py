"""RolloutStore: the node's persistent, deduplicated store of rollout groups.

SQLite in WAL mode with synchronous=NORMAL: every committed insert survives a crash of the
process (kill -9); a torn write is rolled back by SQLite, never half-applied. Groups are keyed
by content id (sha256 of their deterministic serialization), so the same group arriving twice
(gossip, reconciliation, replay) is stored once. Bounds, all named and configurable:

- `max_age_s`: groups older than this (by the origin's created_at, clamped to our receive
  time so a sender cannot make a group immortal by dating it in the future) are pruned;
- `per_peer_quota`: at most this many groups per origin; a peer over quota loses its oldest;
- `max_groups`: a global cap; the oldest groups go first, our own last.

Each thread uses its own connection (SQLite objects are not shared across threads).
This module never touches the network or torch.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rollshare.proto import rollout_pb2 as pb

SCHEMA_VERSION = 1


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


class RolloutStore:
    def __init__(self, path: str | os.PathLike, limits: StoreLimits = StoreLimits(), self_origin: str = ""):
        self.path = str(path)
        self.limits = limits
        self.self_origin = self_origin
        self._local = threading.local()
        self._write_lock = threading.Lock()
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
                CREATE INDEX IF NOT EXISTS groups_origin ON groups(origin, created_at_ms);
                CREATE INDEX IF NOT EXISTS groups_created ON groups(created_at_ms);
                """
            )
            row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"rollout store {self.path} has schema {row[0]}, this node expects "
                                   f"{SCHEMA_VERSION}; move it away to start a fresh store")

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = connect_sqlite(self.path)
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # ------------------------------------------------------------------ writes
    def put(self, group: pb.RolloutGroup, origin: str | None = None) -> tuple[bytes, bool]:
        """Store a group. Returns (content id, True if it was new)."""
        return self.put_many([group], origin)[0]

    def put_many(self, groups: Sequence[pb.RolloutGroup], origin: str | None = None) -> list[tuple[bytes, bool]]:
        out = []
        received = now_ms()
        with self._write_lock:
            c = self._conn()
            c.execute("BEGIN IMMEDIATE")
            try:
                for g in groups:
                    data = g.SerializeToString(deterministic=True)
                    cid = hashlib.sha256(data).digest()
                    org = origin if origin is not None else g.origin
                    created = min(int(g.created_at_ms), received)  # no dating into the future
                    cur = c.execute(
                        "INSERT OR IGNORE INTO groups VALUES (?,?,?,?,?,?,?,?)",
                        (cid, org, int(g.round), created, received, g.task.family, len(data), data),
                    )
                    out.append((cid, cur.rowcount == 1))
                    if cur.rowcount == 1:
                        self._enforce_quota(c, org)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return out

    def _enforce_quota(self, c: sqlite3.Connection, origin: str) -> None:
        if origin == self.self_origin:
            return
        n = c.execute("SELECT COUNT(*) FROM groups WHERE origin=?", (origin,)).fetchone()[0]
        if n > self.limits.per_peer_quota:
            c.execute(
                "DELETE FROM groups WHERE cid IN (SELECT cid FROM groups WHERE origin=? "
                "ORDER BY created_at_ms ASC LIMIT ?)", (origin, n - self.limits.per_peer_quota))

    def prune(self, now: int | None = None) -> int:
        """Drop groups past the age limit, then the oldest beyond the global cap."""
        now = now_ms() if now is None else now
        with self._write_lock:
            c = self._conn()
            c.execute("BEGIN IMMEDIATE")
            try:
                n = c.execute("DELETE FROM groups WHERE created_at_ms < ?",
                              (now - int(self.limits.max_age_s * 1000),)).rowcount
                total = c.execute("SELECT COUNT(*) FROM groups").fetchone()[0]
                if total > self.limits.max_groups:
                    n += c.execute(
                        "DELETE FROM groups WHERE cid IN (SELECT cid FROM groups ORDER BY origin = ? ASC, "
                        "created_at_ms ASC LIMIT ?)", (self.self_origin, total - self.limits.max_groups)).rowcount
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return n

    # ------------------------------------------------------------------- reads
    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM groups").fetchone()[0]

    def has(self, cid: bytes) -> bool:
        return self._conn().execute("SELECT 1 FROM groups WHERE cid=?", (cid,)).fetchone() is not None

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
