"""Signed envelopes: sign/verify, every rejection reason, relay of subsets, replay, store index;
and the pure reconciliation functions."""

from __future__ import annotations

import hashlib
import math

import pytest

from rollshare.net import envelope as E
from rollshare.net import reconcile as R
from rollshare.net.identity import keygen, peer_id_of
from rollshare.proto import rollout_pb2 as pb
from rollshare.proto import wire_pb2 as wire
from rollshare.store import RolloutStore, StoreLimits, content_id, now_ms


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return keygen(d / "alice.key"), keygen(d / "mallory.key")


def group(origin: str, index: int = 5, created_at_ms: int | None = None, text: str = "57",
          family: str = "chain_sum", params_json: str = "{}", n: int = 2) -> pb.RolloutGroup:
    return pb.RolloutGroup(
        task=pb.TaskSpec(family=family, params_json=params_json, seed=1, index=index, style="compact"),
        completions=[pb.Completion(text=text, num_tokens=3, reward=1.0, logprob_sum=-1.5, has_logprob=True)
                     for _ in range(n)],
        policy_id="tiny@0", round=1, created_at_ms=now_ms() if created_at_ms is None else created_at_ms,
        origin=origin)


def signed(kp, groups, **kw) -> wire.SignedEnvelope:
    return E.make_envelope(kp, groups, policy_id="tiny@0", round=1, seq=1, **kw)


def reason(data, limits=E.EnvelopeLimits(), **kw) -> str:
    with pytest.raises(E.Rejected) as e:
        E.verify_envelope(data, limits, **kw)
    assert e.value.reason in E.REASONS
    return e.value.reason


# ----------------------------------------------------------------------------- sign / verify

def test_signed_envelope_verifies_from_bytes_and_message(keys):
    alice, _ = keys
    a = peer_id_of(alice)
    groups = [group(a, index=i) for i in range(3)]
    env = signed(alice, groups)
    for data in (env.SerializeToString(), env):
        v = E.verify_envelope(data, expected_sender=a)
        assert v.origin == a
        assert v.cids == [content_id(g) for g in groups]
        assert v.envelope_id == hashlib.sha256(env.header).digest() == E.envelope_id(env)
        assert list(v.header.group_ids) == v.cids


def test_relay_of_a_subset_of_groups_still_verifies(keys):
    alice, _ = keys
    a = peer_id_of(alice)
    groups = [group(a, index=i) for i in range(4)]
    env = signed(alice, groups)
    relay = wire.SignedEnvelope(header=env.header, signature=env.signature, public_key=env.public_key,
                                groups=[groups[3], groups[1]])
    v = E.verify_envelope(relay.SerializeToString())
    assert v.cids == [content_id(groups[3]), content_id(groups[1])]


def test_make_envelope_refuses_groups_of_another_origin(keys):
    alice, mallory = keys
    with pytest.raises(ValueError, match="origin"):
        signed(alice, [group(peer_id_of(mallory))])


# ------------------------------------------------------------------------------- rejections

def test_oversized_envelope_is_rejected_before_parsing(keys):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice))])
    assert reason(env.SerializeToString(), E.EnvelopeLimits(max_envelope_bytes=100)) == E.OVERSIZED
    assert reason(b"\x00" * 200, E.EnvelopeLimits(max_envelope_bytes=100)) == E.OVERSIZED


@pytest.mark.parametrize("junk", [b"\x0a\xff\xff\xff", b"\xff\xff\xff\xff\xff", b"\x0a\x05abc"])
def test_malformed_bytes_are_rejected(junk):
    assert reason(junk) == E.MALFORMED


def test_malformed_header_is_rejected(keys):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice))])
    env.header = b"\x2a\x03abc"  # one group id of 3 bytes
    assert reason(env) == E.MALFORMED_HEADER
    env.header = b"\x0a\xff"
    assert reason(env) == E.MALFORMED_HEADER


