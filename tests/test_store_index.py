"""The store and the envelope index without O(store) work: one transaction per batch, per-origin
counts in memory, reconciliation digests kept per second, serving from stored bytes, and our own
groups offered only as far as a peer's quota keeps them."""

from __future__ import annotations

import random

import pytest

from rollshare.net import envelope as E
from rollshare.net import reconcile as R
from rollshare.net.identity import keygen, peer_id_of
from rollshare.net.service import _merge_announcements, _SeqCounter
from rollshare.proto import rollout_pb2 as pb
from rollshare.proto import wire_pb2 as wire
from rollshare.store import RolloutStore, SerializedGroup, StoreLimits, content_id, now_ms


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return keygen(d / "alice.key"), keygen(d / "bob.key")


def group(origin: str, index: int, created_at_ms: int) -> pb.RolloutGroup:
    return pb.RolloutGroup(
        task=pb.TaskSpec(family="chain_sum", params_json="{}", seed=1, index=index, style="compact"),
        completions=[pb.Completion(text=str(index), num_tokens=2)], policy_id="tiny@0", round=1,
        created_at_ms=created_at_ms, origin=origin)


def verified(kp, groups, seq=1) -> E.VerifiedEnvelope:
    return E.verify_envelope(E.make_envelope(kp, groups, "tiny@0", 1, seq).SerializeToString())


def scan_digests(index: E.EnvelopeIndex, since: int, bucket: int) -> dict:
    return R.digests(index.entries_since(since), since, bucket)


def test_kept_digests_equal_a_full_scan_through_inserts_evictions_and_prunes(keys, tmp_path):
    alice, bob = keys
    a = peer_id_of(alice)
    store = RolloutStore(tmp_path / "s.db", StoreLimits(max_age_s=600, per_peer_quota=40), self_origin=peer_id_of(bob))
    index = E.EnvelopeIndex(store)
    rng = random.Random(1)
    t0 = now_ms() - 500_000
    since = t0 - t0 % 10_000
    assert index.digests(since, 10_000) == {}
    pruned = 0
    for seq in range(1, 30):
        groups = [group(a, seq * 10 + k, t0 + rng.randrange(0, 480_000)) for k in range(rng.randrange(1, 5))]
        index.put_verified(verified(alice, groups, seq))  # beyond 40 groups the quota evicts the oldest
        if seq % 7 == 0:
            pruned += store.prune(now=t0 + 600_000 + seq * 10_000)  # age limit: the oldest go
        for s, b in [(since, 10_000), (since, 1_000), (since + 60_000, 30_000)]:
            assert index.digests(s, b) == scan_digests(index, s, b)
    assert pruned and store.count_by_origin()[a] == store.count(a) <= 40
    # a since or bucket that is not whole seconds falls back to the scan
    assert index.digests(since + 1, 1_500) == scan_digests(index, since + 1, 1_500)
    # a fresh index on the same file reads the same digests
    assert E.EnvelopeIndex(RolloutStore(tmp_path / "s.db")).digests(since, 10_000) == index.digests(since, 10_000)


def test_entries_in_lists_exactly_the_entries_of_the_given_buckets(keys, tmp_path):
    alice, _ = keys
    a = peer_id_of(alice)
    index = E.EnvelopeIndex(RolloutStore(tmp_path / "s.db"))
    t0 = now_ms() - 100_000
    index.put_verified(verified(alice, [group(a, i, t0 + i * 1700) for i in range(40)]))
    since, bucket = t0 - t0 % 5000, 5000
    entries = index.entries_since(since)
    starts = [since, since + 15_000, since + 20_000, since + 7]  # the last is not a bucket start: ignored
    assert sorted(index.entries_in(since, bucket, starts)) == sorted(
        R.ids_in_buckets(entries, starts, since, bucket).items())
    many = [since + k * 1000 for k in range(100)]  # beyond the range-query limit: one scan
    assert sorted(index.entries_in(since, 1000, many)) == sorted(R.ids_in_buckets(entries, many, since, 1000).items())


def test_reconcile_respond_answers_from_an_index_as_from_its_entries(keys, tmp_path):
    alice, _ = keys
    a = peer_id_of(alice)
    t0 = now_ms() - 60_000
    ours = E.EnvelopeIndex(RolloutStore(tmp_path / "ours.db"))
    theirs = E.EnvelopeIndex(RolloutStore(tmp_path / "theirs.db"))
    ours.put_verified(verified(alice, [group(a, i, t0 + i * 900) for i in range(30)], 1))
    theirs.put_verified(verified(alice, [group(a, i, t0 + i * 900) for i in range(5, 40)], 2))
    since = t0 - t0 % 10_000
    req1 = wire.ReconcileRequest(since_ms=since, bucket_ms=10_000, buckets=R.to_proto(ours.digests(since, 10_000)))
    assert R.respond(req1, theirs) == R.respond(req1, theirs.entries_since(since))
    starts = list(R.respond(req1, theirs).differing_starts)
    have = R.source_ids_in(ours, starts, since, 10_000)
    req2 = wire.ReconcileRequest(since_ms=since, bucket_ms=10_000, have_ids=list(have), detail_starts=starts)
    missing = R.respond(req2, theirs).missing_ids
    assert missing == R.respond(req2, theirs.entries_since(since)).missing_ids
    assert set(missing) == {content_id(group(a, i, t0 + i * 900)) for i in range(30, 40)}


