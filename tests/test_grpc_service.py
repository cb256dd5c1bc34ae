"""The Rollouts gRPC service over real servers on 127.0.0.1: fetch, reconcile, info/status,
health, reflection, limits, and a clear timeout against a dead port."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rollshare.net import envelope as E
from rollshare.net import grpc_service as G
from rollshare.net.identity import keygen, peer_id_of
from rollshare.proto import rollout_pb2 as pb
from rollshare.proto import wire_pb2 as wire
from rollshare.proto import wire_pb2_grpc as wire_grpc
from rollshare.store import RolloutStore, content_id


def run(coro, timeout: float = 15.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def alice(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys") / "alice.key")


def group(origin: str, index: int, created_at_ms: int) -> pb.RolloutGroup:
    return pb.RolloutGroup(
        task=pb.TaskSpec(family="chain_sum", params_json="{}", seed=1, index=index, style="compact"),
        completions=[pb.Completion(text=str(index), num_tokens=2, reward=0.0)],
        policy_id="tiny@0", round=1, created_at_ms=created_at_ms, origin=origin)


def make_index(path, kp, indices, t0: int) -> tuple[E.EnvelopeIndex, list[pb.RolloutGroup]]:
    """A store holding groups `indices` of one origin, each with its signed envelope."""
    index = E.EnvelopeIndex(RolloutStore(path))
    a = peer_id_of(kp)
    groups = [group(a, i, t0 + i * 1000) for i in indices]
    if groups:
        env = E.make_envelope(kp, groups, policy_id="tiny@0", round=1, seq=1)
        index.put_verified(E.verify_envelope(env))
    return index, groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_streams_stored_groups_that_verify_at_the_client(alice, tmp_path):
    index, groups = make_index(tmp_path / "a.db", alice, range(6), int(time.time() * 1000) - 10_000)
    want = [content_id(groups[i]) for i in (1, 3, 5)]

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index)
        try:
            async with G.RolloutsClient(f"127.0.0.1:{port}") as client:
                raw = [r async for r in client.fetch(want + [b"\x01" * 32], timeout=5)]
                verified = [v async for v in client.fetch_verified(want, timeout=5,
                                                                   expected_sender=peer_id_of(alice))]
                return raw, verified
        finally:
            await G.stop(server, 0)

    raw, verified = run(main())
    assert all(isinstance(r, bytes) for r in raw)
    assert sorted(cid for v in verified for cid in v.cids) == sorted(want)
    assert sorted(cid for r in raw for cid in E.verify_envelope(r).cids) == sorted(want)


def test_fetch_refuses_more_than_1024_ids_per_request(alice, tmp_path):
    index, _ = make_index(tmp_path / "a.db", alice, [], 0)

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = wire_grpc.RolloutsStub(ch)
                ids = [i.to_bytes(32, "big") for i in range(1025)]
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.Fetch(wire.FetchRequest(group_ids=ids), timeout=5):
                        pass
                return e.value.code()
        finally:
            await G.stop(server, 0)

    assert run(main()) == grpc.StatusCode.INVALID_ARGUMENT


def test_client_fetch_splits_large_requests_into_batches(alice, tmp_path):
    index, groups = make_index(tmp_path / "a.db", alice, range(3), int(time.time() * 1000) - 10_000)
    ids = [i.to_bytes(32, "big") for i in range(2500)] + [content_id(g) for g in groups]

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index)
        try:
            async with G.RolloutsClient(f"127.0.0.1:{port}") as client:
                return [v async for v in client.fetch_verified(ids, timeout=5)]
        finally:
            await G.stop(server, 0)

    assert sorted(c for v in run(main()) for c in v.cids) == sorted(content_id(g) for g in groups)


def test_reconcile_between_overlapping_stores_returns_exactly_the_difference(alice, tmp_path):
    t0 = int(time.time() * 1000) - 60_000
    ours, _ = make_index(tmp_path / "ours.db", alice, list(range(0, 30)) + [40, 41], t0)
    theirs, their_groups = make_index(tmp_path / "theirs.db", alice, list(range(0, 30)) + [50, 51, 52], t0)
    expected = {content_id(g) for g in their_groups if g.task.index >= 50}

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, theirs)
        try:
            async with G.RolloutsClient(f"127.0.0.1:{port}") as client:
                missing = await client.reconcile(ours, since_ms=t0 - 1000, bucket_ms=5000, timeout=5)
                # after fetching the difference, nothing is left to reconcile
                async for v in client.fetch_verified(missing, timeout=5):
                    ours.put_verified(v)
                again = await client.reconcile(ours, since_ms=t0 - 1000, bucket_ms=5000, timeout=5)
                return missing, again
        finally:
            await G.stop(server, 0)

    missing, again = run(main())
    assert len(missing) == len(set(missing)) and set(missing) == expected
    assert again == []


def test_info_and_status_come_from_the_node_callbacks(alice, tmp_path):
    index, _ = make_index(tmp_path / "a.db", alice, [], 0)

    async def status():
        return wire.NodeStatus(groups_stored=7, rejected={"bad_signature": 2})

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index,
                                            info=lambda: wire.PeerInfo(peer_id="me", version="0.1"), status=status)
        bare, bare_port = await G.start_server("127.0.0.1", 0, index)
        try:
            async with G.RolloutsClient(f"127.0.0.1:{port}") as c, G.RolloutsClient(f"127.0.0.1:{bare_port}") as b:
                info, st = await c.info(timeout=2), await c.status(timeout=2)
                with pytest.raises(G.RpcFailed) as e:
                    await b.info(timeout=2)
                return info, st, e.value
        finally:
            await G.stop(server, 0)
            await G.stop(bare, 0)

    info, st, err = run(main())
    assert info.peer_id == "me" and st.groups_stored == 7 and st.rejected["bad_signature"] == 2
    assert err.code == grpc.StatusCode.UNIMPLEMENTED


def test_health_reports_serving_and_reflection_lists_the_service(alice, tmp_path):
    index, _ = make_index(tmp_path / "a.db", alice, [], 0)

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                hs = health_pb2_grpc.HealthStub(ch)
                overall = await hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                ours = await hs.Check(health_pb2.HealthCheckRequest(service=G.SERVICE_NAME), timeout=2)
                rs = reflection_pb2_grpc.ServerReflectionStub(ch)
                call = rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=2)
                services = [s.name async for r in call for s in r.list_services_response.service]
                return overall.status, ours.status, services
        finally:
            await G.stop(server, 0)

    overall, ours, services = run(main())
    assert overall == ours == health_pb2.HealthCheckResponse.SERVING
    assert "rollshare.v1.Rollouts" in services and "grpc.health.v1.Health" in services


def test_call_to_a_dead_port_fails_quickly_with_a_clear_error():
    endpoint = f"127.0.0.1:{free_port()}"

    async def main():
        async with G.RolloutsClient(endpoint) as client:
            t = time.monotonic()
            with pytest.raises(G.RpcFailed) as e:
                await client.info(timeout=1.0)
            return time.monotonic() - t, e.value

    elapsed, err = run(main())
    assert elapsed < 2.0
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert endpoint in str(err) and "check the address" in str(err)


def test_start_server_on_a_busy_port_says_so(alice, tmp_path):
    index, _ = make_index(tmp_path / "a.db", alice, [], 0)

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index)
        try:
            with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
                await G.start_server("127.0.0.1", port, index)
        finally:
            await G.stop(server, 0)

    run(main())


class HostileIndex:
    """Serves whatever envelopes it is given, whatever was asked."""

    def __init__(self, envelopes):
        self.envelopes = envelopes

    def envelopes_for(self, cids, max_bytes):
        return self.envelopes

    def entries_since(self, since_ms):
        return []


def test_fetch_verified_reports_tampered_and_unrequested_envelopes(alice):
    a = peer_id_of(alice)
    now = int(time.time() * 1000)
    good, tampered, extra = group(a, 1, now), group(a, 2, now), group(a, 3, now)
    env_good = E.make_envelope(alice, [good], "tiny@0", 1, 1)
    env_bad = E.make_envelope(alice, [tampered], "tiny@0", 1, 2)
    env_bad.groups[0].completions[0].text = "999"
    env_extra = E.make_envelope(alice, [extra], "tiny@0", 1, 3)
    index = HostileIndex([env_bad, env_good, env_extra])

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index)
        try:
            async with G.RolloutsClient(f"127.0.0.1:{port}") as client:
                ids = [content_id(good), content_id(tampered)]
                rejected = []
                got = [v async for v in client.fetch_verified(ids, timeout=5, on_reject=rejected.append)]
                with pytest.raises(E.Rejected):
                    async for _ in client.fetch_verified(ids, timeout=5):
                        pass
                return got, rejected
        finally:
            await G.stop(server, 0)

    got, rejected = run(main())
    assert [v.cids for v in got] == [[content_id(good)]]
    assert [r.reason for r in rejected] == [E.UNLISTED_GROUP, E.UNREQUESTED]


def test_fetch_that_outlives_its_timeout_fails_with_deadline_exceeded(alice, tmp_path):
    index = E.EnvelopeIndex(RolloutStore(tmp_path / "a.db"))
    a = peer_id_of(alice)
    now = int(time.time() * 1000)
    groups = [group(a, i, now) for i in range(5)]
    for seq, g in enumerate(groups):  # one envelope each: five stream messages
        index.put_verified(E.verify_envelope(E.make_envelope(alice, [g], "tiny@0", 1, seq)))

    async def main():
        server, port = await G.start_server("127.0.0.1", 0, index)
        try:
            async with G.RolloutsClient(f"127.0.0.1:{port}") as client:
                received = 0
                with pytest.raises(G.RpcFailed) as e:
                    async for _ in client.fetch([content_id(g) for g in groups], timeout=0.3):
                        received += 1
                        await asyncio.sleep(0.2)  # a slow consumer
                return received, e.value
        finally:
            await G.stop(server, 0)

    received, err = run(main())
    assert received < 5
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0.3 s" in str(err)