def test_bad_public_key_is_rejected(keys):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice))])
    env.public_key = b"not a key"
    assert reason(env) == E.BAD_PUBLIC_KEY
    env.public_key = b"\x08\x00\x12\x20" + bytes(32)  # an RSA key type: refused
    assert reason(env) == E.BAD_PUBLIC_KEY


def test_origin_must_be_the_peer_id_of_the_signing_key(keys):
    alice, mallory = keys
    a = peer_id_of(alice)
    env = signed(alice, [group(a)])
    # mallory re-signs alice's header with her own key: the key does not derive alice's peer id
    env.public_key = mallory.public_key.serialize()
    env.signature = mallory.private_key.sign(E.SIGNING_DOMAIN + env.header)
    assert reason(env) == E.ORIGIN_MISMATCH


def test_forged_signature_is_rejected(keys):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice))])
    sig = bytearray(env.signature)
    sig[0] ^= 1
    env.signature = bytes(sig)
    assert reason(env) == E.BAD_SIGNATURE
    env.signature = b"short"
    assert reason(env) == E.BAD_SIGNATURE


def test_signature_without_domain_prefix_is_rejected(keys):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice))])
    env.signature = alice.private_key.sign(env.header)
    assert reason(env) == E.BAD_SIGNATURE


def test_envelope_from_an_unexpected_sender_is_rejected(keys):
    alice, mallory = keys
    env = signed(mallory, [group(peer_id_of(mallory))])
    assert reason(env, expected_sender=peer_id_of(alice)) == E.SENDER_MISMATCH


def test_tampered_group_is_not_in_the_signed_list(keys):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice))])
    env.groups[0].completions[0].text = "58"
    assert reason(env) == E.UNLISTED_GROUP


def test_group_carried_twice_is_rejected(keys):
    alice, _ = keys
    g = group(peer_id_of(alice))
    env = signed(alice, [g])
    env.groups.append(g)
    assert reason(env) == E.DUPLICATE_GROUP


def test_group_claiming_another_origin_is_rejected(keys):
    alice, mallory = keys
    # make_envelope refuses this, so build the header by hand
    g = group(peer_id_of(mallory))
    header = wire.EnvelopeHeader(origin=peer_id_of(alice), policy_id="p", round=1, created_at_ms=now_ms(),
                                 group_ids=[content_id(g)], seq=1).SerializeToString()
    env = wire.SignedEnvelope(header=header, signature=alice.private_key.sign(E.SIGNING_DOMAIN + header),
                              public_key=alice.public_key.serialize(), groups=[g])
    assert reason(env) == E.GROUP_ORIGIN_MISMATCH


@pytest.mark.parametrize("family,params_json", [
    ("no_such_family", "{}"),
    ("chain_sum", "not json"),
    ("chain_sum", '{"evil": 1}'),
    ("chain_sum", '{"min_terms": 1000000, "max_terms": 1000000}'),  # would stall regeneration
    ("chain_sum", '{"max_digits": NaN}'),
])
def test_task_spec_that_cannot_be_regenerated_is_rejected(keys, family, params_json):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice), family=family, params_json=params_json)])
    assert reason(env) == E.BAD_TASK_SPEC


def test_completion_count_text_tokens_and_floats_are_checked(keys):
    alice, _ = keys
    a = peer_id_of(alice)
    assert reason(signed(alice, [group(a, n=65)])) == E.TOO_MANY_COMPLETIONS
    assert reason(signed(alice, [group(a, n=0)])) == E.NO_COMPLETIONS
    assert reason(signed(alice, [group(a, text="x" * 9000)])) == E.TEXT_TOO_LONG
    g = group(a)
    g.completions[0].num_tokens = 10**6
    assert reason(signed(alice, [g])) == E.TOO_MANY_TOKENS
    for bad in (math.nan, math.inf):
        g = group(a)
        g.completions[1].reward = bad
        assert reason(signed(alice, [g])) == E.NON_FINITE
        g = group(a)
        g.completions[0].logprob_sum = bad
        assert reason(signed(alice, [g])) == E.NON_FINITE


