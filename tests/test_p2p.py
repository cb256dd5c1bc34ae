"""The libp2p side: identity files, the trio/asyncio bridge, and real hosts on 127.0.0.1.

Hosts run in this process (trio.run, or as a trio guest under asyncio.run). Every wait is
bounded; waits are on events (a handler fired, a peer joined the mesh), not sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from rollshare.net.bridge import GuestStopped, TrioGuest
from rollshare.net.identity import (
    IdentityError,
    keygen,
    load_or_create_identity,
    peer_id_from_public_key,
    peer_id_of,
    sign,
    verify_signature,
)
from rollshare.net.p2p import GossipLimits, P2PError, P2PHost

TOPIC = "rollshare/test"
WAIT_S = 15  # upper bound for any single wait; the happy path takes well under a second


def new_p2p_host(**kw) -> P2PHost:
    return P2PHost(create_new_key_pair(), **kw)


class Inbox:
    """A handler that records (sender, data) and wakes a waiter once `expected` arrived."""

    def __init__(self, expected: int = 1) -> None:
        self.expected = expected
        self.items: list[tuple[str, bytes]] = []
        self.full = trio.Event()

    def __call__(self, sender: str, data: bytes) -> None:
        self.items.append((sender, data))
        if len(self.items) >= self.expected:
            self.full.set()

    async def wait(self, timeout: float = WAIT_S) -> None:
        with trio.fail_after(timeout):
            await self.full.wait()


# ----------------------------------------------------------------------------- identity


def test_identity_persists_across_reload_with_mode_0600(tmp_path):
    path = tmp_path / "keys" / "node.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(path)
    assert peer_id_of(again) == peer_id_of(first)
    assert peer_id_of(first).startswith("12D3KooW")
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp files left


def test_identity_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "node.key"
    keygen(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)


def test_identity_file_with_garbage_is_refused_not_replaced(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="does not hold a libp2p private key"):
        load_or_create_identity(path)
    assert path.read_bytes() == b"not a key"


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "node.key"
    first = keygen(path)
    with pytest.raises(IdentityError, match="already exists"):
        keygen(path)
    second = keygen(path, force=True)
    assert peer_id_of(second) != peer_id_of(first)
    assert peer_id_of(load_or_create_identity(path)) == peer_id_of(second)


def test_signature_verifies_only_for_its_key_and_data(tmp_path):
    alice, mallory = keygen(tmp_path / "a.key"), keygen(tmp_path / "m.key")
    pub = alice.public_key.serialize()
    sig = sign(alice, b"payload")
    assert verify_signature(pub, b"payload", sig)
    assert not verify_signature(pub, b"payload!", sig)
    assert not verify_signature(mallory.public_key.serialize(), b"payload", sig)
    assert not verify_signature(b"garbage", b"payload", sig)
    assert not verify_signature(pub, b"payload", b"short")
    assert peer_id_from_public_key(pub) == peer_id_of(alice)
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"garbage")


# ----------------------------------------------------------------------------- bridge


async def trio_add(a: int, b: int) -> int:
    await trio.sleep(0)
    return a + b


async def trio_fail() -> None:
    await trio.sleep(0)
    raise KeyError("from trio")


def test_bridge_runs_a_trio_function_from_asyncio_and_returns_its_result():
    async def main() -> None:
        guest = TrioGuest()
        await guest.start()
        try:
            assert await guest.call(trio_add, 2, 3) == 5
            with pytest.raises(KeyError, match="from trio"):
                await guest.call(trio_fail)
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="within 0.2 s"):
                await guest.call(trio.sleep, 30, timeout=0.2)
            assert time.monotonic() - started < 2
            assert await guest.call(trio_add, 1, 1) == 2  # still serving after errors
        finally:
            await guest.stop()

    asyncio.run(main())


def test_bridge_lets_trio_code_await_an_asyncio_coroutine():
    async def double_on_asyncio(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def main() -> None:
        guest = TrioGuest()
        await guest.start()

        async def on_trio() -> int:
            return await guest.call_asyncio(double_on_asyncio, 21)

        try:
            assert await guest.call(on_trio) == 42
        finally:
            await guest.stop()

    asyncio.run(main())


def test_bridge_stop_cancels_every_task_and_leaves_nothing_running():
    trio_task_cancelled = []

    async def service(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started("ready")
        try:
            await trio.sleep_forever()
        finally:
            trio_task_cancelled.append(True)

    async def main() -> None:
        guest = TrioGuest()
        assert await guest.start(service) == "ready"
        call_started = asyncio.Event()

        async def long_trio_call() -> None:
            guest.call_soon_asyncio(call_started.set)
            await trio.sleep_forever()

        in_flight = asyncio.ensure_future(guest.call(long_trio_call, timeout=60))
        await asyncio.wait_for(call_started.wait(), 5)
        await guest.stop(timeout=5)
        await guest.wait()  # already ended, cleanly
        with pytest.raises(GuestStopped):
            await in_flight
        assert not guest.running
        assert trio_task_cancelled == [True]
        assert asyncio.all_tasks() == {asyncio.current_task()}
        with pytest.raises(GuestStopped):
            await guest.call(trio_add, 1, 2)
        await guest.stop()  # idempotent

    asyncio.run(main())


def test_bridge_reports_a_crashed_guest_to_asyncio():
    async def crashes_after_start(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(0)
        raise RuntimeError("libp2p side died")

    async def main() -> None:
        guest = TrioGuest()
        await guest.start(crashes_after_start)
        with pytest.raises(GuestStopped) as info:
            await asyncio.wait_for(guest.wait(), 5)
        assert "libp2p side died" in repr(info.value.__cause__)
        with pytest.raises(GuestStopped):
            await guest.call(trio_add, 1, 2)

    asyncio.run(main())


# ----------------------------------------------------------------------------- hosts


def test_three_hosts_connect_form_a_mesh_and_deliver_a_message():
    """B and C only know A; a message from B reaches A directly and C through A."""

    async def main() -> None:
        a, b, c = new_p2p_host(), new_p2p_host(), new_p2p_host()
        async with a.running(), b.running(), c.running():
            assert a.listen_addrs()[0].endswith(f"/p2p/{a.peer_id}")
            assert "/tcp/0/" not in a.listen_addrs()[0]  # the real port, not 0
            inbox = {h.peer_id: Inbox() for h in (a, b, c)}
            for h in (a, b, c):
                await h.subscribe(TOPIC, inbox[h.peer_id])
            assert await b.connect(a.listen_addrs()[0], timeout=WAIT_S) == a.peer_id
            assert await c.connect(a.listen_addrs()[0], timeout=WAIT_S) == a.peer_id
            for x, y in ((a, b), (a, c), (b, a), (c, a)):
                await x.wait_for_mesh(y.peer_id, TOPIC, timeout=WAIT_S)
            assert sorted(a.peers()) == sorted([b.peer_id, c.peer_id])

            await b.publish(TOPIC, b"hello swarm")
            await inbox[a.peer_id].wait()
            await inbox[c.peer_id].wait()
            assert inbox[a.peer_id].items == [(b.peer_id, b"hello swarm")]
            assert inbox[c.peer_id].items == [(b.peer_id, b"hello swarm")]  # author, not relay
            assert inbox[b.peer_id].items == []  # our own publishes are not handed back

    trio.run(main)


def test_burst_of_200_messages_of_10_kb_arrives_complete():
    """py-libp2p's defaults deliver ~10 of these (spam limiter 10/s, queues of 32)."""
    n, size = 200, 10 * 1024

    async def main() -> None:
        sender, receiver = new_p2p_host(), new_p2p_host()
        async with sender.running(), receiver.running():
            inbox = Inbox(expected=n)
            await receiver.subscribe(TOPIC, inbox)
            await sender.subscribe(TOPIC, Inbox())
            await receiver.connect(sender.listen_addrs()[0], timeout=WAIT_S)
            await sender.wait_for_mesh(receiver.peer_id, TOPIC, timeout=WAIT_S)

            started = time.monotonic()
            for i in range(n):
                await sender.publish(TOPIC, i.to_bytes(4, "big") + bytes(size - 4))
            await inbox.wait(timeout=30)
            elapsed = time.monotonic() - started
            indices = [int.from_bytes(d[:4], "big") for _, d in inbox.items]
            assert sorted(indices) == list(range(n))
            assert all(len(d) == size for _, d in inbox.items)
            print(f"burst: {n} x {size} B delivered in {elapsed:.2f} s ({n / elapsed:.0f} msg/s)")

    trio.run(main)


