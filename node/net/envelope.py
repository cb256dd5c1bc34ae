"""Signed envelopes: how rollout groups travel between nodes, and when a receiver accepts one.

An origin signs one `EnvelopeHeader` that lists the content ids (sha256 of the deterministic
serialization) of the groups it covers. Any node may relay any subset of those groups under
the same header, signature and public key; the receiver checks every group against the signed
list, so a relay can drop groups but never add or alter one.

`verify_envelope` treats every inbound byte as hostile. It checks, in this order, and stops at
the first failure with a short machine-friendly reason (`Rejected.reason`, one of `REASONS`)
that a node can count per peer:

    size cap → protobuf parse → header parse → public key (ed25519 only) → origin is the
    key's peer id → expected sender → signature → each group listed in the header →
    per-group schema (origin, task spec regenerable, completion count, text and token caps,
    finite floats) → created_at inside [now - max_age, now + max_future] → replay.

`SeenEnvelopes` is a bounded LRU that turns an exact replay (same header, same groups) into
the reason "replay". `EnvelopeIndex` keeps, beside the RolloutStore (its own two tables in the
store's SQLite file), the header, signature and public key under which each stored group
arrived, so this node can serve the group again verifiably (`envelope_bytes_for`), and the
reconciliation digests of what it can serve.

This module never touches the network or torch, and never trusts a sender's rewards: it only
decides whether bytes are a well-formed, authentic envelope.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from rollshare.net import identity
from rollshare.net import reconcile as rec
from rollshare.net.identity import KeyPair
from rollshare.proto import rollout_pb2 as pb
from rollshare.proto import wire_pb2 as wire
from rollshare.store import (RolloutStore, SerializedGroup, Transaction, chunked, content_id,
                             placeholders)
from rollshare.store import now_ms as _now_ms  # verify_envelope's parameter now_ms shadows the name
from rollshare.tasks import TaskError, TaskSpec, regenerate

#: Domain separation: an envelope signature can never be mistaken for any other signed thing.
SIGNING_DOMAIN = b"rollshare/envelope/v1\n"
CID_BYTES = 32
_ED25519_SIGNATURE_BYTES = 64

# Rejection reasons, in the order verify_envelope checks them.
OVERSIZED = "oversized"
MALFORMED = "malformed"
MALFORMED_HEADER = "malformed_header"
BAD_PUBLIC_KEY = "bad_public_key"
ORIGIN_MISMATCH = "origin_mismatch"
SENDER_MISMATCH = "sender_mismatch"
BAD_SIGNATURE = "bad_signature"
UNLISTED_GROUP = "unlisted_group"
DUPLICATE_GROUP = "duplicate_group"
GROUP_ORIGIN_MISMATCH = "group_origin_mismatch"
FIELD_TOO_LONG = "field_too_long"
BAD_TASK_SPEC = "bad_task_spec"
NO_COMPLETIONS = "no_completions"
TOO_MANY_COMPLETIONS = "too_many_completions"
TEXT_TOO_LONG = "text_too_long"
TOO_MANY_TOKENS = "too_many_tokens"
NON_FINITE = "non_finite"
STALE = "stale"
FUTURE = "future"
REPLAY = "replay"
#: raised by a fetching client, not by verify_envelope: a peer sent a group we did not ask for
UNREQUESTED = "unrequested"
REASONS = (OVERSIZED, MALFORMED, MALFORMED_HEADER, BAD_PUBLIC_KEY, ORIGIN_MISMATCH, SENDER_MISMATCH,
           BAD_SIGNATURE, UNLISTED_GROUP, DUPLICATE_GROUP, GROUP_ORIGIN_MISMATCH, FIELD_TOO_LONG,
           BAD_TASK_SPEC, NO_COMPLETIONS, TOO_MANY_COMPLETIONS, TEXT_TOO_LONG, TOO_MANY_TOKENS,
           NON_FINITE, STALE, FUTURE, REPLAY, UNREQUESTED)


class Rejected(Exception):
    """An inbound envelope that this node refuses. `reason` is one of REASONS; `detail` is for logs."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EnvelopeLimits:
    """What an inbound envelope may contain. Every bound is named here, none hidden in code."""

    max_envelope_bytes: int = 4 * 1024 * 1024  # whole serialized SignedEnvelope
    max_groups: int = 256              # group ids listed in one header
    max_field_chars: int = 256         # origin and policy_id strings
    max_params_json_chars: int = 1024  # TaskSpec.params_json
    #: bound on every number inside params_json: regenerating a spec with max_terms=10**7 would
    #: stall the node (tasks.py has no per-parameter bounds yet)
    max_task_param_abs: int = 10_000
    max_completions: int = 64          # completions per group (at least 1)
    max_text_chars: int = 8192         # per completion
    max_tokens: int = 8192             # Completion.num_tokens
    max_age_s: float = 3600.0          # created_at older than now - max_age: stale
    max_future_s: float = 120.0        # created_at newer than now + max_future: clock skew or lie

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"EnvelopeLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class VerifiedEnvelope:
    """An envelope that passed every check. `groups` holds (content id, group) pairs."""

    envelope_id: bytes                       # sha256 of the signed header bytes
    header: wire.EnvelopeHeader
    groups: tuple[tuple[bytes, pb.RolloutGroup], ...]
    envelope: wire.SignedEnvelope            # as received: relay it (or a subset) unchanged
    #: each group's deterministic serialization (its sha256 is the cid), aligned with `groups`;
    #: empty if not kept (then `serialized` computes it)
    group_bytes: tuple[bytes, ...] = ()

    @property
    def origin(self) -> str:
        return self.header.origin

    @property
    def cids(self) -> list[bytes]:
        return [cid for cid, _ in self.groups]

    @property
    def serialized(self) -> list[SerializedGroup]:
        """The groups as the store takes them: nothing is serialized or hashed again."""
        if len(self.group_bytes) == len(self.groups):
            return [SerializedGroup(cid, data, g) for (cid, g), data in zip(self.groups, self.group_bytes)]
        return [SerializedGroup.of(g) for _, g in self.groups]

    @property
    def replay_key(self) -> bytes:
        """Names this exact delivery: the header plus the set of groups it carries."""
        return _replay_key(self.envelope_id, self.cids)