def test_stale_and_future_envelopes_are_rejected(keys):
    alice, _ = keys
    a = peer_id_of(alice)
    old = now_ms() - 2 * 3600 * 1000
    assert reason(signed(alice, [group(a, created_at_ms=old)], created_at_ms=old)) == E.STALE
    assert reason(signed(alice, [group(a, created_at_ms=old)])) == E.STALE  # an old group in a fresh envelope
    ahead = now_ms() + 3600 * 1000
    assert reason(signed(alice, [group(a)], created_at_ms=ahead)) == E.FUTURE


def test_exact_replay_is_rejected_but_a_different_subset_is_not(keys):
    alice, _ = keys
    a = peer_id_of(alice)
    g1, g2 = group(a, index=1), group(a, index=2)
    env = signed(alice, [g1, g2])
    seen = E.SeenEnvelopes(capacity=10)
    E.verify_envelope(env.SerializeToString(), seen=seen)
    assert reason(env.SerializeToString(), seen=seen) == E.REPLAY
    subset = wire.SignedEnvelope(header=env.header, signature=env.signature, public_key=env.public_key,
                                 groups=[g2])
    E.verify_envelope(subset, seen=seen)
    assert len(seen) == 2


def test_rejected_envelopes_are_not_remembered_as_seen(keys):
    alice, _ = keys
    env = signed(alice, [group(peer_id_of(alice))])
    env.groups[0].completions[0].text = "tampered"
    seen = E.SeenEnvelopes()
    reason(env, seen=seen)
    assert len(seen) == 0


def test_seen_envelopes_forgets_the_least_recent_beyond_capacity(keys):
    alice, _ = keys
    a = peer_id_of(alice)
    seen = E.SeenEnvelopes(capacity=2)
    vs = [E.verify_envelope(signed(alice, [group(a, index=i)])) for i in range(3)]
    for v in vs:
        assert seen.add(v)
    assert vs[0] not in seen and vs[1] in seen and vs[2] in seen
    assert seen.add(vs[0])  # forgotten, so new again


def test_limits_refuse_nonpositive_values():
    with pytest.raises(ValueError, match="max_completions"):
        E.EnvelopeLimits(max_completions=0)


# ------------------------------------------------------------------------------ store index

def test_index_rebuilds_verifiable_envelopes_for_stored_groups(keys, tmp_path):
    alice, _ = keys
    a = peer_id_of(alice)
    store = RolloutStore(tmp_path / "s.db")
    index = E.EnvelopeIndex(store)
    groups = [group(a, index=i) for i in range(5)]
    verified = E.verify_envelope(signed(alice, groups))
    assert all(new for _, new in index.put_verified(verified))
    want = [content_id(groups[i]) for i in (4, 0, 2)] + [b"\x00" * 32]
    envs = index.envelopes_for(want)
    assert len(envs) == 1
    v = E.verify_envelope(envs[0].SerializeToString())
    assert sorted(v.cids) == sorted(want[:3])
    assert v.envelope_id == verified.envelope_id


def test_index_splits_a_large_envelope_into_verifiable_parts(keys, tmp_path):
    alice, _ = keys
    a = peer_id_of(alice)
    store = RolloutStore(tmp_path / "s.db")
    index = E.EnvelopeIndex(store)
    groups = [group(a, index=i, text="1" * 500) for i in range(6)]
    env = signed(alice, groups)
    index.record(env)  # our own envelope: recorded without verification
    store.put_many(groups)
    max_bytes = env.ByteSize() // 2
    parts = index.envelopes_for([content_id(g) for g in groups], max_bytes=max_bytes)
    assert len(parts) >= 2
    got = []
    for part in parts:
        assert part.ByteSize() <= max_bytes
        got += E.verify_envelope(part).cids
    assert sorted(got) == sorted(content_id(g) for g in groups)


