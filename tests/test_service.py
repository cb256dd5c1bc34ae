"""NetworkService: real swarm members in one process on 127.0.0.1, each on its own thread and loop.

A swarm of three forms through multiaddr bootstrap and every member ends up holding every
group the others published; a fourth joins late through a host:port gRPC bootstrap and
catches up by reconciliation; an attacker's malformed, forged and replayed messages are
rejected, logged and counted while the swarm keeps working; stop() is prompt and leaves no
threads behind. Groups are tiny protos (no model). Waits poll a condition up to a deadline.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest

from rollshare.net.envelope import envelope_id, make_envelope
from rollshare.net.identity import load_or_create_identity
from rollshare.net.service import (ANNOUNCE_TOPIC, GossipRejected, NetworkConfig, NetworkError, NetworkService,
                                   check_announcement, check_peer_info, dialable_addrs, valid_endpoint)
from rollshare.proto import rollout_pb2 as pb
from rollshare.proto import wire_pb2 as wire
from rollshare.store import RolloutStore, content_id, now_ms

WAIT_S = 20.0  # bound on any single wait; the happy path takes well under a second
FAST = NetworkConfig(listen_host="127.0.0.1", reconcile_interval_s=0.5, peer_info_interval_s=1.0,
                     bootstrap_timeout_s=5.0)


def group(origin: str, index: int) -> pb.RolloutGroup:
    return pb.RolloutGroup(
        task=pb.TaskSpec(family="chain_sum", params_json="{}", seed=1, index=index, style="compact"),
        completions=[pb.Completion(text=str(index), num_tokens=2, reward=0.0)],
        policy_id="tiny@0", round=1, created_at_ms=now_ms(), origin=origin)


def wait_until(cond, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def held(svc: NetworkService) -> set[bytes]:
    return set(svc.store.ids_since(0))


def rejected(svc: NetworkService, reason: str) -> int:
    return svc.status()["rejected"].get(reason, 0)


class Swarm:
    def __init__(self, root):
        self.root = root
        self.members: dict[str, NetworkService] = {}
        self.published: set[bytes] = set()

    def add(self, name: str, **cfg) -> NetworkService:
        d = self.root / name
        svc = NetworkService(RolloutStore(d / "rollouts.db"), load_or_create_identity(d / "identity.key"),
                             FAST.with_(**cfg))
        svc.start(timeout=30)
        self.members[name] = svc
        return svc

    def publish(self, svc: NetworkService, indices) -> None:
        groups = [group(svc.peer_id, i) for i in indices]
        svc.publish(groups)
        self.published |= {content_id(g) for g in groups}

    def stop(self) -> None:
        for svc in self.members.values():
            svc.stop()
            svc.store.close()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("swarm"))
    s.threads_before = {t.ident for t in threading.enumerate()}
    a = s.add("a")
    s.add("b", bootstrap=(a.multiaddrs[0],))
    s.add("c", bootstrap=(a.multiaddrs[0],))
    yield s
    s.stop()


# ------------------------------------------------------------------------------ pure checks


def test_announcement_check_names_each_fault():
    sender = "12D3KooWsender"
    good = wire.Announcement(origin=sender, envelope_id=b"e" * 32, group_ids=[b"a" * 32, b"b" * 32], sizes=[10, 20],
                             grpc_endpoint="127.0.0.1:4102", round=1, created_at_ms=now_ms())
    assert check_announcement(sender, good.SerializeToString()).origin == sender

    def reason(**change) -> str:
        bad = wire.Announcement()
        bad.CopyFrom(good)
        for k, v in change.items():
            if isinstance(v, list):
                del getattr(bad, k)[:]
                getattr(bad, k).extend(v)
            else:
                setattr(bad, k, v)
        with pytest.raises(GossipRejected) as e:
            check_announcement(sender, bad.SerializeToString())
        return e.value.reason

    with pytest.raises(GossipRejected, match="malformed"):
        check_announcement(sender, b"\x0a\xff\xff\xff\xff\x0f")
    assert reason(origin="12D3KooWsomeoneelse") == "origin_mismatch"
    assert reason(group_ids=[], sizes=[]) == "bad_ids"
    assert reason(group_ids=[b"a" * 32, b"a" * 32]) == "bad_ids"
    assert reason(group_ids=[b"short", b"b" * 32]) == "bad_ids"
    assert reason(sizes=[10]) == "bad_sizes"
    assert reason(sizes=[10, 0]) == "bad_sizes"
    assert reason(grpc_endpoint="0.0.0.0:4102") == "bad_endpoint"
    assert reason(grpc_endpoint="host") == "bad_endpoint"
    assert reason(created_at_ms=now_ms() - 2 * 3600 * 1000) == "stale"
    assert reason(created_at_ms=now_ms() + 3600 * 1000) == "future"
    with pytest.raises(GossipRejected, match="origin_mismatch"):
        check_peer_info(sender, wire.PeerInfo(peer_id="x", grpc_endpoint="h:1").SerializeToString())
    assert [valid_endpoint(e) for e in ("a.b:1", "[::1]:5", "1.2.3.4:65535", "1.2.3.4:0", "x:y", "1.2.3:4")] == \
        [True, True, True, False, False, False]


def test_peer_exchange_dials_only_addresses_that_name_the_gossiping_peer():
    me = "12D3KooW" + "A" * 44
    other = "12D3KooW" + "B" * 44
    addrs = [f"/ip4/10.0.0.1/tcp/4101/p2p/{me}", f"/ip4/10.0.0.2/tcp/4101/p2p/{other}",  # someone else
             f"/dns4/evil.example/tcp/80/p2p/{me}", f"/ip4/10.0.0.1/udp/4101/p2p/{me}",      # not IP + TCP
             f"/ip4/10.0.0.1/tcp/4101/p2p/{me}/extra", f"/ip6/::1/tcp/4101/p2p/{me}"]
    assert dialable_addrs(me, addrs) == [addrs[0], addrs[5]]
    assert len(dialable_addrs(me, [f"/ip4/10.0.0.{i}/tcp/1/p2p/{me}" for i in range(1, 30)])) == 4


# ----------------------------------------------------------------------------- the swarm


def test_every_member_receives_every_group_the_others_publish(swarm):
    members = list(swarm.members.values())
    for k, svc in enumerate(members):
        swarm.publish(svc, range(10 * k, 10 * k + 3))
    wait_until(lambda: all(held(m) == swarm.published for m in members), "all 9 groups on all 3 members")
    for m in members:
        s = m.status()
        assert (s["groups_out"], s["groups_in"]) == (3, 6)
        assert s["peers"] >= 1 and s["rejected"] == {}


def test_members_that_only_know_the_bootstrap_node_connect_to_each_other_by_peer_exchange(swarm):
    b, c = swarm.members["b"], swarm.members["c"]
    # b and c were each given only a's address; c's peer info, relayed by a, tells b where c listens
    wait_until(lambda: c.peer_id in b.status()["connected"] and b.peer_id in c.status()["connected"],
               "b and c to dial each other")
    assert b.status()["dials"] + c.status()["dials"] >= 1


def test_swarm_outlives_its_bootstrap_node(tmp_path):
    s = Swarm(tmp_path)
    try:
        a = s.add("a")
        b = s.add("b", bootstrap=(a.multiaddrs[0],))
        c = s.add("c", bootstrap=(a.multiaddrs[0],))
        wait_until(lambda: c.peer_id in b.status()["connected"], "b and c to meet by peer exchange")
        a.stop()
        s.publish(b, [1, 2])
        wait_until(lambda: held(c) >= s.published, "b's groups on c with the bootstrap node gone")
    finally:
        s.stop()


def test_late_joiner_bootstrapped_by_grpc_address_catches_up_by_reconciliation(swarm):
    a, b = swarm.members["a"], swarm.members["b"]
    swarm.publish(b, [50, 51])
    wait_until(lambda: all(held(m) == swarm.published for m in swarm.members.values()), "b's groups everywhere")
    before = set(swarm.published)
    d = swarm.add("d", bootstrap=(a.grpc_endpoint,))  # host:port: peer id and multiaddrs come from Info
    # those groups were announced before d existed: reconciliation brings them (or, if d connects
    # while the announcements are still in a neighbour's GossipSub history, IHAVE/IWANT may be first)
    wait_until(lambda: before <= held(d), "the late joiner to hold the earlier groups")
    wait_until(lambda: d.status()["reconciles"] >= 1, "the late joiner to reconcile")
    swarm.publish(d, [100])
    wait_until(lambda: all(held(m) == swarm.published for m in swarm.members.values()),
               "the late joiner's group on every member")


def test_bootstrap_that_does_not_answer_fails_start_with_a_clear_error(tmp_path):
    d = tmp_path / "lonely"
    svc = NetworkService(RolloutStore(d / "rollouts.db"), load_or_create_identity(d / "identity.key"),
                         FAST.with_(bootstrap=("127.0.0.1:1",), bootstrap_timeout_s=1.0))
    started = time.monotonic()
    with pytest.raises(NetworkError, match=r"bootstrap peer 127.0.0.1:1 did not answer within 1 s; check the "
                                           r"address or start without --bootstrap"):
        svc.start(timeout=10)
    assert time.monotonic() - started < 5
    svc.stop()
    svc.store.close()


@pytest.mark.parametrize("which", ["grpc_port", "p2p_port"])
def test_listening_on_a_port_another_member_holds_fails_start_with_a_clear_error(swarm, tmp_path, which):
    a = swarm.members["a"]
    taken = int(a.grpc_endpoint.rsplit(":", 1)[1] if which == "grpc_port" else a.multiaddrs[0].split("/")[4])
    d = tmp_path / "clash"
    svc = NetworkService(RolloutStore(d / "rollouts.db"), load_or_create_identity(d / "identity.key"),
                         FAST.with_(**{which: taken}))
    with pytest.raises(NetworkError, match=f"{taken}.*--{which.replace('_', '-')}"):
        svc.start(timeout=10)
    svc.store.close()


def test_malformed_forged_and_replayed_messages_are_rejected_logged_counted_and_harmless(swarm, caplog):
    caplog.set_level(logging.INFO, logger="rollshare.net")
    a, b = swarm.members["a"], swarm.members["b"]
    m = swarm.add("mallory", bootstrap=(a.multiaddrs[0],))

    def announce(env: wire.SignedEnvelope, groups) -> bytes:
        """Serve `env` from mallory's gRPC and return an announcement of it (not yet gossiped)."""
        m.store.put_many(groups, origin=m.peer_id)
        m.index.record(env)
        return wire.Announcement(origin=m.peer_id, envelope_id=envelope_id(env),
                                 group_ids=[content_id(g) for g in groups], sizes=[g.ByteSize() for g in groups],
                                 grpc_endpoint=m.grpc_endpoint, round=1, created_at_ms=now_ms()).SerializeToString()

    # an honest announcement first: proves the path from mallory to a works
    g1 = group(m.peer_id, 200)
    honest = announce(make_envelope(m.keypair, [g1], "tiny@0", 1, seq=1), [g1])
    # a has heard mallory's peer info: mallory's gossip reaches a
    wait_until(lambda: a.status()["known_peers"] == len(swarm.members) - 1, "a to know mallory")
    m.gossip_raw(ANNOUNCE_TOPIC, honest)
    wait_until(lambda: content_id(g1) in held(a), "a to fetch mallory's honest group")

    # malformed bytes
    m.gossip_raw(ANNOUNCE_TOPIC, b"\x0a\xff\xff\xff\xff\x0f")
    wait_until(lambda: rejected(a, "malformed") == 1, "a to reject the malformed announcement")

    # an announcement in b's name, sent by mallory
    forged = wire.Announcement.FromString(honest)
    forged.origin = b.peer_id
    m.gossip_raw(ANNOUNCE_TOPIC, forged.SerializeToString())
    wait_until(lambda: rejected(a, "origin_mismatch") == 1, "a to reject the announcement forged in b's name")

    # the same announcement again (gossip replay)
    m.gossip_raw(ANNOUNCE_TOPIC, honest)
    wait_until(lambda: rejected(a, "replay") == 1, "a to reject the replayed announcement")

    # the same envelope again, after a lost the group (as if evicted): a replayed envelope
    with sqlite3.connect(a.store.path) as c:
        c.execute("DELETE FROM groups WHERE cid=?", (content_id(g1),))
    assert a.fetch(m.grpc_endpoint, [content_id(g1)]) == 0
    wait_until(lambda: rejected(a, "replay") >= 2, "a to reject the replayed envelope")
    assert content_id(g1) not in held(a)

    # a properly announced envelope whose signature is forged
    g2 = group(m.peer_id, 201)
    env = make_envelope(m.keypair, [g2], "tiny@0", 1, seq=2)
    env.signature = bytes([env.signature[0] ^ 1]) + env.signature[1:]
    m.gossip_raw(ANNOUNCE_TOPIC, announce(env, [g2]))
    wait_until(lambda: rejected(a, "bad_signature") >= 1, "a to reject the envelope with a forged signature")
    assert content_id(g2) not in held(a)

    # nobody crashed: the swarm still delivers
    swarm.publish(b, [300])
    wait_until(lambda: all(swarm.published <= held(x) for x in (a, b, swarm.members["c"])),
               "b's new group on every honest member")
    assert a.status()["running"]
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "rollshare.net")
    for reason in ("malformed", "origin_mismatch", "replay", "bad_signature"):
        assert reason in logged
    assert "ignoring peer " + m.peer_id in logged  # a dishonest peer is banned for a while


