"""The gRPC transport: a grpc.aio server for the `Rollouts` service, and a client for it.

Bulk movement of rollout groups runs over gRPC (libp2p only carries small announcements):

- Fetch: the caller names up to `max_fetch_ids` (1024) content ids; the server streams signed
  envelopes (see envelope.py) carrying the groups it holds, split to fit the message cap, and
  stops when the caller's deadline has passed. Envelopes are sent as the index builds them from
  stored bytes (no parse, no re-encoding), `fetch_read_ids` ids at a time on the event loop: a
  hand-off to a worker thread costs more than such a read, and memory stays bounded however
  many ids are asked for.
- Reconcile: both phases of reconcile.py's protocol, answered from what this node can serve.
- Info / Status: whatever the node's callbacks return (UNIMPLEMENTED when none is given).

The server also runs the standard health service (grpc.health.v1, "rollshare.v1.Rollouts"
SERVING until `stop`) and server reflection. Message sizes and concurrency are capped by
`ServerLimits`. The client (`RolloutsClient`) puts a timeout on every call and turns gRPC
failures into `RpcFailed` with a message that names the peer and what to check.

This module never decides whether an envelope is trustworthy (envelope.py does), and never
touches torch or the round loop.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rollshare.net import reconcile as rec
from rollshare.net.envelope import (UNREQUESTED, EnvelopeIndex, EnvelopeLimits, Rejected, VerifiedEnvelope,
                                   verify_envelope)
from rollshare.proto import wire_pb2 as wire
from rollshare.proto import wire_pb2_grpc as wire_grpc

SERVICE_NAME = wire.DESCRIPTOR.services_by_name["Rollouts"].full_name  # "rollshare.v1.Rollouts"
_FETCH_METHOD = f"/{SERVICE_NAME}/Fetch"
_MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Caps of the gRPC server (and the matching client), all in one place."""

    max_message_bytes: int = 16 * _MiB   # receive and send, both directions
    max_concurrent_streams: int = 32     # HTTP/2 streams per connection
    max_concurrent_rpcs: int = 128       # whole server; beyond this calls fail RESOURCE_EXHAUSTED
    max_fetch_ids: int = 1024            # ids per FetchRequest (wire.proto)
    #: Fetch reads the requested groups from SQLite this many ids at a time, on the event loop,
    #: as it streams them (about a millisecond a step for 10 KB groups)
    fetch_read_ids: int = 64
    envelope_bytes: int = EnvelopeLimits.max_envelope_bytes  # Fetch splits envelopes to fit
    reconcile: rec.ReconcileLimits = field(default_factory=rec.ReconcileLimits)

    def __post_init__(self):
        if self.envelope_bytes > self.max_message_bytes:
            raise ValueError("ServerLimits.envelope_bytes must not exceed max_message_bytes")


InfoFn = Callable[[], "wire.PeerInfo | Awaitable[wire.PeerInfo]"]
StatusFn = Callable[[], "wire.NodeStatus | Awaitable[wire.NodeStatus]"]


async def _call(fn: Callable):
    out = fn()
    return await out if inspect.isawaitable(out) else out