def test_index_prune_forgets_envelopes_of_pruned_groups(keys, tmp_path):
    alice, _ = keys
    a = peer_id_of(alice)
    store = RolloutStore(tmp_path / "s.db", StoreLimits(max_age_s=60))
    index = E.EnvelopeIndex(store)
    old = now_ms() - 120_000
    index.put_verified(E.verify_envelope(signed(alice, [group(a, index=1, created_at_ms=old)])))
    fresh = group(a, index=2)
    index.put_verified(E.verify_envelope(signed(alice, [fresh])))
    assert len(index.entries_since(0)) == 2
    assert store.prune() == 1
    assert index.prune() == 1
    assert [cid for cid, _ in index.entries_since(0)] == [content_id(fresh)]
    assert index._conn().execute("SELECT COUNT(*) FROM envelopes").fetchone()[0] == 1


# ------------------------------------------------------------------------ reconcile (pure)

def cid(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def entries(ids, t0=10_000, step=700) -> list[tuple[bytes, int]]:
    return [(cid(i), t0 + i * step) for i in ids]


def test_digest_is_count_and_xor_of_id_prefixes_per_bucket():
    es = [(cid(1), 1000), (cid(2), 1999), (cid(3), 2000), (cid(4), 500)]
    d = R.digests(es, since_ms=1000, bucket_ms=1000)
    x12 = int.from_bytes(cid(1)[:8], "big") ^ int.from_bytes(cid(2)[:8], "big")
    assert d == {1000: (2, x12), 2000: (1, int.from_bytes(cid(3)[:8], "big"))}  # cid(4) is before since


def test_equal_sets_have_no_differing_buckets():
    es = entries(range(50))
    assert R.differing(R.digests(es, 10_000, 1000), R.digests(list(reversed(es)), 10_000, 1000)) == []
    assert R.diff(es, es, 10_000, 1000) == (set(), set())


def test_one_extra_id_is_found():
    ours = entries(range(50))
    theirs = ours + [(cid(999), 12_345)]
    assert R.diff(ours, theirs, 10_000, 1000) == (set(), {cid(999)})
    assert R.differing(R.digests(ours, 10_000, 1000), R.digests(theirs, 10_000, 1000)) == [12_000]


def test_extras_on_both_sides_are_found():
    ours = entries(list(range(40)) + [100, 101])
    theirs = entries(list(range(40)) + [200, 201, 202])
    only_ours, only_theirs = R.diff(ours, theirs, 10_000, 5_000)
    assert only_ours == {cid(100), cid(101)}
    assert only_theirs == {cid(200), cid(201), cid(202)}


def test_empty_side_differs_in_every_nonempty_bucket():
    theirs = entries(range(10), step=1000)
    assert R.diff([], theirs, 10_000, 1000) == (set(), {c for c, _ in theirs})


def test_respond_answers_both_phases_newest_first():
    ours = entries(range(10))
    theirs = ours + [(cid(50), 10_100), (cid(51), 30_000)]
    req1 = wire.ReconcileRequest(since_ms=10_000, bucket_ms=1000, buckets=R.to_proto(R.digests(ours, 10_000, 1000)))
    starts = list(R.respond(req1, theirs).differing_starts)
    assert starts == [10_000, 30_000]
    have = R.ids_in_buckets(ours, starts, 10_000, 1000)
    req2 = wire.ReconcileRequest(since_ms=10_000, bucket_ms=1000, have_ids=list(have), detail_starts=starts)
    assert list(R.respond(req2, theirs).missing_ids) == [cid(51), cid(50)]
    capped = R.respond(req2, theirs, R.ReconcileLimits(max_missing_ids=1))
    assert list(capped.missing_ids) == [cid(51)]


@pytest.mark.parametrize("req", [
    wire.ReconcileRequest(since_ms=0, bucket_ms=10),  # buckets too fine
    wire.ReconcileRequest(since_ms=0, bucket_ms=1000, have_ids=[cid(1)]),  # ids without detail
    wire.ReconcileRequest(since_ms=0, bucket_ms=1000, buckets=[wire.BucketDigest(start_ms=0)] * 2),
])
def test_respond_refuses_requests_out_of_bounds(req):
    with pytest.raises(R.ReconcileError):
        R.respond(req, entries(range(3)))
