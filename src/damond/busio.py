"""Keeping a dbus-fast connection alive under load.

dbus-fast (like dbus-next) treats EAGAIN from the socket as fatal: when the
send buffer fills, it drops the whole bus connection (tests/test_busio.py: reproduced
3/3 with 1000 back-to-back 24 KB signals). A monitoring daemon that floods a
slow bus must instead wait until the socket is writable again, and must bound
what it queues. This module is the one place that knows dbus-fast's writer.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

from dbus_fast import Message
from dbus_fast.aio import MessageBus


class _EagainTolerantSocket:
    """A socket whose send() reports a full buffer as "0 bytes sent".

    dbus-fast's writer then keeps the unsent rest and waits for writability,
    which is what it already does after a partial write.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def harden(bus: MessageBus) -> None:
    """Make a connected bus survive a full send buffer."""
    writer = bus._writer
    if writer is None or writer.sock is None:
        raise RuntimeError("harden() needs a connected bus")
    if not isinstance(writer.sock, _EagainTolerantSocket):
        writer.sock = cast(socket.socket, _EagainTolerantSocket(writer.sock))


def queued_messages(bus: MessageBus) -> int:
    """Messages accepted by send() that have not fully reached the socket yet."""
    writer = bus._writer
    if writer is None:
        return 0
    return len(writer.messages) + (writer.buf is not None)


def unsent_bytes(bus: MessageBus, enough: int) -> int:
    """Bytes accepted by send() that have not reached the socket yet, counted up to
    `enough` at least (the count stops early past it: the writer's queue may be long)."""
    writer = bus._writer
    if writer is None:
        return 0
    total = len(writer.buf) - writer.offset if writer.buf is not None else 0
    for buf, _, _ in writer.messages:
        if total > enough:
            break
        total += len(buf)
    return total


class ReadGate:
    """Stops and restarts reading a connection (backpressure).

    While stopped, what peers send to this connection waits in the kernel's
    socket buffer and then in the bus daemon, charged to those peers, not to
    the daemon's memory. dbus-fast keeps its reader callback only in the event
    loop's selector: it is taken from there, so that the partly read message in
    its buffer is kept across a pause.
    """

    def __init__(self, bus: MessageBus) -> None:
        loop = bus._loop
        fd = bus._fd
        selector = getattr(loop, "_selector", None)
        if selector is None or fd is None:
            raise RuntimeError("ReadGate needs a connected bus on a selector event loop")
        reader = selector.get_key(fd).data[0]
        self._loop = loop
        self._fd = fd
        self._callback = reader._callback
        self._args = reader._args
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._loop.remove_reader(self._fd)

    def resume(self) -> None:
        if self.stopped:
            self.stopped = False
            self._loop.add_reader(self._fd, self._callback, *self._args)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a send error means disconnection, handled elsewhere


def send(bus: MessageBus, message: Message) -> None:
    """Send without awaiting, and without "exception never retrieved" noise.

    A connection the bus daemon has just closed can fail the send itself
    (dbus-fast registers the closed fd with the event loop: EBADF) before
    dbus-fast has noticed; that is the disconnection, which the daemon handles
    where it waits for it, not an error of this message.
    """
    try:
        future = bus.send(message)
    except OSError:
        return
    future.add_done_callback(_consume)