def envelope_id(envelope: wire.SignedEnvelope) -> bytes:
    """sha256 of the signed header bytes: the envelope's name (also in Announcement.envelope_id)."""
    return hashlib.sha256(envelope.header).digest()


# --------------------------------------------------------------------------------- signing

def make_envelope(keypair: KeyPair, groups: Sequence[pb.RolloutGroup], policy_id: str, round: int,
                  seq: int, created_at_ms: int | None = None) -> wire.SignedEnvelope:
    """Sign a header listing the groups' content ids, and wrap it with the groups and our public key."""
    env = seal([SerializedGroup.of(g) for g in groups], keypair, policy_id, round, seq, created_at_ms)
    env.groups.extend(groups)
    return env


def seal(items: Sequence[SerializedGroup], keypair: KeyPair, policy_id: str, round: int, seq: int,
         created_at_ms: int | None = None) -> wire.SignedEnvelope:
    """The signed part of an envelope for these groups: header, signature, public key, no groups.

    What a node publishing its own groups records (`EnvelopeIndex.put_own`); add groups to send it.
    """
    public_key = keypair.public_key.serialize()
    if not identity.is_ed25519_public_key(public_key):
        raise ValueError("envelopes are signed with ed25519 keys; load the node identity with "
                         "rollshare.net.identity.load_or_create_identity")
    if not items:
        raise ValueError("an envelope covers at least one group")
    origin = identity.peer_id_of(keypair)
    for it in items:
        if it.group.origin != origin:
            raise ValueError(f"group origin {it.group.origin!r} is not the signer {origin}; set "
                             "RolloutGroup.origin to the node's peer id before signing")
    cids = [it.cid for it in items]
    if len(set(cids)) != len(cids):
        raise ValueError("the same group appears twice in one envelope")
    header = wire.EnvelopeHeader(
        origin=origin, policy_id=policy_id, round=round,
        created_at_ms=_now_ms() if created_at_ms is None else created_at_ms,
        group_ids=cids, seq=seq,
    ).SerializeToString(deterministic=True)
    return wire.SignedEnvelope(header=header, signature=identity.sign(keypair, SIGNING_DOMAIN + header),
                               public_key=public_key)