def test_publishing_faster_than_the_spam_limit_waits_instead_of_dropping():
    """py-libp2p's spam limiter also counts our own publishes and drops them silently."""
    limits = GossipLimits(msgs_per_s_per_peer_topic=20)
    n = 30

    async def main() -> None:
        sender, receiver = new_p2p_host(limits=limits), new_p2p_host()
        async with sender.running(), receiver.running():
            inbox = Inbox(expected=n)
            await receiver.subscribe(TOPIC, inbox)
            await sender.subscribe(TOPIC, Inbox())
            await receiver.connect(sender.listen_addrs()[0], timeout=WAIT_S)
            await sender.wait_for_mesh(receiver.peer_id, TOPIC, timeout=WAIT_S)
            started = time.monotonic()
            for i in range(n):
                await sender.publish(TOPIC, i.to_bytes(4, "big"))
            assert time.monotonic() - started >= 0.5  # paced: at most 19 per second
            await inbox.wait()
            assert sorted(int.from_bytes(d, "big") for _, d in inbox.items) == list(range(n))

    trio.run(main)


def test_rejected_messages_are_logged_counted_and_the_host_keeps_working(caplog):
    async def main() -> None:
        sender = new_p2p_host()
        receiver = new_p2p_host(limits=GossipLimits(max_message_bytes=4096))
        async with sender.running(), receiver.running():
            rejections = 0
            all_rejected = trio.Event()

            def validator(peer: str, data: bytes) -> str | None:
                nonlocal rejections
                assert peer == sender.peer_id
                if data.startswith(b"good"):
                    return None
                rejections += 1
                if rejections == 2:
                    all_rejected.set()
                if data.startswith(b"boom"):
                    raise RuntimeError("validator bug")
                return "bad_payload"

            inbox = Inbox(expected=1)
            receiver.set_validator(TOPIC, validator)
            await receiver.subscribe(TOPIC, inbox)
            await sender.subscribe(TOPIC, Inbox())
            await receiver.connect(sender.listen_addrs()[0], timeout=WAIT_S)
            await sender.wait_for_mesh(receiver.peer_id, TOPIC, timeout=WAIT_S)

            await sender.publish(TOPIC, b"bad one")
            await sender.publish(TOPIC, b"boom")
            await sender.publish(TOPIC, b"x" * 5000)  # over the receiver's 4096-byte cap
            with trio.fail_after(WAIT_S):
                await all_rejected.wait()
            await sender.publish(TOPIC, b"good one")
            await inbox.wait()
            assert inbox.items == [(sender.peer_id, b"good one")]
            assert receiver.rejected == {
                (TOPIC, "bad_payload"): 1,
                (TOPIC, "validator_error"): 1,
                (TOPIC, "too_large"): 1,
            }
            with pytest.raises(ValueError, match="exceeds the 4096-byte gossip limit"):
                await receiver.publish(TOPIC, b"x" * 5000)

    with caplog.at_level(logging.WARNING, logger="rollshare.p2p"):
        trio.run(main)
    reasons = [r.getMessage() for r in caplog.records if r.name == "rollshare.p2p"]
    assert any("bad_payload" in m for m in reasons)
    assert any("validator_error" in m and "validator bug" in m for m in reasons)
    assert any("too_large (5000 > 4096 bytes)" in m for m in reasons)


