"""The dbus-fast send-buffer defect (docs/architecture.md), and damond's fix, on a real bus."""

from __future__ import annotations

import asyncio
import signal

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from damond import busio
from damond.tools.client import add_match
from damond.tools.privatebus import PrivateBus

SIGNALS = 400
PAYLOAD = [(i, i + 4096, 3, 7) for i in range(1000)]  # ~24 KB, a 1000-region snapshot


async def test_a_full_send_buffer_does_not_drop_the_connection(private_bus: PrivateBus) -> None:
    """Snapshot-sized signals into a bus that stops reading for a while (SIGSTOP):
    dbus-fast alone drops the connection at the first EAGAIN; hardened, it waits
    for the socket, and every signal arrives once the bus reads again."""
    sender = await MessageBus(bus_address=private_bus.address).connect()
    receiver = await MessageBus(bus_address=private_bus.address).connect()
    got = 0
    all_in = asyncio.Event()

    def count(msg: Message) -> None:
        nonlocal got
        if msg.message_type is MessageType.SIGNAL and msg.member == "Flood":
            got += 1
            if got == SIGNALS:
                all_in.set()

    await add_match(receiver, "type='signal',member='Flood'")
    receiver.add_message_handler(count)
    busio.harden(sender)
    high_water = 0
    private_bus.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(SIGNALS):
            flood = Message.new_signal("/t", "org.damond1.Test", "Flood", "a(ttuu)", [PAYLOAD])
            busio.send(sender, flood)
            high_water = max(high_water, busio.queued_messages(sender))
            await asyncio.sleep(0)  # let the writer run (and meet EAGAIN)
        assert sender.connected, "the connection was dropped on a full send buffer"
    finally:
        private_bus.process.send_signal(signal.SIGCONT)
    assert high_water > 100, "the socket never backed up: the test did not test anything"
    await asyncio.wait_for(all_in.wait(), 60)
    assert sender.connected
    assert busio.queued_messages(sender) == 0
    sender.disconnect()
    receiver.disconnect()
