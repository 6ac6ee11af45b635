"""gRPC forwarder: one cached channel per (endpoint, credentials version); every call forwarded as raw bytes.

Every method is called as stream-stream with no (de)serialisers: on the wire unary and streaming calls are the
same HTTP/2 exchange, so one bidirectional call carries all four kinds unchanged without knowing the protos.
Channels to mtls/tls endpoints go through a TlsBridge (see grpc_bridge.py for why and how the upstream's SPIFFE ID
is verified); a rotated SVID starts new channels, and old ones get `channel_grace_s` to finish their calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from mesh_gateway.config import GrpcSettings
from mesh_gateway.errors import GatewayError, UpstreamUnavailable
from mesh_gateway.identity.tls import client_context
from mesh_gateway.model import Credentials, Endpoint
from mesh_gateway.upstream.grpc_bridge import TlsBridge
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.upstream.grpc")

Metadata = Sequence[tuple[str, str | bytes]]
_READY = grpc.ChannelConnectivity.READY
_FAILED = grpc.ChannelConnectivity.TRANSIENT_FAILURE
# Codes grpc itself produces when a connection breaks; only these are second-guessed (see UpstreamCall.status).
_TRANSPORT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
if TYPE_CHECKING:
    RawCall = grpc.aio.StreamStreamCall[bytes, bytes]
else:
    RawCall = grpc.aio.StreamStreamCall
_CALL_ENDED = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


@dataclass(frozen=True, slots=True)
class Status:
    code: grpc.StatusCode
    details: str
    trailing_metadata: Metadata


@dataclass(slots=True)
class _Channel:
    channel: grpc.aio.Channel
    bridge: TlsBridge | None
    version: int


class UpstreamCall:
    """One forwarded call. Statuses the upstream sent are reported unchanged; transport failures as GatewayError."""

    def __init__(self, call: RawCall, entry: _Channel, endpoint: Endpoint) -> None:
        self._call = call
        self._bridge = entry.bridge
        self._breaks = entry.bridge.breaks if entry.bridge else 0
        self._endpoint = endpoint
        self.messages_in = 0
        self.messages_out = 0

    async def send_all(self, messages: AsyncIterator[bytes]) -> None:
        """Client → upstream until the client half-closes; stops quietly when the call has already ended."""
        try:
            async for message in messages:
                await self._call.write(message)
                self.messages_in += 1
            await self._call.done_writing()
        except _CALL_ENDED:
            pass  # the call's status says what happened

    async def initial_metadata(self) -> Metadata:
        return tuple(await self._call.initial_metadata())

    async def receive(self) -> AsyncIterator[bytes]:
        while True:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError:
                return  # status() reports it
            if not isinstance(message, bytes):  # grpc.aio.EOF
                return
            self.messages_out += 1
            yield message

    async def status(self) -> Status:
        code = await self._call.code()
        details = await self._call.details() or ""
        trailing = tuple(await self._call.trailing_metadata() or ())
        if code in _TRANSPORT_CODES and self._bridge is not None and self._bridge.breaks != self._breaks:
            # The bridged connection ended during the call: grpc made this status up locally and its details
            # name our private socket. Reported as the gateway's own error with a public message instead.
            raise UpstreamUnavailable(f"{self._endpoint.key}: connection lost mid-call: {details}")
        return Status(code, details, trailing)

    def cancel(self) -> None:
        self._call.cancel()


class GrpcForwarder:
    def __init__(self, credentials: Watch[Credentials], settings: GrpcSettings) -> None:
        self._credentials = credentials
        self._settings = settings
        self._channels: OrderedDict[tuple[Endpoint, int], _Channel] = OrderedDict()
        self._retiring: set[asyncio.Task[None]] = set()
        self._directory: str | None = None
        self._serial = 0
        self._creating = asyncio.Lock()

    def _options(self, endpoint: Endpoint) -> list[tuple[str, str | int]]:
        size = self._settings.max_message_bytes
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # Through the bridge grpc would announce "localhost"; upstreams see the endpoint they serve instead.
            ("grpc.default_authority", endpoint.key),
            # A refused or impostor upstream is retried soon, not after grpc's default backoff of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 5000),
            ("grpc.enable_retries", 0),
        ]

    async def _channel(self, endpoint: Endpoint, connect_timeout_s: float) -> _Channel:
        version = self._credentials.version
        key = (endpoint, version)
        entry = self._channels.get(key)
        if entry is not None:
            self._channels.move_to_end(key)
            return entry
        async with self._creating:  # concurrent first calls to one endpoint must share one channel
            entry = self._channels.get(key)
            return entry if entry is not None else await self._new_channel(endpoint, version, connect_timeout_s)

    async def _new_channel(self, endpoint: Endpoint, version: int, connect_timeout_s: float) -> _Channel:
        key = (endpoint, version)
        for old_key in [k for k in self._channels if k[1] != version]:
            self._retire(self._channels.pop(old_key), self._settings.channel_grace_s)
        while len(self._channels) >= self._settings.max_channels:
            self._retire(self._channels.popitem(last=False)[1], self._settings.channel_grace_s)
        bridge = None
        if endpoint.tls == "plain":
            target = endpoint.key
        else:
            creds = self._credentials.get()
            context = client_context(creds if endpoint.tls == "mtls" else None, creds.bundle_pem,
                                     expected=endpoint.spiffe_id, alpn=("h2",))
            if self._directory is None:
                self._directory = tempfile.mkdtemp(prefix="mesh-gateway-grpc-")  # mode 0700
            self._serial += 1
            bridge = TlsBridge(endpoint, context, f"{self._directory}/{self._serial}.sock",
                               connect_timeout_s=connect_timeout_s)
            await bridge.start()
            target = bridge.target
        channel = grpc.aio.insecure_channel(target, options=self._options(endpoint))
        entry = self._channels[key] = _Channel(channel, bridge, version)
        return entry

    def _retire(self, entry: _Channel, grace_s: float) -> None:
        async def close() -> None:
            await entry.channel.close(grace=grace_s)
            if entry.bridge is not None:
                await entry.bridge.close()

        task = asyncio.get_running_loop().create_task(close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _ready(self, entry: _Channel, endpoint: Endpoint, timeout_s: float) -> None:
        """Wait until the channel is connected (and, through the bridge, the upstream's identity verified)."""
        channel = entry.channel
        state = channel.get_state(try_to_connect=True)
        try:
            async with asyncio.timeout(timeout_s):
                while state != _READY:
                    if state == _FAILED:
                        raise (entry.bridge.last_error if entry.bridge and entry.bridge.last_error
                               else UpstreamUnavailable(f"{endpoint.key}: cannot connect"))
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            if entry.bridge is not None and entry.bridge.last_error is not None:
                raise entry.bridge.last_error from None
            raise UpstreamUnavailable(f"{endpoint.key}: not connected within {timeout_s:.3g}s") from None

    async def open(self, endpoint: Endpoint, method: str, metadata: Metadata, *, timeout_s: float,
                   connect_timeout_s: float) -> UpstreamCall:
        """Start `method` on `endpoint`; raises GatewayError when no verified connection could be had."""
        entry = await self._channel(endpoint, connect_timeout_s)
        await self._ready(entry, endpoint, min(connect_timeout_s, timeout_s))
        multicallable = entry.channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        try:
            call = multicallable(None, metadata=tuple(metadata), timeout=timeout_s)
        except (ValueError, TypeError) as exc:  # metadata grpc refuses to send
            raise _BadMetadata(str(exc)) from None
        return UpstreamCall(call, entry, endpoint)

    async def close(self, grace_s: float = 1.0) -> None:
        """Called after the listeners drained: whatever still runs gets `grace_s`, then is cancelled."""
        for entry in self._channels.values():
            self._retire(entry, grace_s)
        self._channels.clear()
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=grace_s + 5.0)
        for task in list(self._retiring):  # channels retired by rotation with a longer grace than we have now
            task.cancel()
        if self._directory is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._directory)
            self._directory = None


class _BadMetadata(GatewayError):
    status, grpc_code, public_message = 400, "INVALID_ARGUMENT", "invalid metadata"
