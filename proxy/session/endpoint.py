"""One TCP leg (client or upstream): buffers bytes while setting up, hands them straight on while relaying."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from proxy.wire import ReceiveBuffer

SETUP_BUFFER_LIMIT = 256 * 1024
"""Bytes held unread while setting up before the peer is no longer read (it waits in its own send
buffer, as it would in front of PostgreSQL); reading resumes when the session wants more."""


class ConnectionClosed(Exception):
    """The peer went away."""


class Endpoint(asyncio.Protocol):
    """asyncio protocol for one side of a session.

    Until `relay` is set, incoming bytes collect in `buffer` for the startup and authentication
    code to read message by message; afterwards every chunk goes to `relay` as it arrives.
    """

    def __init__(self, max_message_size: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = ReceiveBuffer(max_message_size)
        self.relay: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        self.on_write_paused: Callable[[bool], None] | None = None
        self.on_eof: Callable[[], bool] | None = None  # True: keep sending after the peer's end-of-file
        self.connected: Callable[[Endpoint], None] | None = None
        self.lost = False
        self._setup_paused = False
        self._waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if self.connected is not None:
            self.connected(self)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay(data)
            return
        self.buffer.feed(data)
        if len(self.buffer) > SETUP_BUFFER_LIMIT and not self._setup_paused and self.transport is not None:
            self._setup_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        on_eof = self.on_eof
        return on_eof() if on_eof is not None else False  # False: close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.on_write_paused is not None:
            self.on_write_paused(True)

    def resume_writing(self) -> None:
        if self.on_write_paused is not None:
            self.on_write_paused(False)

    # ---- used while setting up ---------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def relay_to(self, relay: Callable[[bytes], None]) -> None:
        """From now on every chunk received goes straight to `relay`.

        `relay` becomes this protocol's data_received (the transport is told again, since uvloop
        keeps the method it was given): one Python call less per chunk on the hot path."""
        self.relay = relay
        self.data_received = relay  # type: ignore[method-assign,assignment]
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.set_protocol(self)

    def resume_setup_reading(self) -> None:
        """Read the peer again if too many unread bytes had stopped it."""
        if self._setup_paused:
            self._setup_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def hand_over(self) -> bytes:
        """Everything still buffered, with reading resumed: the relay takes the stream from here."""
        self.resume_setup_reading()
        return self.buffer.take()

    async def _wait(self) -> None:
        if self.lost:
            raise ConnectionClosed()
        self.resume_setup_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_startup_packet(self) -> bytes:
        while True:
            packet = self.buffer.next_startup_packet()
            if packet is not None:
                return packet
            await self._wait()

    async def read_message(self) -> tuple[int, bytes]:
        while True:
            message = self.buffer.next_message()
            if message is not None:
                return message
            await self._wait()

    async def read_byte(self) -> int:
        while not len(self.buffer):
            await self._wait()
        return self.buffer.take_byte()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def host(self) -> str | None:
        """The peer's IP address; None for a Unix socket (or before connecting)."""
        if self.transport is None:
            return None
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(peer[0])
        return None

    @property
    def peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return "unix"