def test_envelope_bytes_are_built_from_stored_bytes_and_verify(keys, tmp_path):
    alice, _ = keys
    a = peer_id_of(alice)
    index = E.EnvelopeIndex(RolloutStore(tmp_path / "s.db"))
    groups = [group(a, i, now_ms()) for i in range(6)]
    v = verified(alice, groups)
    index.put_verified(v)
    want = [content_id(groups[i]) for i in (5, 1, 3)]
    (raw,) = index.envelope_bytes_for(want + [b"\x00" * 32])
    assert raw == index.envelopes_for(want)[0].SerializeToString()
    again = E.verify_envelope(raw)
    assert again.cids == want and again.envelope_id == v.envelope_id
    assert list(again.group_bytes) == [g.SerializeToString(deterministic=True) for g in (groups[5], groups[1], groups[3])]


def test_a_batch_of_envelopes_is_one_transaction_and_nothing_is_serialized_twice(keys, tmp_path, monkeypatch):
    alice, bob = keys
    store = RolloutStore(tmp_path / "s.db")
    index = E.EnvelopeIndex(store)
    vs = [verified(kp, [group(peer_id_of(kp), i, now_ms())], seq=i) for i, kp in enumerate([alice, bob, alice], 1)]
    commits = []
    store.add_listener(commits.append)
    monkeypatch.setattr(SerializedGroup, "of", classmethod(lambda cls, g: pytest.fail("serialized again")))
    results = index.put_verified_many(vs)
    assert [[new for _, new in r] for r in results] == [[True], [True], [True]]
    assert len(commits) == 1 and len(commits[0]) == 3
    assert store.count_by_origin() == {peer_id_of(alice): 2, peer_id_of(bob): 1}


def test_quota_evicts_the_oldest_with_ties_broken_by_content_id(tmp_path):
    store = RolloutStore(tmp_path / "s.db", StoreLimits(per_peer_quota=3))
    t = now_ms()
    groups = [group("peerA", i, t) for i in range(6)]  # all created in the same millisecond
    store.put_many(groups)
    kept = sorted(content_id(g) for g in groups)[3:]
    assert sorted(store.ids_since(0)) == kept and store.count("peerA") == 3


def test_own_groups_beyond_the_quota_are_not_offered_so_origin_and_peers_agree(keys, tmp_path):
    alice, bob = keys
    a = peer_id_of(alice)
    limits = StoreLimits(per_peer_quota=10)
    origin = E.EnvelopeIndex(RolloutStore(tmp_path / "a.db", limits, self_origin=a))
    peer = E.EnvelopeIndex(RolloutStore(tmp_path / "b.db", limits, self_origin=peer_id_of(bob)))
    t0 = now_ms() - 60_000
    for batch in range(6):  # four groups per envelope, created in the same millisecond
        items = [SerializedGroup.of(group(a, batch * 4 + k, t0 + batch * 1000)) for k in range(4)]
        origin.put_own(E.seal(items, alice, "tiny@0", 1, batch + 1), items)
        peer.put_verified(verified(alice, [it.group for it in items], batch + 1))
    assert len(origin.store) == 24 and len(peer.store) == 10   # we keep all our own groups
    assert sorted(origin.entries_since(0)) == sorted(peer.entries_since(0))
    since = t0 - t0 % 10_000 - 10_000
    assert origin.digests(since, 10_000) == peer.digests(since, 10_000) == scan_digests(origin, since, 10_000)


def test_sequence_numbers_keep_increasing_across_restarts(tmp_path):
    seq = _SeqCounter(str(tmp_path / "s.db"), "me", block=4)
    first = [seq.next() for _ in range(6)]
    seq.close()
    seq = _SeqCounter(str(tmp_path / "s.db"), "me", block=4)
    later = seq.next()
    seq.close()
    assert first == [1, 2, 3, 4, 5, 6] and later > 6


def test_queued_announcements_merge_up_to_the_group_limit():
    anns = [wire.Announcement(origin="me", envelope_id=bytes([i]) * 32, group_ids=[bytes([i, k]) * 16 for k in range(3)],
                              sizes=[10, 20, 30], grpc_endpoint="127.0.0.1:1", round=i, created_at_ms=i)
            for i in range(5)]
    merged = _merge_announcements(anns, max_groups=7)
    assert [len(m.group_ids) for m in merged] == [6, 6, 3]
    assert merged[0].envelope_id == anns[1].envelope_id and list(merged[0].sizes) == [10, 20, 30] * 2
    assert [len(a.group_ids) for a in anns] == [3] * 5  # the queued ones are left as they were
