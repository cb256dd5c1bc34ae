"""The libp2p host: TCP + Noise + yamux, and GossipSub v1.1 with limits we chose on purpose.

What it does. `P2PHost` wraps one py-libp2p host. It listens on TCP, secures every
connection with Noise (nothing else is offered, so a plaintext or SECIO peer cannot
connect), multiplexes streams with yamux, and runs GossipSub v1.1 with strict message
signing: every message carries its author's signature and is checked on arrival. A
per-topic validator (`set_validator`) gets the author's peer id and the payload and returns
a rejection reason or None; rejected messages are logged, counted in `rejected`, and not
forwarded. Handlers (`subscribe`) see only messages that passed validation and that some
other peer wrote.

Why the limits. py-libp2p's defaults lose messages without telling anyone (measured: a
burst of 1000 x 10 KB arrived 32 at a time while `publish()` reported success). Each
default is replaced by a named field of `GossipLimits`; the docstring there says where it
lives inside py-libp2p and how it is lifted.

Where it runs. Everything here is trio code and must run inside a trio run; from asyncio,
go through `rollshare.net.bridge.TrioGuest` (`await guest.start_task(host.run)`, then
`await guest.call(host.publish, topic, data)`). Handlers and validators run on the trio
side and must be quick and non-blocking: hand work to a queue.

This module never touches torch, gRPC or the round loop; it moves opaque bytes.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import multiaddr
import trio
from multiaddr.utils import get_network_addrs
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from .identity import peer_id_of

__all__ = ["GossipLimits", "Handler", "P2PError", "P2PHost", "Validator", "route_libp2p_logs"]

log = logging.getLogger("rollshare.p2p")

Handler = Callable[[str, bytes], Awaitable[None] | None]
"""Called with (sender_peer_id, data) for each accepted message from another peer."""

Validator = Callable[[str, bytes], str | None]
"""Called with (sender_peer_id, data); returns a short, stable rejection reason or None."""

# GossipSub mesh degree (D, D_low, D_high): the spec's defaults.
MESH_DEGREE, MESH_DEGREE_LOW, MESH_DEGREE_HIGH = 6, 4, 12
# Room for the RPC envelope around a payload (topic, seqno, from, key, signature, record).
RPC_OVERHEAD_BYTES = 64 * 1024


def route_libp2p_logs(level: int = logging.WARNING) -> None:
    """Send py-libp2p's log records through the application's logging set-up.

    Importing libp2p detaches its "libp2p" logger (no handler, propagate=False) unless
    LIBP2P_DEBUG is set, so its warnings reach stderr unformatted through Python's
    last-resort handler, and one module (auto_connector) pins itself to INFO. Call this
    once at start-up, after configuring logging, to treat libp2p like any other library.
    """
    root = logging.getLogger("libp2p")
    root.propagate = True
    root.setLevel(level)
    for name, child in logging.Logger.manager.loggerDict.items():
        if name.startswith("libp2p.") and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)  # inherit `level`


class P2PError(Exception):
    """A network operation failed; the message says what happened and what to try."""


@dataclass(frozen=True)
class GossipLimits:
    """Every queue and rate limit on the gossip path, with py-libp2p's default beside it.

    max_message_bytes: largest payload we publish or accept (py-libp2p: 1 MiB RPC frame).
        Enforced by `publish()` (ValueError) and by the topic validator (reason
        "too_large"); the RPC frame limits, in and out, are set to this plus
        RPC_OVERHEAD_BYTES so that py-libp2p never drops a message we accept.
    outbound_queue: RPCs queued per peer before new ones are dropped (py-libp2p: 32;
        `rpc_queue.OutBoundQueueSize`, bound as a default argument when the module loads, so
        it cannot be changed by assignment nor passed to a constructor). We resize each
        peer's queue as Pubsub registers it (see `_SizedPeerQueues`).
    subscriber_queue: accepted messages buffered per topic between pubsub and our handler
        dispatcher (py-libp2p: 32, module global `pubsub.SUBSCRIPTION_CHANNEL_SIZE`, read
        when a topic is subscribed; we set it just before each subscribe).
    msgs_per_s_per_peer_topic: spam limiter, messages per second per forwarding peer and
        topic (py-libp2p: 10, GossipSub `max_messages_per_topic_per_second`). It also counts
        our own publishes; `publish()` paces itself below it instead of being dropped.
    pending_per_peer: messages held for a peer whose identify/subscription is not yet
        complete (py-libp2p: 100, GossipSub `max_pending_messages_per_peer`).
    """

    max_message_bytes: int = 1024 * 1024
    outbound_queue: int = 4096
    subscriber_queue: int = 4096
    msgs_per_s_per_peer_topic: float = 1000.0
    pending_per_peer: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "outbound_queue", "subscriber_queue", "pending_per_peer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GossipLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.msgs_per_s_per_peer_topic < 2:
            raise ValueError(
                f"GossipLimits.msgs_per_s_per_peer_topic must be >= 2, "
                f"got {self.msgs_per_s_per_peer_topic}"
            )

    @property
    def max_rpc_bytes(self) -> int:
        """Frame limit for one pubsub RPC, in and out."""
        return self.max_message_bytes + RPC_OVERHEAD_BYTES


def _local_ipv4_addresses() -> list[str]:
    try:
        found = get_network_addrs(4) or []
    except Exception:
        found = []
    return ["127.0.0.1"] + [ip for ip in found if ip != "127.0.0.1"]


def _port_is_free(host: str, port: int) -> bool:
    """True if nobody listens on host:port (port 0 always is). Unlike py-libp2p's own
    listener, the probe sets no SO_REUSEPORT, so it fails on a port another node holds;
    SO_REUSEADDR lets it ignore connections of a previous run still in TIME_WAIT."""
    if port == 0:
        return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class _SizedPeerQueues(dict[ID, RpcQueue]):
    """`Pubsub.peer_queues` that resizes each per-peer RpcQueue when it is registered.

    `Pubsub._handle_new_peer` does `queue = RpcQueue(); self.peer_queues[peer] = queue`
    before anything is pushed, so resizing in `__setitem__` covers every RPC.
    """

    def __init__(self, max_size: int, max_message_size: int) -> None:
        super().__init__()
        self.max_size = max_size
        self.max_message_size = max_message_size

    def __setitem__(self, peer_id: ID, queue: RpcQueue) -> None:
        queue._queue.max_size = self.max_size  # PriorityQueue bound (default 32)
        queue.max_message_size = self.max_message_size  # split/oversize threshold
        super().__setitem__(peer_id, queue)


class _LimitedPubsub(Pubsub):
    """Pubsub with our queue sizes, and a guard so no single message can stop the service."""

    def __init__(self, host: Any, router: GossipSub, limits: GossipLimits) -> None:
        super().__init__(
            host,
            router,
            strict_signing=True,
            max_inbound_rpc_size=limits.max_rpc_bytes,
        )
        self._limits = limits
        self.peer_queues = _SizedPeerQueues(limits.outbound_queue, limits.max_rpc_bytes)

    async def subscribe(self, topic_id: str) -> Any:
        # Read by Pubsub.subscribe before its first await, so this value is the one used.
        _pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = self._limits.subscriber_queue
        return await super().subscribe(topic_id)

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        # Runs as a service task per received message; an exception here (e.g. a
        # malformed key that fails to deserialize) would cancel the whole pubsub service.
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception:
            if msg_forwarder == self.my_id:
                raise  # our own publish: let publish() report it
            log.warning("dropped a malformed message forwarded by %s", msg_forwarder, exc_info=True)


class P2PHost:
    """One libp2p node: listen, connect, gossip. Trio-side; see the module docstring.

    Lifecycle: `await nursery.start(host.run)` (or `async with host.running():`) starts it
    and returns once it listens; `await host.close()` stops it and waits until it stopped.
    """

    def __init__(
        self,
        keypair: KeyPair,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        limits: GossipLimits | None = None,
        heartbeat_s: float = 1.0,
        enable_mdns: bool = False,
        connect_timeout: float = 10.0,
    ) -> None:
        self.keypair = keypair
        self.peer_id = peer_id_of(keypair)
        self.limits = limits or GossipLimits()
        self.connect_timeout = connect_timeout
        self.rejected: collections.Counter[tuple[str, str]] = collections.Counter()
        """Rejected messages by (topic, reason)."""

        self._listen_host, self._listen_port = listen_host, listen_port
        ip = "ip6" if ":" in listen_host else "ip4"
        self._listen = multiaddr.Multiaddr(f"/{ip}/{listen_host}/tcp/{listen_port}")
        self._enable_mdns = enable_mdns
        self._handlers: dict[str, Handler] = {}
        self._validators: dict[str, Validator] = {}
        self._own_publish_times: dict[str, collections.deque[float]] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self._finished = trio.Event()
        self._started = False

        # Noise is the only security protocol offered: py-libp2p's default also accepts
        # plaintext and SECIO. Yamux is the only muxer.
        noise = NoiseTransport(keypair, noise_privkey=create_x25519_key_pair().private_key)
        self._host = new_host(
            key_pair=keypair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            listen_addrs=[self._listen],
            enable_mDNS=enable_mdns,
        )
        self._router = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=MESH_DEGREE,
            degree_low=MESH_DEGREE_LOW,
            degree_high=MESH_DEGREE_HIGH,
            heartbeat_interval=heartbeat_s,  # py-libp2p default: 120 s
            # "Adaptive gossip" rewrites heartbeat_interval to 30-60 s when it judges the
            # network unhealthy (few mesh peers): it would undo the 1 s heartbeat.
            adaptive_gossip_enabled=False,
            spam_protection_enabled=True,
            max_messages_per_topic_per_second=self.limits.msgs_per_s_per_peer_topic,
            max_pending_messages_per_peer=self.limits.pending_per_peer,
        )
        self._pubsub = _LimitedPubsub(self._host, self._router, self.limits)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until `close()`; `task_status.started(self)` once listening."""
        if self._started:
            raise RuntimeError("P2PHost.run() can only be called once; make a new P2PHost")
        self._started = True
        listening = False
        try:
            # py-libp2p listens with SO_REUSEPORT, so a second node on a taken port would
            # share it silently (the kernel splits incoming connections between the two)
            if _port_is_free(self._listen_host, self._listen_port):
                async with self._host.run(listen_addrs=[self._listen]):
                    # py-libp2p logs a failed listen (port taken, foreign address) and carries
                    # on without listening; we stop instead (and raise below, outside libp2p's
                    # nurseries, so the error is not wrapped in exception groups).
                    listening = bool(self._host.get_transport_addrs())
                    if listening:
                        await self._serve(task_status)
        finally:
            self._nursery = None
            self._stop_seen_cache()
            self._finished.set()
        if not listening:
            raise P2PError(
                f"could not listen on {self._listen}: the port is taken or the address is "
                f"not on this machine; pick another port (0 = any free port)"
            )

    async def _serve(self, task_status: Any) -> None:
        async with background_trio_service(self._pubsub), background_trio_service(self._router):
            await self._pubsub.wait_until_ready()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._host.get_peerstore().start_cleanup_task, 60)
                if self._enable_mdns:
                    await nursery.start(self._connect_discovered_peers)
                log.info("p2p host %s listening on %s", self.peer_id, self.listen_addrs())
                task_status.started(self)
                await self._closing.wait()
                nursery.cancel_scope.cancel()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the host (connections, services, handler tasks) and wait until it stopped."""
        self._closing.set()
        if not self._started:
            self._stop_seen_cache()
            return
        with trio.move_on_after(timeout) as cs:
            await self._finished.wait()
        if cs.cancelled_caught:
            log.warning("p2p host %s did not stop within %g s", self.peer_id, timeout)

    def _stop_seen_cache(self) -> None:
        # Pubsub's seen-message cache starts a sweeper thread in its constructor that nothing
        # in py-libp2p ever stops: without this, every host leaks a thread for the process's life.
        self._pubsub.seen_messages.stop()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[P2PHost]:
        """`async with host.running():` runs the host for the duration of the block."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                await self.close()

    # ------------------------------------------------------------------ addresses and peers

    def listen_addrs(self) -> list[str]:
        """Multiaddrs others can dial, each ending in /p2p/<our peer id>.

        A wildcard listen address (0.0.0.0) is expanded to this machine's IPv4 addresses
        and 127.0.0.1; py-libp2p itself reports 0.0.0.0, which nobody can dial.
        """
        out: list[str] = []
        for addr in map(str, self._host.get_addrs()):
            if addr.startswith("/ip4/0.0.0.0/"):
                out += [addr.replace("0.0.0.0", ip, 1) for ip in _local_ipv4_addresses()]
            else:
                out.append(addr)
        return out

    def peers(self) -> list[str]:
        """Peer ids we hold a connection to."""
        return [p.to_base58() for p in self._host.get_connected_peers()]

    def topic_peers(self, topic: str) -> list[str]:
        """Connected peers that told us they subscribe to `topic`."""
        return [p.to_base58() for p in self._pubsub.peer_topics.get(topic, ())]

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers in our GossipSub mesh for `topic` (we send them full messages)."""
        return [p.to_base58() for p in self._router.mesh.get(topic, ())]

    async def wait_for_peer(self, peer_id: str, timeout: float = 10.0) -> None:
        """Wait until we hold a pubsub stream to `peer_id`; TimeoutError after `timeout`."""
        try:
            await self._pubsub.wait_for_peer(ID.from_base58(peer_id), timeout=timeout)
        except trio.TooSlowError:
            raise TimeoutError(f"peer {peer_id} did not connect within {timeout:g} s") from None

    async def wait_for_mesh(self, peer_id: str, topic: str, timeout: float = 10.0) -> None:
        """Wait until `peer_id` is in our mesh for `topic`; TimeoutError after `timeout`."""
        try:
            await self._pubsub.wait_for_mesh(ID.from_base58(peer_id), topic, timeout=timeout)
        except trio.TooSlowError:
            raise TimeoutError(
                f"peer {peer_id} did not join our mesh for topic {topic!r} within {timeout:g} s"
            ) from None

    async def connect(self, addr: str, timeout: float | None = None) -> str:
        """Dial a peer by multiaddr (/ip4/HOST/tcp/PORT/p2p/PEERID); return its peer id."""
        self._require_running()
        timeout = self.connect_timeout if timeout is None else timeout
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as e:
            raise P2PError(
                f"{addr!r} is not a peer address like /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...: {e}"
            ) from None
        if info.peer_id == self._host.get_id():
            raise P2PError(f"{addr} is this node's own address")
        with trio.move_on_after(timeout) as cs:
            try:
                await self._host.connect(info)
            except Exception as e:
                raise P2PError(
                    f"could not connect to peer {addr}: {e}; check the address and that the "
                    f"peer speaks Noise + yamux"
                ) from e
        if cs.cancelled_caught:
            raise P2PError(
                f"peer {addr} did not answer within {timeout:g} s; check the address or start "
                f"without it"
            )
        return info.peer_id.to_base58()

    async def bootstrap(self, addrs: Iterable[str], timeout: float | None = None) -> list[str]:
        """Connect to each bootstrap address concurrently; return the peer ids reached.

        Failures are logged (one line each), not raised: a node may start before its
        bootstrap peers do. An empty result means we are alone.
        """
        reached: list[str] = []

        async def one(addr: str) -> None:
            try:
                reached.append(await self.connect(addr, timeout))
            except P2PError as e:
                log.warning("bootstrap: %s", e)

        async with trio.open_nursery() as nursery:
            for addr in addrs:
                nursery.start_soon(one, addr)
        return reached

    # ------------------------------------------------------------------ gossip

    def set_validator(self, topic: str, fn: Validator | None) -> None:
        """Install (or with None, remove) the validator for `topic`.

        `fn(sender_peer_id, data)` returns None to accept or a short, stable reason string
        to reject (it is a key of `rejected`). It runs on the trio side for every new
        message from another peer, after the size check and signature check, and must be
        quick. An exception counts as a rejection ("validator_error"); it never stops the host.
        """
        if fn is None:
            self._validators.pop(topic, None)
        else:
            self._validators[topic] = fn

    async def subscribe(self, topic: str, handler: Handler) -> None:
        """Receive `topic`: `handler(sender_peer_id, data)` for each accepted message.

        The handler may be a plain function or a coroutine function; messages of one topic
        are handled one at a time, in arrival order. A slow handler backs up into the
        subscriber queue (GossipLimits.subscriber_queue) and then loses messages, so hand
        the work to a queue. Handler exceptions are logged and skipped.
        """
        nursery = self._require_running()
        if topic in self._handlers:
            raise ValueError(f"already subscribed to {topic!r}")
        self._pubsub.set_topic_validator(topic, functools.partial(self._validate, topic), False)
        self._handlers[topic] = handler
        try:
            subscription = await self._pubsub.subscribe(topic)
        except BaseException:
            del self._handlers[topic]
            raise
        nursery.start_soon(self._dispatch, topic, subscription)

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving `topic` (its dispatcher task ends)."""
        if self._handlers.pop(topic, None) is not None:
            self._pubsub.remove_topic_validator(topic)
            await self._pubsub.unsubscribe(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and send `data` to the peers of `topic`.

        Raises ValueError if `data` exceeds GossipLimits.max_message_bytes. Above the spam
        limit (GossipLimits.msgs_per_s_per_peer_topic) this waits instead of letting
        py-libp2p drop the message silently. Delivery is best effort: gossip does not
        confirm receipt.
        """
        self._require_running()
        if len(data) > self.limits.max_message_bytes:
            raise ValueError(
                f"message of {len(data)} bytes for topic {topic!r} exceeds the "
                f"{self.limits.max_message_bytes}-byte gossip limit; send a digest and let "
                f"peers fetch the body"
            )
        await self._pace_own_publish(topic)
        await self._pubsub.publish(topic, data)

    # ------------------------------------------------------------------ internals

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None or self._closing.is_set():
            raise P2PError("the p2p host is not running; start it with run() first")
        return self._nursery

    async def _pace_own_publish(self, topic: str) -> None:
        """Keep our own publish rate under the spam limiter, which counts us too."""
        allowed = int(self.limits.msgs_per_s_per_peer_topic) - 1
        window = self._own_publish_times.setdefault(topic, collections.deque())
        while True:
            now = time.time()  # the limiter's clock
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) < allowed:
                window.append(now)
                return
            await trio.sleep(window[0] + 1.0 - now + 0.001)

    def _validate(self, topic: str, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """The pubsub topic validator: size cap, then the user's validator. Never raises."""
        try:
            sender = ID(msg.from_id).to_base58()
        except Exception:
            return self._reject(topic, "unknown", forwarder, "bad_sender_id")
        if sender == self.peer_id:
            return True  # our own publish; publish() already checked it
        if len(msg.data) > self.limits.max_message_bytes:
            return self._reject(
                topic, sender, forwarder, "too_large",
                f"{len(msg.data)} > {self.limits.max_message_bytes} bytes",
            )
        fn = self._validators.get(topic)
        if fn is None:
            return True
        try:
            reason = fn(sender, msg.data)
        except Exception as e:
            return self._reject(topic, sender, forwarder, "validator_error", repr(e))
        if reason is None:
            return True
        return self._reject(topic, sender, forwarder, str(reason))

    def _reject(self, topic: str, sender: str, forwarder: ID, reason: str, detail: str = "") -> bool:
        self.rejected[(topic, reason)] += 1
        via = "" if forwarder.to_base58() == sender else f" via {forwarder.to_base58()}"
        log.warning(
            "rejected message on %r from %s%s: %s%s",
            topic, sender, via, reason, f" ({detail})" if detail else "",
        )
        return False

    async def _dispatch(self, topic: str, subscription: Any) -> None:
        """Hand each accepted message of `topic` to its handler, one at a time."""
        async for msg in subscription:  # ends when unsubscribed
            sender = ID(msg.from_id).to_base58()
            if sender == self.peer_id:
                continue  # pubsub also delivers our own publishes to us
            handler = self._handlers.get(topic)
            if handler is None:
                return
            try:
                result = handler(sender, msg.data)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("handler for topic %r failed on a message from %s", topic, sender)

    async def _connect_discovered_peers(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """mDNS: connect to peers announced on the local network.

        py-libp2p reports discoveries from zeroconf's own thread through a process-wide
        handler list; the handler only passes the PeerInfo into trio through a channel.
        """
        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[PeerInfo](64)

        def enqueue(info: PeerInfo) -> None:
            try:
                send.send_nowait(info)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass

        def on_discovered(info: PeerInfo) -> None:  # zeroconf thread
            try:
                token.run_sync_soon(enqueue, info)
            except trio.RunFinishedError:
                pass

        peerDiscovery.register_peer_discovered_handler(on_discovered)
        try:
            task_status.started()
            async with receive:
                async for info in receive:
                    if info.peer_id == self._host.get_id() or info.peer_id in self._host.get_connected_peers():
                        continue
                    with trio.move_on_after(self.connect_timeout):
                        try:
                            await self._host.connect(info)
                            log.info("mdns: connected to %s", info.peer_id)
                        except Exception as e:
                            log.info("mdns: could not connect to %s: %s", info.peer_id, e)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(on_discovered)
            send.close()