def test_stop_returns_promptly_and_leaves_no_threads(swarm):
    for name, svc in swarm.members.items():
        started = time.monotonic()
        svc.stop(timeout=10)
        assert time.monotonic() - started < 5, f"{name} took too long to stop"
        assert not svc.status()["running"]
        svc.stop()  # idempotent
    with pytest.raises(NetworkError, match="not running"):
        swarm.members["a"].fetch("127.0.0.1:1", [b"x" * 32])
    # trio keeps idle worker threads ("Trio thread N") in a cache for a few seconds; nothing else may stay
    def left() -> list[str]:
        return [t.name for t in threading.enumerate()
                if t.ident not in swarm.threads_before and not t.name.startswith("Trio thread")]

    try:
        wait_until(lambda: not left(), "every thread of the stopped services to end", timeout=5)
    except AssertionError as e:
        raise AssertionError(f"{e}: {left()}") from None


# ------------------------------------------------------------------------- SwarmSharing


def test_swarm_sharing_samples_only_other_origins_and_rescores_from_the_regenerated_task(tmp_path):
    from rollshare.sharing import SwarmSharing
    from rollshare.tasks import TaskSpec, regenerate

    store = RolloutStore(tmp_path / "rollouts.db", self_origin="me")

    def lying_group(origin: str, index: int, family: str = "chain_sum") -> pb.RolloutGroup:
        g = group(origin, index)
        g.task.family = family
        answer = regenerate(TaskSpec.from_json("chain_sum", "{}", 1, index, "compact")).answer
        del g.completions[:]
        g.completions.extend([pb.Completion(text=answer, reward=0.0), pb.Completion(text="wrong", reward=1.0)])
        return g

    store.put_many([lying_group("peer", i) for i in range(3)])
    store.put_many([lying_group("me", 10), lying_group("", 11)])  # our own, with and without identity
    store.put(lying_group("mallory", 12, family="no_such_family"))

    class Recorder:
        published: list = []

        def publish(self, groups):
            self.published.extend(groups)

    service = Recorder()
    sharing = SwarmSharing(service, store, "me", seed=1)
    shared = sharing.sample_shared(10, policy=None)
    assert sorted(s.origin for s in shared) == ["peer"] * 3
    assert all(s.rewards == [1.0, 0.0] for s in shared)  # ours, not the sender's [0.0, 1.0]
    assert sharing.bad_specs == 1
    assert len(sharing.sample_shared(2)) <= 2 and sharing.sample_shared(0) == []  # up to n: bad specs are skipped
    sharing.publish([group("me", 1)])
    assert len(service.published) == 1
    store.close()