def test_plaintext_only_peer_cannot_connect():
    async def main() -> None:
        ours = new_p2p_host()
        kp = create_new_key_pair()
        plaintext = new_host(
            key_pair=kp,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        )
        listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
        async with ours.running(), plaintext.run(listen_addrs=[listen]):
            with pytest.raises(SwarmException), trio.fail_after(WAIT_S):
                await plaintext.connect(info_from_p2p_addr(multiaddr.Multiaddr(ours.listen_addrs()[0])))
            with pytest.raises(P2PError):
                await ours.connect(str(plaintext.get_addrs()[0]), timeout=5)
            assert ours.peers() == []

    trio.run(main)


def test_connecting_to_a_closed_port_fails_fast_with_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ghost = peer_id_of(create_new_key_pair())

    async def main() -> None:
        host = new_p2p_host()
        async with host.running():
            started = time.monotonic()
            with pytest.raises(P2PError, match=f"127.0.0.1/tcp/{port}"):
                await host.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}", timeout=5)
            assert time.monotonic() - started < 6
            with pytest.raises(P2PError, match="not a peer address"):
                await host.connect("/ip4/127.0.0.1/tcp/1")
            assert await host.bootstrap([f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}"], timeout=5) == []

    trio.run(main)


def test_listening_on_a_taken_port_fails_with_a_clear_error():
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            host = new_p2p_host(listen_port=taken.getsockname()[1])
            async with trio.open_nursery() as nursery:
                with pytest.raises(P2PError, match="port is taken"):
                    await nursery.start(host.run)

    trio.run(main)


def test_mdns_hosts_on_one_machine_find_each_other():
    async def main() -> None:
        a, b = new_p2p_host(enable_mdns=True), new_p2p_host(enable_mdns=True)
        async with a.running(), b.running():
            await a.wait_for_peer(b.peer_id, timeout=WAIT_S)  # ~3.5 s measured
            assert b.peer_id in a.peers()

    trio.run(main)


def test_two_hosts_gossip_from_an_asyncio_program_through_the_bridge():
    """The shape the node uses: asyncio main, libp2p as a trio guest, messages into asyncio."""

    async def main() -> None:
        guest = TrioGuest()
        await guest.start()
        received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        try:
            a, b = new_p2p_host(), new_p2p_host()  # built on the asyncio side
            await guest.start_task(a.run)
            await guest.start_task(b.run)
            await guest.call(b.subscribe, TOPIC, lambda peer, data: guest.call_soon_asyncio(
                received.put_nowait, (peer, data)))
            await guest.call(a.subscribe, TOPIC, lambda peer, data: None)
            await guest.call(b.connect, a.listen_addrs()[0])
            await guest.call(a.wait_for_mesh, b.peer_id, TOPIC)
            await guest.call(a.publish, TOPIC, b"from asyncio")
            assert await asyncio.wait_for(received.get(), WAIT_S) == (a.peer_id, b"from asyncio")
            await guest.call(a.close)
            await guest.call(b.close)
        finally:
            await guest.stop(timeout=10)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())