class RolloutsServicer(wire_grpc.RolloutsServicer):
    """Answers Fetch and Reconcile from an EnvelopeIndex; Info and Status from the node's callbacks."""

    def __init__(self, index: EnvelopeIndex, info: InfoFn | None = None, status: StatusFn | None = None,
                 limits: ServerLimits = ServerLimits()):
        self.index = index
        self.info_fn = info
        self.status_fn = status
        self.limits = limits

    async def Fetch(self, request: wire.FetchRequest, context: grpc.aio.ServicerContext):
        ids = list(dict.fromkeys(request.group_ids))
        if len(ids) > self.limits.max_fetch_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(ids)} ids in one Fetch; at most {self.limits.max_fetch_ids}, split the request")
        if any(len(i) != rec.ID_BYTES for i in ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"group ids are {rec.ID_BYTES}-byte sha256 digests")
        read = getattr(self.index, "envelope_bytes_for", None) or self.index.envelopes_for
        step = self.limits.fetch_read_ids
        for i in range(0, len(ids), step):
            for env in read(ids[i:i + step], self.limits.envelope_bytes):
                left = context.time_remaining()
                if left is not None and left <= 0:
                    return  # the caller has given up; gRPC reports DEADLINE_EXCEEDED to it
                yield env

    async def Reconcile(self, request: wire.ReconcileRequest, context: grpc.aio.ServicerContext):
        try:
            return await asyncio.to_thread(rec.respond, request, self.index, self.limits.reconcile)
        except rec.ReconcileError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Info(self, request: wire.StatusRequest, context: grpc.aio.ServicerContext):
        if self.info_fn is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not publish its info")
        return await _call(self.info_fn)

    async def Status(self, request: wire.StatusRequest, context: grpc.aio.ServicerContext):
        if self.status_fn is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not publish its status")
        return await _call(self.status_fn)


def _envelope_bytes(envelope: "bytes | wire.SignedEnvelope") -> bytes:
    """Fetch's response serializer: envelopes built as bytes pass through unchanged."""
    return envelope if isinstance(envelope, bytes) else envelope.SerializeToString()


def _add_rollouts_service(servicer: RolloutsServicer, server: grpc.aio.Server) -> None:
    """wire_pb2_grpc.add_RolloutsServicer_to_server, except that Fetch may yield serialized envelopes."""
    handlers = {
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch, request_deserializer=wire.FetchRequest.FromString, response_serializer=_envelope_bytes),
        "Reconcile": grpc.unary_unary_rpc_method_handler(
            servicer.Reconcile, request_deserializer=wire.ReconcileRequest.FromString,
            response_serializer=wire.ReconcileResponse.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=wire.StatusRequest.FromString,
            response_serializer=wire.PeerInfo.SerializeToString),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=wire.StatusRequest.FromString,
            response_serializer=wire.NodeStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _channel_options(limits: ServerLimits) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes)]


_HEALTH: "weakref.WeakKeyDictionary[grpc.aio.Server, health.aio.HealthServicer]" = weakref.WeakKeyDictionary()