# ------------------------------------------------------------------------------ verification

def verify_envelope(envelope: bytes | wire.SignedEnvelope, limits: EnvelopeLimits = EnvelopeLimits(),
                    expected_sender: str | None = None, *, now_ms: int | None = None,
                    seen: "SeenEnvelopes | None" = None) -> VerifiedEnvelope:
    """Accept an inbound envelope or raise Rejected (see the module doc for the order of checks).

    expected_sender: the peer id the envelope must come from (e.g. the signed sender of a gossip
    message), or None when any origin may be relayed to us (fetch, reconciliation).
    seen: if given, an exact replay of an envelope accepted before is rejected ("replay");
    only envelopes that pass every other check are remembered.
    """
    now = _now_ms() if now_ms is None else now_ms

    # 1. size, before any parsing
    if isinstance(envelope, (bytes, bytearray, memoryview)):
        size = len(envelope)
    elif isinstance(envelope, wire.SignedEnvelope):
        size = envelope.ByteSize()
    else:
        raise TypeError(f"verify_envelope takes bytes or a SignedEnvelope, not {type(envelope).__name__}")
    if size > limits.max_envelope_bytes:
        raise Rejected(OVERSIZED, f"{size} bytes > {limits.max_envelope_bytes}")

    # 2. protobuf parse
    if isinstance(envelope, wire.SignedEnvelope):
        env = envelope
    else:
        try:
            env = wire.SignedEnvelope.FromString(bytes(envelope))
        except Exception as e:  # DecodeError, or anything else the parser throws at garbage
            raise Rejected(MALFORMED, f"not a SignedEnvelope: {type(e).__name__}") from None

    # 3. header parse and shape
    try:
        header = wire.EnvelopeHeader.FromString(env.header)
    except Exception as e:
        raise Rejected(MALFORMED_HEADER, f"not an EnvelopeHeader: {type(e).__name__}") from None
    _check_header(header, limits)

    # 4. public key
    if not identity.is_ed25519_public_key(env.public_key):
        raise Rejected(BAD_PUBLIC_KEY, f"not a libp2p ed25519 public key ({len(env.public_key)} bytes)")
    try:
        derived = identity.peer_id_from_public_key(env.public_key)
    except ValueError as e:
        raise Rejected(BAD_PUBLIC_KEY, str(e)) from None

    # 5. origin is the peer id of that key; and it is who we expected
    if header.origin != derived:
        raise Rejected(ORIGIN_MISMATCH, f"header says {header.origin[:64]!r}, key is {derived}")
    if expected_sender is not None and header.origin != expected_sender:
        raise Rejected(SENDER_MISMATCH, f"envelope from {header.origin}, expected {expected_sender}")

    # 6. signature over domain || header bytes
    if (len(env.signature) != _ED25519_SIGNATURE_BYTES
            or not identity.verify_signature(env.public_key, SIGNING_DOMAIN + env.header, env.signature)):
        raise Rejected(BAD_SIGNATURE, f"signature does not match the header of {header.origin}")

    # 7. every group is one the origin signed, each at most once (its deterministic serialization
    #    is kept: the store takes it as it is)
    listed = set(header.group_ids)
    groups: list[tuple[bytes, pb.RolloutGroup]] = []
    group_bytes: list[bytes] = []
    seen_here: set[bytes] = set()
    for g in env.groups:
        data = g.SerializeToString(deterministic=True)
        cid = hashlib.sha256(data).digest()
        if cid not in listed:
            raise Rejected(UNLISTED_GROUP, f"group {cid.hex()[:16]} is not in the signed header")
        if cid in seen_here:
            raise Rejected(DUPLICATE_GROUP, f"group {cid.hex()[:16]} appears twice")
        seen_here.add(cid)
        groups.append((cid, g))
        group_bytes.append(data)

    # 8. per-group schema
    for cid, g in groups:
        _check_group(cid, g, header.origin, limits)

    # 9. time window (header and each group)
    for what, created in [("envelope", header.created_at_ms)] + [
            (f"group {cid.hex()[:16]}", g.created_at_ms) for cid, g in groups]:
        if created < now - int(limits.max_age_s * 1000):
            raise Rejected(STALE, f"{what} created {(now - created) / 1000:.0f} s ago (max {limits.max_age_s:.0f} s)")
        if created > now + int(limits.max_future_s * 1000):
            raise Rejected(FUTURE, f"{what} dated {(created - now) / 1000:.0f} s in the future "
                                   f"(max {limits.max_future_s:.0f} s)")

    verified = VerifiedEnvelope(envelope_id=hashlib.sha256(env.header).digest(), header=header,
                                groups=tuple(groups), envelope=env, group_bytes=tuple(group_bytes))
    # 10. exact replay
    if seen is not None and not seen.add(verified):
        raise Rejected(REPLAY, f"envelope {verified.envelope_id.hex()[:16]} with these groups was seen before")
    return verified


