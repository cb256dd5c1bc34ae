"""Perf records shared over the swarm: signed batches on their own topic, checked like rollouts."""

from __future__ import annotations

import json
import time

import pytest

from rollshare.accel.history import History, make_record
from rollshare.net import perf_records as P
from rollshare.net.identity import keygen, peer_id_of
from rollshare.proto import perf_pb2 as pp


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return keygen(d / "alice.key"), keygen(d / "mallory.key")


def rec(method="policy", tps=1000.0, **kw):
    f = {"workload": {"name": "round", "rows": 128, "max_new_tokens": 5, "greedy": False},
         "model": {"name": "tiny", "params": 1_000_000}, "hardware": {"device": "cpu", "threads": 2, "cpu": "x"}}
    return make_record(method, "ok", f, tokens_per_s=tps, latency_s=0.1, source="bench", **kw)


def reason(data: bytes, sender: str | None, **kw) -> str | None:
    try:
        P.verify_perf_batch(data, sender, **kw)
    except P.PerfRejected as r:
        return r.reason
    return None


def test_signed_batch_verifies_and_carries_the_records(keys):
    alice, _ = keys
    data = P.sign_perf_batch(alice, [rec(), rec("hf-default", 800.0)], seq=1).SerializeToString()
    batch, records = P.verify_perf_batch(data, peer_id_of(alice))
    assert [r["method"] for r in records] == ["policy", "hf-default"]
    assert records[0]["source"] == f"peer:{peer_id_of(alice)}" and records[0]["tokens_per_s"] == 1000.0
    assert records[0]["features"]["model"]["name"] == "tiny" and records[0]["setting"]


def test_bad_batches_are_rejected_with_a_reason(keys):
    alice, mallory = keys
    good = P.sign_perf_batch(alice, [rec()], seq=1)
    # forged: mallory's signature over alice's batch, under alice's key
    forged = pp.SignedPerfBatch(batch=good.batch, public_key=good.public_key,
                                signature=P.sign_perf_batch(mallory, [rec()], seq=1).signature)
    assert reason(forged.SerializeToString(), peer_id_of(alice)) == P.BAD_SIGNATURE
    # altered after signing
    b = pp.PerfBatch.FromString(good.batch)
    b.records[0].tokens_per_s = 1e6
    altered = pp.SignedPerfBatch(batch=b.SerializeToString(), signature=good.signature, public_key=good.public_key)
    assert reason(altered.SerializeToString(), peer_id_of(alice)) == P.BAD_SIGNATURE
    # relayed under another sender's name, or signed with a key that is not the origin's
    assert reason(good.SerializeToString(), peer_id_of(mallory)) == P.SENDER_MISMATCH
    wrong_origin = pp.PerfBatch.FromString(good.batch)
    wrong_origin.origin = peer_id_of(alice)
    as_mallory = P.sign_perf_batch(mallory, [rec()], seq=1)
    m_batch = pp.PerfBatch.FromString(as_mallory.batch)
    m_batch.origin = peer_id_of(alice)
    raw = m_batch.SerializeToString(deterministic=True)
    claim = pp.SignedPerfBatch(batch=raw, signature=mallory.private_key.sign(P.SIGNING_DOMAIN + raw),
                               public_key=as_mallory.public_key)
    assert reason(claim.SerializeToString(), None) == P.ORIGIN_MISMATCH
    # wrong schema, bad values, garbage, oversized, too many, stale
    assert reason(P.sign_perf_batch(alice, [dict(rec(), schema=99)], 1).SerializeToString(), None) == P.WRONG_SCHEMA
    nan = P.sign_perf_batch(alice, [rec()], 1)
    nb = pp.PerfBatch.FromString(nan.batch)
    nb.records[0].tokens_per_s = float("nan")
    raw = nb.SerializeToString(deterministic=True)
    bad = pp.SignedPerfBatch(batch=raw, signature=alice.private_key.sign(P.SIGNING_DOMAIN + raw),
                             public_key=nan.public_key)
    assert reason(bad.SerializeToString(), None) == P.BAD_RECORD
    not_features = dict(rec(), features={"workload": 1})
    raw_rec = P.record_to_pb(not_features)
    nb = pp.PerfBatch(origin=peer_id_of(alice), created_at_ms=int(time.time() * 1000), seq=2, records=[raw_rec])
    raw = nb.SerializeToString(deterministic=True)
    bad = pp.SignedPerfBatch(batch=raw, signature=alice.private_key.sign(P.SIGNING_DOMAIN + raw),
                             public_key=good.public_key)
    assert reason(bad.SerializeToString(), None) == P.BAD_RECORD
    assert reason(b"\x0a\xff\xff\xff\xff\x0f", None) == P.MALFORMED
    big = P.sign_perf_batch(alice, [rec(pad="x" * 3000)] * 20, 1).SerializeToString()
    assert reason(big, None, limits=P.PerfLimits(max_batch_bytes=len(big) - 1)) == P.OVERSIZED
    assert reason(P.sign_perf_batch(alice, [rec()] * 5, 1).SerializeToString(), None,
                  limits=P.PerfLimits(max_records=4)) == P.TOO_MANY_RECORDS
    old = P.sign_perf_batch(alice, [rec()], 1, created_at_ms=int(time.time() * 1000) - 2 * 86400_000)
    assert reason(old.SerializeToString(), None) == P.STALE
    assert reason(good.SerializeToString(), None) is None