async def start_server(host: str, port: int, index: EnvelopeIndex, info: InfoFn | None = None,
                       status: StatusFn | None = None, limits: ServerLimits = ServerLimits()
                       ) -> tuple[grpc.aio.Server, int]:
    """Start serving Rollouts, health and reflection on host:port (0 = any free port).

    Returns (server, the port actually bound). Stop it with `stop(server, grace)`.
    """
    server = grpc.aio.server(
        options=_channel_options(limits) + [
            ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
            ("grpc.so_reuseport", 0),  # gRPC's default lets a second node silently share our port
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    _add_rollouts_service(RolloutsServicer(index, info, status, limits), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        bound, why = 0, str(e)
    else:
        why = "the port is in use or the address is not local"
    if not bound:
        # grpc.aio keeps its process-wide poller thread while any server object is alive; this
        # frame stays reachable from the traceback, so drop the server before raising
        await server.stop(None)
        del server
        raise OSError(f"cannot listen for gRPC on {address}: {why}; free the port or choose another "
                      "(port 0 picks a free one)")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    _HEALTH[server] = health_servicer
    return server, bound


async def stop(server: grpc.aio.Server, grace: float | None = 1.0) -> None:
    """Report NOT_SERVING, let calls in flight finish for up to `grace` seconds, then stop."""
    health_servicer = _HEALTH.pop(server, None)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)


# ----------------------------------------------------------------------------------- client

class RpcFailed(Exception):
    """A call to a peer failed. `code` is the grpc.StatusCode; the message says what to check."""

    def __init__(self, endpoint: str, method: str, code: grpc.StatusCode, details: str, timeout: float | None):
        self.endpoint, self.method, self.code, self.details = endpoint, method, code, details
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            what = f"did not answer {method} within {timeout:g} s"
        elif code == grpc.StatusCode.UNAVAILABLE:
            what = f"is unavailable for {method} ({details})"
        else:
            what = f"refused {method}: {code.name}: {details}"
        super().__init__(f"peer {endpoint} {what}; check the address and that the node is running")


class RolloutsClient:
    """A client of one peer's Rollouts service. Every call has a timeout; failures raise RpcFailed.

    Use as `async with RolloutsClient("1.2.3.4:5000") as c:` or call `close()`.
    """

    def __init__(self, endpoint: str, limits: ServerLimits = ServerLimits()):
        self.endpoint = endpoint
        self.limits = limits
        self._channel = grpc.aio.insecure_channel(endpoint, options=_channel_options(limits))
        self._stub = wire_grpc.RolloutsStub(self._channel)
        # Fetch responses arrive as raw bytes: envelope.verify_envelope parses hostile input itself
        self._fetch_raw = self._channel.unary_stream(
            _FETCH_METHOD, request_serializer=wire.FetchRequest.SerializeToString, response_deserializer=None)

    async def __aenter__(self) -> "RolloutsClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _failed(self, method: str, e: grpc.aio.AioRpcError, timeout: float | None) -> RpcFailed:
        return RpcFailed(self.endpoint, method, e.code(), e.details() or "", timeout)

    async def fetch(self, ids: Sequence[bytes], timeout: float) -> AsyncIterator[bytes]:
        """Serialized SignedEnvelopes carrying the requested groups the peer holds (unverified).

        Asks in batches of max_fetch_ids; all batches together finish within `timeout`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ids = list(dict.fromkeys(ids))
        step = self.limits.max_fetch_ids
        for i in range(0, len(ids), step):
            call = self._fetch_raw(wire.FetchRequest(group_ids=ids[i:i + step]),
                                   timeout=max(0.001, deadline - loop.time()))
            try:
                async for raw in call:
                    yield raw
            except grpc.aio.AioRpcError as e:
                raise self._failed("Fetch", e, timeout) from None
            finally:
                call.cancel()

    async def fetch_verified(self, ids: Sequence[bytes], timeout: float,
                             limits: EnvelopeLimits = EnvelopeLimits(), expected_sender: str | None = None,
                             on_reject: Callable[[Rejected], None] | None = None
                             ) -> AsyncIterator[VerifiedEnvelope]:
        """Like fetch, but yields only envelopes that pass verify_envelope and carry only requested groups.

        A rejected envelope goes to on_reject (count it against the peer) and the stream goes on;
        without on_reject, Rejected is raised and the fetch ends.
        """
        wanted = set(ids)
        async for raw in self.fetch(ids, timeout):
            try:
                verified = verify_envelope(raw, limits, expected_sender)
                extra = [cid for cid in verified.cids if cid not in wanted]
                if extra:
                    raise Rejected(UNREQUESTED, f"peer {self.endpoint} sent {len(extra)} groups not requested")
            except Rejected as r:
                if on_reject is None:
                    raise
                on_reject(r)
                continue
            wanted.difference_update(verified.cids)  # a group delivered twice is not wanted twice
            yield verified

    async def reconcile(self, source: rec.EntrySource, since_ms: int, bucket_ms: int, timeout: float) -> list[bytes]:
        """Ids the peer holds (created at or after since_ms) that `source` lacks."""
        try:
            return await rec.reconcile_with(self._stub, source, since_ms, bucket_ms, timeout,
                                            self.limits.reconcile)
        except grpc.aio.AioRpcError as e:
            raise self._failed("Reconcile", e, timeout) from None

    async def info(self, timeout: float) -> wire.PeerInfo:
        try:
            return await self._stub.Info(wire.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise self._failed("Info", e, timeout) from None

    async def status(self, timeout: float) -> wire.NodeStatus:
        try:
            return await self._stub.Status(wire.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise self._failed("Status", e, timeout) from None