def _check_header(h: wire.EnvelopeHeader, limits: EnvelopeLimits) -> None:
    if not h.origin or len(h.origin) > limits.max_field_chars:
        raise Rejected(MALFORMED_HEADER, f"origin has {len(h.origin)} characters")
    if len(h.policy_id) > limits.max_field_chars:
        raise Rejected(MALFORMED_HEADER, f"policy_id has {len(h.policy_id)} characters")
    n = len(h.group_ids)
    if not 1 <= n <= limits.max_groups:
        raise Rejected(MALFORMED_HEADER, f"header lists {n} groups (allowed 1..{limits.max_groups})")
    if any(len(cid) != CID_BYTES for cid in h.group_ids):
        raise Rejected(MALFORMED_HEADER, f"a group id is not {CID_BYTES} bytes")
    if len(set(h.group_ids)) != n:
        raise Rejected(MALFORMED_HEADER, "header lists a group id twice")


def _check_group(cid: bytes, g: pb.RolloutGroup, origin: str, limits: EnvelopeLimits) -> None:
    name = cid.hex()[:16]
    if g.origin != origin:
        raise Rejected(GROUP_ORIGIN_MISMATCH, f"group {name} claims origin {g.origin[:64]!r}, signer is {origin}")
    if len(g.policy_id) > limits.max_field_chars:
        raise Rejected(FIELD_TOO_LONG, f"group {name} policy_id has {len(g.policy_id)} characters")
    _check_task_spec(name, g.task, limits)
    n = len(g.completions)
    if n == 0:
        raise Rejected(NO_COMPLETIONS, f"group {name} has no completions")
    if n > limits.max_completions:
        raise Rejected(TOO_MANY_COMPLETIONS, f"group {name} has {n} completions (max {limits.max_completions})")
    for c in g.completions:
        if len(c.text) > limits.max_text_chars:
            raise Rejected(TEXT_TOO_LONG, f"group {name} has a completion of {len(c.text)} characters "
                                          f"(max {limits.max_text_chars})")
        if c.num_tokens > limits.max_tokens:
            raise Rejected(TOO_MANY_TOKENS, f"group {name} claims {c.num_tokens} tokens (max {limits.max_tokens})")
        if not (math.isfinite(c.reward) and math.isfinite(c.logprob_sum)):
            raise Rejected(NON_FINITE, f"group {name} has a non-finite reward or log-prob")


def _check_task_spec(name: str, t: pb.TaskSpec, limits: EnvelopeLimits) -> None:
    if len(t.family) > limits.max_field_chars or len(t.style) > limits.max_field_chars:
        raise Rejected(BAD_TASK_SPEC, f"group {name} task family/style too long")
    if len(t.params_json) > limits.max_params_json_chars:
        raise Rejected(BAD_TASK_SPEC, f"group {name} task params are {len(t.params_json)} characters "
                                      f"(max {limits.max_params_json_chars})")
    try:
        spec = TaskSpec.from_json(t.family, t.params_json, t.seed, t.index, t.style)
        if not _numbers_within(dict(spec.params), limits.max_task_param_abs):
            raise TaskError(f"a task parameter is not a finite number within ±{limits.max_task_param_abs}")
        regenerate(spec)
    except TaskError as e:
        raise Rejected(BAD_TASK_SPEC, f"group {name}: {e}") from None
    except Exception as e:  # hostile params can trip anything below (hashing, generators)
        raise Rejected(BAD_TASK_SPEC, f"group {name}: {type(e).__name__}") from None