def test_exchange_counts_rejections_enforces_quota_and_refuses_replays(keys, tmp_path):
    alice, mallory = keys
    clock = [0.0]
    h = History(tmp_path / "h.jsonl")
    ex = P.PerfExchange(alice, h, P.PerfLimits(quota_records=10, quota_refill_per_s=1.0), clock=lambda: clock[0])
    m = peer_id_of(mallory)
    first = P.sign_perf_batch(mallory, [rec()] * 8, seq=5).SerializeToString()
    assert ex.validate(m, first) is None
    ex.on_message(m, first)
    assert ex.validate(m, first) == P.REPLAY  # same seq again
    assert ex.validate(m, P.sign_perf_batch(mallory, [rec()] * 8, seq=6).SerializeToString()) == P.QUOTA
    clock[0] += 8.0  # the bucket refills
    assert ex.validate(m, P.sign_perf_batch(mallory, [rec()] * 8, seq=7).SerializeToString()) is None
    assert ex.validate(m, b"junk") == P.MALFORMED
    st = ex.status()
    assert st["records_in"] == 8 and st["rejected"] == {P.REPLAY: 1, P.QUOTA: 1, P.MALFORMED: 1}
    got = h.records()
    assert len(got) == 8 and all(r["source"] == f"peer:{m}" for r in got)


def test_exchange_shares_only_our_own_records_in_signed_batches(keys):
    alice, _ = keys
    ex = P.PerfExchange(alice, None, P.PerfLimits(max_records=3))
    ex.share([rec(), rec(), dict(rec(), source="peer:someone"), rec(), rec()])
    first, second = ex.next_batch(), ex.next_batch()
    assert ex.next_batch() is None
    _, a = P.verify_perf_batch(first, peer_id_of(alice))
    _, b = P.verify_perf_batch(second, peer_id_of(alice))
    assert len(a) == 3 and len(b) == 1  # the peer's record was not re-shared as ours


def test_perf_records_travel_between_two_swarm_members(tmp_path):
    from rollshare.net.identity import load_or_create_identity
    from rollshare.net.service import NetworkConfig, NetworkService
    from rollshare.store import RolloutStore

    cfg = NetworkConfig(listen_host="127.0.0.1", reconcile_interval_s=0.5, peer_info_interval_s=1.0,
                        bootstrap_timeout_s=5.0)
    members = []
    try:
        for name in ("a", "b"):
            d = tmp_path / name
            kp = load_or_create_identity(d / "identity.key")
            ex = P.PerfExchange(kp, History(d / "history.jsonl"), interval_s=0.2)
            boot = (members[0][0].multiaddrs[0],) if members else ()
            svc = NetworkService(RolloutStore(d / "rollouts.db"), kp, cfg.with_(bootstrap=boot), perf=ex)
            svc.start(timeout=30)
            members.append((svc, ex))
        (a, ex_a), (b, ex_b) = members
        deadline = time.monotonic() + 20
        while not ex_b.history.records() and time.monotonic() < deadline:
            ex_a.share([rec()])  # gossip needs the mesh to form: keep offering until one arrives
            time.sleep(0.3)
        got = ex_b.history.records()
        assert got and got[0]["source"] == f"peer:{a.peer_id}" and got[0]["method"] == "policy"
        a.gossip_raw(P.PERF_TOPIC, b"not a perf batch")
        deadline = time.monotonic() + 20
        while ex_b.status()["rejected"].get(P.MALFORMED, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ex_b.status()["rejected"].get(P.MALFORMED) == 1
    finally:
        for svc, _ in members:
            svc.stop()
            svc.store.close()