def _numbers_within(value: Any, bound: int) -> bool:
    """True if every number inside a JSON-like value is finite and within ±bound (bools pass)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= bound
    if isinstance(value, int):
        return abs(value) <= bound
    if isinstance(value, dict):
        return all(_numbers_within(v, bound) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_numbers_within(v, bound) for v in value)
    return False


# ------------------------------------------------------------------------------------ replay

def _replay_key(env_id: bytes, cids: Iterable[bytes]) -> bytes:
    h = hashlib.sha256(env_id)
    for cid in sorted(cids):
        h.update(cid)
    return h.digest()


class SeenEnvelopes:
    """A bounded LRU of accepted deliveries, to reject exact replays.

    The key is the envelope id (sha256 of the header) together with the set of groups carried:
    a relay of a *different* subset of the same envelope is new information, not a replay.
    """

    def __init__(self, capacity: int = 100_000):
        if capacity < 1:
            raise ValueError(f"SeenEnvelopes capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, verified: VerifiedEnvelope) -> bool:
        return verified.replay_key in self._keys

    def add(self, verified: VerifiedEnvelope) -> bool:
        """Remember a delivery. Returns False if it was already remembered (a replay)."""
        key = verified.replay_key
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True


# ------------------------------------------------------------------------------ store index

#: granularity of the reconciliation digests an EnvelopeIndex keeps in memory: a request whose
#: since_ms and bucket_ms are multiples of it is answered from them (the service aligns its own)
DIGEST_BUCKET_MS = 1000

_MIN_MS = -2**63
_RELAYABLE = ("SELECT g.cid, g.created_at_ms FROM groups g JOIN group_envelope e ON e.cid = g.cid "
              "WHERE g.created_at_ms >= ?")
#: detail requests naming more buckets than this are answered by one scan of the window
_MAX_RANGE_QUERIES = 64


class EnvelopeIndex:
    """Remembers under which signed envelope each stored group arrived, so we can relay it.

    Two tables in the RolloutStore's SQLite file: envelopes(envelope_id, header, signature,
    public_key, origin, created_at_ms) and group_envelope(cid, envelope_id). The first envelope
    recorded for a group wins. Writes share the store's transactions: a batch of verified
    envelopes commits with its groups in one transaction (`put_verified_many`), and so do our own
    groups with their envelope (`put_own`).

    A group is *relayable* when it is stored and linked to an envelope. `envelope_bytes_for`
    serves relayable groups from their stored bytes (nothing is parsed or encoded again);
    `entries_since` lists them. Of our own groups (never evicted by our quota) only the newest
    `per_peer_quota` stay relayable, the ones a peer's quota keeps: offering older ones would
    make every reconciliation with us find groups the peer must evict again at once. For reconciliation the index keeps, in memory, a digest (count,
    xor of id prefixes) per second of created_at over the relayable groups: read once, then
    only the seconds that a write touched are read again (the store reports, after each commit,
    the created_at of every group added or removed). An exchange so costs O(seconds in the window
    + groups in the seconds that changed), not O(groups stored). Writes made to the file by
    anything else than this store and index are not seen until the node restarts.

    Call `prune()` after `RolloutStore.prune()` to forget envelopes of groups that are gone.
    """

    def __init__(self, store: RolloutStore):
        self.store = store
        self.path = store.path
        self.store.connection().executescript(
            """
            CREATE TABLE IF NOT EXISTS envelopes (
                envelope_id BLOB PRIMARY KEY,
                header BLOB NOT NULL,
                signature BLOB NOT NULL,
                public_key BLOB NOT NULL,
                origin TEXT NOT NULL,
                created_at_ms INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS group_envelope (
                cid BLOB PRIMARY KEY,
                envelope_id BLOB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS group_envelope_env ON group_envelope(envelope_id);
            -- relayable groups by created_at: digests of the seconds that changed, and the ids of
            -- differing buckets, are read from this index alone
            CREATE INDEX IF NOT EXISTS groups_created_cid ON groups(created_at_ms, cid);
            """
        )
        self._digests: dict[int, rec.Digest] = {}  # second (ms) -> digest of the relayable groups created in it
        self._dirty: set[int] | None = None        # seconds to read again; None: all (not read yet)
        self._dirty_lock = threading.Lock()
        self._refresh_lock = threading.Lock()      # one reader of SQLite into _digests at a time
        #: no own group created before this is relayable (a lower bound; it spares retiring a
        #: scan of the groups retired before)
        self._own_floor = _MIN_MS
        store.add_listener(self._touched)

    def _conn(self) -> sqlite3.Connection:
        return self.store.connection()

    def close(self) -> None:
        """Close the calling thread's connection (shared with the store; another call reopens it)."""
        self.store.close()

    # ------------------------------------------------------------------ writes
    def record(self, envelope: VerifiedEnvelope | wire.SignedEnvelope) -> None:
        """Remember the envelope of every group it carries.

        Pass a SignedEnvelope only for one this node made itself (make_envelope); anything
        received must go through verify_envelope first.
        """
        if isinstance(envelope, VerifiedEnvelope):
            env, header, cids = envelope.envelope, envelope.header, envelope.cids
        else:
            env, header = envelope, wire.EnvelopeHeader.FromString(envelope.header)
            cids = [content_id(g) for g in envelope.groups]
        with self._writing() as tx:
            touched = self._link(tx, env, header, cids)
        self._touched(touched)

    def put_verified(self, verified: VerifiedEnvelope) -> list[tuple[bytes, bool]]:
        """Store a verified envelope's groups and record the envelope. Returns the store's (cid, is_new) pairs."""
        return self.put_verified_many([verified])[0]

    def put_verified_many(self, verified: Sequence[VerifiedEnvelope]) -> list[list[tuple[bytes, bool]]]:
        """Store the groups of several verified envelopes and record the envelopes, in one transaction.

        Returns the store's (cid, is_new) pairs per envelope.
        """
        with self._writing() as tx:
            results = [self.store.put_serialized(v.serialized, origin=v.origin, tx=tx) for v in verified]
            touched = [t for v in verified for t in self._link(tx, v.envelope, v.header, v.cids)]
        self._touched(touched)
        return results

    def put_own(self, sealed: wire.SignedEnvelope, items: Sequence[SerializedGroup]) -> list[tuple[bytes, bool]]:
        """Store our own groups with the envelope that signs them (`seal`), in one transaction."""
        header = wire.EnvelopeHeader.FromString(sealed.header)
        with self._writing() as tx:
            results = self.store.put_serialized(items, origin=header.origin, tx=tx)
            touched = self._link(tx, sealed, header, [it.cid for it in items])
        self._touched(touched)
        return results

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Transaction]:
        """A store transaction; if it fails, what the index remembers about it is dropped too."""
        try:
            with self.store.transaction() as tx:
                yield tx
        except BaseException:
            self._own_floor = _MIN_MS
            raise

    def _link(self, tx: Transaction, env: wire.SignedEnvelope, header: wire.EnvelopeHeader, cids: Sequence[bytes]
              ) -> list[int]:
        """Insert the envelope and its group links; created_at of the groups whose relayability changed."""
        c = tx.conn
        eid = hashlib.sha256(env.header).digest()
        c.execute("INSERT OR IGNORE INTO envelopes VALUES (?,?,?,?,?,?)",
                  (eid, env.header, env.signature, env.public_key, header.origin, header.created_at_ms))
        touched = []
        for cid in cids:
            if c.execute("INSERT OR IGNORE INTO group_envelope VALUES (?,?)", (cid, eid)).rowcount == 1:
                row = c.execute("SELECT created_at_ms FROM groups WHERE cid=?", (cid,)).fetchone()
                if row is not None:
                    touched.append(row[0])
        if header.origin == self.store.self_origin:
            self._own_floor = min([self._own_floor, *touched])
            touched += self._retire_own(tx)
        return touched

    def _retire_own(self, tx: Transaction) -> list[int]:
        """Unlink our own groups beyond the newest per_peer_quota ((created_at, cid) order, the
        order in which a peer's quota evicts them); created_at of those unlinked."""
        own, quota = self.store.self_origin, self.store.limits.per_peer_quota
        if self.store.count(own, tx) <= quota:
            return []
        c = tx.conn
        # the newest own group beyond the quota: it and everything older is retired
        boundary = c.execute("SELECT created_at_ms, cid FROM groups WHERE origin=? "
                             "ORDER BY created_at_ms DESC, cid DESC LIMIT 1 OFFSET ?", (own, quota)).fetchone()
        if boundary is None:
            return []
        created, cid = boundary
        rows = c.execute(
            "SELECT g.cid, g.created_at_ms FROM groups g JOIN group_envelope e ON e.cid = g.cid "
            "WHERE g.origin = ? AND g.created_at_ms >= ? AND (g.created_at_ms < ? OR g.created_at_ms = ? AND g.cid <= ?)",
            (own, self._own_floor, created, created, cid)).fetchall()
        c.executemany("DELETE FROM group_envelope WHERE cid=?", [(r[0],) for r in rows])
        self._own_floor = created
        return [r[1] for r in rows]

    def prune(self) -> int:
        """Forget envelopes of groups the store no longer holds. Returns group links removed."""
        with self.store.transaction() as tx:
            n = tx.conn.execute("DELETE FROM group_envelope WHERE cid NOT IN (SELECT cid FROM groups)").rowcount
            tx.conn.execute("DELETE FROM envelopes WHERE envelope_id NOT IN "
                            "(SELECT DISTINCT envelope_id FROM group_envelope)")
        return n

    # ------------------------------------------------------------------- reads
    def has(self, cid: bytes) -> bool:
        return self._conn().execute("SELECT 1 FROM group_envelope WHERE cid=?", (cid,)).fetchone() is not None

    def envelope_bytes_for(self, cids: Iterable[bytes], max_bytes: int = EnvelopeLimits.max_envelope_bytes
                           ) -> list[bytes]:
        """Serialized signed envelopes carrying the requested groups that we store and can relay.

        Built from the stored header, signature, public key and group bytes. Groups are gathered
        under their original envelope (in the order they were asked for); an envelope whose
        groups would pass max_bytes is split into several (same header and signature, disjoint
        subsets), each of which a receiver verifies on its own. Unknown ids are skipped.
        """
        wanted = list(dict.fromkeys(cids))
        position = {cid: i for i, cid in enumerate(wanted)}
        c = self._conn()
        by_env: dict[bytes, list[tuple[int, bytes]]] = {}  # envelope id -> (position asked, group bytes)
        for part in chunked(wanted):
            for cid, eid, data in c.execute(
                    "SELECT e.cid, e.envelope_id, g.data FROM group_envelope e JOIN groups g ON g.cid = e.cid "
                    f"WHERE e.cid IN ({placeholders(len(part))})", part):
                by_env.setdefault(eid, []).append((position[cid], data))
        heads: dict[bytes, bytes] = {}  # envelope id -> its fields 1-3, encoded
        for part in chunked(list(by_env)):
            for eid, header, signature, public_key in c.execute(
                    "SELECT envelope_id, header, signature, public_key FROM envelopes "
                    f"WHERE envelope_id IN ({placeholders(len(part))})", part):
                heads[eid] = _field(1, header) + _field(2, signature) + _field(3, public_key)
        out: list[bytes] = []
        for eid, groups in sorted(by_env.items(), key=lambda kv: min(p for p, _ in kv[1])):
            head = heads.get(eid)
            if head is None:
                continue
            groups.sort()
            fields: list[bytes] = []
            size = len(head)
            for _, data in groups:
                f = _field(4, data)
                if fields and size + len(f) > max_bytes:
                    out.append(head + b"".join(fields))
                    fields, size = [], len(head)
                fields.append(f)
                size += len(f)
            if fields:
                out.append(head + b"".join(fields))
        return out

    def envelopes_for(self, cids: Iterable[bytes], max_bytes: int = EnvelopeLimits.max_envelope_bytes
                      ) -> list[wire.SignedEnvelope]:
        """`envelope_bytes_for`, parsed."""
        return [wire.SignedEnvelope.FromString(b) for b in self.envelope_bytes_for(cids, max_bytes)]

    def entries_since(self, since_ms: int) -> list[tuple[bytes, int]]:
        """(cid, created_at_ms) of stored groups we can relay, created at or after since_ms.

        What this node offers in reconciliation: exactly what Fetch can serve.
        """
        return self._conn().execute(_RELAYABLE, (since_ms,)).fetchall()

    def _entries_between(self, lo_ms: int, hi_ms: int) -> list[tuple[bytes, int]]:
        return self._conn().execute(_RELAYABLE + " AND g.created_at_ms < ?", (lo_ms, hi_ms)).fetchall()

    def digests(self, since_ms: int, bucket_ms: int) -> dict[int, rec.Digest]:
        """reconcile.digests over `entries_since(since_ms)`, from the digests kept in memory when
        since_ms and bucket_ms are multiples of DIGEST_BUCKET_MS (else by a scan of the window)."""
        if bucket_ms <= 0 or since_ms % DIGEST_BUCKET_MS or bucket_ms % DIGEST_BUCKET_MS:
            return rec.digests(self.entries_since(since_ms), since_ms, bucket_ms)
        with self._refresh_lock:
            self._refresh()
            seconds = [(s, d) for s, d in self._digests.items() if s >= since_ms]
        out: dict[int, rec.Digest] = {}
        for second, (n, x) in seconds:
            start = since_ms + (second - since_ms) // bucket_ms * bucket_ms
            count, xor = out.get(start, (0, 0))
            out[start] = (count + n, xor ^ x)
        return out

    def entries_in(self, since_ms: int, bucket_ms: int, starts: Iterable[int]) -> list[tuple[bytes, int]]:
        """The relayable entries in the given buckets of [since_ms, ...) (reconcile.ids_in_buckets)."""
        starts = sorted({s for s in starts if s >= since_ms and (s - since_ms) % bucket_ms == 0})
        if len(starts) > _MAX_RANGE_QUERIES:
            return list(rec.ids_in_buckets(self.entries_since(since_ms), starts, since_ms, bucket_ms).items())
        out: list[tuple[bytes, int]] = []
        for lo, hi in _runs(starts, bucket_ms):
            out += self._entries_between(lo, hi)
        return out

    def _touched(self, created: Iterable[int]) -> None:
        """Store listener: groups created at these times were added, removed or linked."""
        with self._dirty_lock:
            if self._dirty is not None:
                self._dirty.update(t - t % DIGEST_BUCKET_MS for t in created)

    def _refresh(self) -> None:
        """Bring the per-second digests up to date (caller holds _refresh_lock)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        try:
            if dirty is None:
                self._digests = _second_digests(self.entries_since(_MIN_MS))
                return
            for lo, hi in _runs(sorted(dirty), DIGEST_BUCKET_MS):
                fresh = _second_digests(self._entries_between(lo, hi))
                for second in range(lo, hi, DIGEST_BUCKET_MS):
                    if second in fresh:
                        self._digests[second] = fresh[second]
                    else:
                        self._digests.pop(second, None)
        except BaseException:
            with self._dirty_lock:  # read them again next time
                self._dirty = None if dirty is None or self._dirty is None else self._dirty | dirty
            raise


def _second_digests(entries: Iterable[tuple[bytes, int]]) -> dict[int, rec.Digest]:
    out: dict[int, rec.Digest] = {}
    for cid, created in entries:
        second = created - created % DIGEST_BUCKET_MS
        count, xor = out.get(second, (0, 0))
        out[second] = (count + 1, xor ^ rec.id_prefix(cid))
    return out


def _runs(starts: Sequence[int], step: int) -> list[tuple[int, int]]:
    """Sorted bucket starts as [lo, hi) ranges, adjacent buckets merged."""
    out: list[tuple[int, int]] = []
    for s in starts:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + step)
        else:
            out.append((s, s + step))
    return out


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field (tag, length, bytes)."""
    return _encode_varint((number << 3) | 2) + _encode_varint(len(data)) + data


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
