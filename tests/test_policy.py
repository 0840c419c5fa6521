"""The access policy (docs/operations.md), enforced by a real dbus-daemon with its file.

The bus is configured like the system bus (deny by default, no root
exception) and includes the project's policy file itself, not a copy. Other
users are played by `setpriv`: `nobody`, and `nobody` with the group damond.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import (
    MEMBER,
    NOBODY,
    POLICY,
    ROOT,
    Damond,
    call,
    rawbus_as,
    start_damond,
    stop_process,
)
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from damond.bus import INTERFACES
from damond.tools.privatebus import PrivateBus

K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
T0 = f"{C0}/targets/0"
DENIED = "org.freedesktop.DBus.Error.AccessDenied"

pytestmark = pytest.mark.usefixtures("damond_group")


@pytest.fixture
async def served(policy_bus: PrivateBus, tmp_path: Any) -> AsyncIterator[Damond]:
    """damond on the strict bus, kdamond 0 on and monitoring a sleep process."""
    client = await MessageBus(bus_address=policy_bus.address).connect()
    daemon = await start_damond(policy_bus, client, tmp_path)
    target = subprocess.Popen(["sleep", "600"])
    try:
        await daemon.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
        await daemon.set(K0, "org.damond1.Contexts", "nr", "u", 1)
        await daemon.set(C0, "org.damond1.Targets", "nr", "u", 1)
        await daemon.set(T0, "org.damond1.Target", "pid", "i", target.pid)
        await daemon.set(C0, "org.damond1.Intervals", "aggr_us", "t", 20000)
        await daemon.set(C0, "org.damond1.Schemes", "nr", "u", 1)  # stat: it tries every region
        snapshots = await daemon.signals(path=C0, member="Snapshot")
        await daemon.set(K0, "org.damond1.Kdamond", "state", "s", "on")
        await snapshots.next(timeout=10)  # GetSnapshot and GetTriedRegions have data from here on
        await snapshots.stop()
        yield daemon
    finally:
        stop_process(target)
        assert stop_process(daemon.process) == 0, daemon.stderr()
        client.disconnect()


def as_user(user: list[str], d: Damond, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*user, "busctl", f"--address={d.address}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def denied(out: subprocess.CompletedProcess[str]) -> bool:
    return out.returncode != 0 and "Access denied" in out.stderr


CONTROL, READERS, PUBLIC, SNAPSHOTS = (
    "org.damond1",
    "org.damond1.Readers",
    "org.damond1.Public",
    "org.damond1.Snapshots",
)
NAMES = (CONTROL, READERS, PUBLIC, SNAPSHOTS)


def get(name: str) -> list[str]:
    return ["get-property", name, K0, "org.damond1.Kdamond", "state"]


def set_(name: str) -> list[str]:
    return ["set-property", name, C0, "org.damond1.Intervals", "aggr_us", "t", "50000"]


def state_off(name: str) -> list[str]:
    return ["set-property", name, K0, "org.damond1.Kdamond", "state", "s", "off"]


def snapshot(name: str) -> list[str]:
    return ["call", name, C0, "org.damond1.Context", "GetSnapshot"]


def managed(name: str) -> list[str]:
    return ["call", name, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"]


def tried(name: str) -> list[str]:
    return ["call", name, f"{C0}/schemes/0", "org.damond1.Scheme", "GetTriedRegions"]


def introspect(name: str) -> list[str]:
    return ["introspect", name, C0]


def machine_id(name: str) -> list[str]:
    return ["call", name, C0, "org.freedesktop.DBus.Peer", "GetMachineId"]


WRITES = (set_, state_off)
READS = (get, introspect, machine_id)
ACCESS_PATTERNS = (snapshot, tried, managed)


async def snapshots_received(user: list[str], d: Damond, snapshots: int = 10) -> int:
    """How many Snapshot signals a subscriber running as user gets while root gets `snapshots`."""
    subscriber = rawbus_as(user, "subscribe", d.address, "1", "0")
    try:
        assert subscriber.stdout is not None
        assert subscriber.stdout.readline() == "ready\n"
        root_queue = await d.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
        for _ in range(snapshots):
            await root_queue.next(timeout=10)
        await root_queue.stop()
        out, _ = subscriber.communicate("", timeout=30)
        return int(json.loads(out)[0])
    finally:
        stop_process(subscriber)


async def unchanged(d: Damond) -> None:
    """No refused write changed anything."""
    assert d.busctl(*get(CONTROL)).stdout.strip() == 's "on"'
    assert await d.get(C0, "org.damond1.Intervals", "aggr_us") == 20000


async def test_root_may_do_everything(served: Damond) -> None:
    assert served.busctl(*get(CONTROL)).stdout.strip() == 's "on"'
    for ask in (*READS, *ACCESS_PATTERNS):
        out = served.busctl(*ask(CONTROL), check=False)
        assert out.returncode == 0, (ask.__name__, out.stderr)
    assert served.busctl(*set_(CONTROL)).returncode == 0
    assert (
        served.busctl(
            "set-property", CONTROL, K0, "org.damond1.Kdamond", "state", "s", "commit"
        ).returncode
        == 0
    )
    assert await snapshots_received([], served) > 0


async def test_everyone_else_reads_properties_on_the_public_name_only(served: Damond) -> None:
    for ask in READS:
        out = as_user(NOBODY, served, *ask(PUBLIC))
        assert out.returncode == 0, (ask.__name__, out.stderr)
    assert as_user(NOBODY, served, *get(PUBLIC)).stdout.strip() == 's "on"'
    # the machine id is the daemon's answer (dbus-fast would ask the bus, which says no)
    machine = as_user(NOBODY, served, *machine_id(PUBLIC)).stdout.split()
    assert machine[0] == "s" and len(machine[1].strip('"')) == 32, machine
    for ask in (*WRITES, *ACCESS_PATTERNS):
        out = as_user(NOBODY, served, *ask(PUBLIC))
        assert denied(out), (ask.__name__, out.returncode, out.stderr)
    # root's control plane and the group's name are out of reach, reads included
    for name in (CONTROL, READERS, SNAPSHOTS):
        for ask in (*READS, *WRITES, *ACCESS_PATTERNS):
            out = as_user(NOBODY, served, *ask(name))
            assert denied(out), (name, ask.__name__, out.returncode, out.stderr)
    await unchanged(served)
    assert await snapshots_received(NOBODY, served) == 0


async def test_group_damond_reads_and_watches_on_its_own_name(served: Damond) -> None:
    for ask in (*READS, *ACCESS_PATTERNS):
        out = as_user(MEMBER, served, *ask(READERS))
        assert out.returncode == 0, (ask.__name__, out.stderr)
    assert as_user(MEMBER, served, *get(READERS)).stdout.strip() == 's "on"'
    assert as_user(MEMBER, served, *snapshot(READERS)).stdout.startswith("ttua(uia(ttuu))")
    assert as_user(MEMBER, served, *tried(READERS)).stdout.startswith("a(uttuu)")
    assert as_user(MEMBER, served, *get(PUBLIC)).returncode == 0  # everyone's name too
    for ask in WRITES:
        out = as_user(MEMBER, served, *ask(READERS))
        assert denied(out), (ask.__name__, out.returncode, out.stderr)
    for name in (CONTROL, SNAPSHOTS):
        for ask in (*READS, *WRITES, *ACCESS_PATTERNS):
            out = as_user(MEMBER, served, *ask(name))
            assert denied(out), (name, ask.__name__, out.returncode, out.stderr)
    await unchanged(served)
    assert await snapshots_received(MEMBER, served) > 0


async def test_reader_names_refuse_what_they_do_not_serve_even_to_root(served: Damond) -> None:
    """The policy keeps each class on its name; the daemon also refuses by name, so
    that a policy installed wrong does not open writes or access patterns."""

    async def refused(name: str, path: str, iface: str, member: str, *args: Any) -> str:
        sig = {"Set": "ssv", "Get": "ss"}.get(member, "")
        reply = await call(served.client, path, iface, member, sig, list(args), destination=name)
        assert reply.error_name == DENIED, (name, member, reply.error_name, reply.body)
        return str(reply.body[0])

    aggr = ["org.damond1.Intervals", "aggr_us", Variant("t", 50000)]
    for name in (READERS, PUBLIC):
        text = await refused(name, C0, "org.freedesktop.DBus.Properties", "Set", *aggr)
        assert f"write through {CONTROL}" in text, text
    for path, iface, member in (
        (C0, "org.damond1.Context", "GetSnapshot"),
        (f"{C0}/schemes/0", "org.damond1.Scheme", "GetTriedRegions"),
        (ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
    ):
        assert READERS in await refused(PUBLIC, path, iface, member)
    state = ["org.damond1.Kdamond", "state"]
    text = await refused(SNAPSHOTS, K0, "org.freedesktop.DBus.Properties", "Get", *state)
    assert "only sends signals" in text, text
    await unchanged(served)


def keep_signals(into: list[Message], msg: Message) -> None:
    if msg.message_type is MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
        into.append(msg)


def forge(user: list[str], d: Damond, path: str, interface: str, member: str) -> None:
    said, _ = rawbus_as(user, "signal", d.address, path, interface, member).communicate(timeout=30)
    assert said.strip() == "routed", said


async def test_only_root_sends_damonds_signals_and_clients_match_the_sender(
    served: Damond,
) -> None:
    """Nobody and group members cannot send a Snapshot (the policy); a PropertiesChanged
    on an object below /org/damond1 the policy cannot tell from any other, so
    clients match on the sender's name, as damond's own client does."""
    from damond.tools import client

    anyone = await served.signals(interface="org.damond1.Context", member="Snapshot")
    changes = await served.signals(path=K0, member="PropertiesChanged")
    # damond's client rules, on connections of their own: all they get is their rule's
    by_sender: dict[str, list[Any]] = {}
    subscribers = []
    for rule in (client.SNAPSHOT_RULE, client.tree_changes_rule(path=K0)):
        sub = await MessageBus(bus_address=served.address).connect()
        subscribers.append(sub)
        sub.add_message_handler(functools.partial(keep_signals, by_sender.setdefault(rule, [])))
        await client.add_match(sub, rule)
    for user in (NOBODY, MEMBER):
        forge(user, served, C0, "org.damond1.Context", "Snapshot")
        forge(user, served, K0, "org.freedesktop.DBus.Properties", "PropertiesChanged")
    # a round trip to the bus: whatever it routed to us before is in our queues now
    for bus in (served.client, *subscribers):
        await client.name_has_owner(bus)
    assert not [m for m in anyone.drain() if m.body == []]  # no forged (empty) Snapshot
    forged = [m for m in changes.drain() if m.body == []]
    assert len(forged) == 2  # the policy cannot stop these...
    for messages in by_sender.values():  # ...the sender match does
        assert all(m.body for m in messages), [m.sender for m in messages if not m.body]
    assert by_sender[client.SNAPSHOT_RULE], "the client's rule missed damond's own snapshots"
    for sub in subscribers:
        sub.disconnect()


def test_every_interface_of_damond_has_its_signals_denied_to_others() -> None:
    """A forged signal of a damond interface is refused by the bus itself: every
    interface the daemon serves, a new one included, has its deny line."""
    default = ET.parse(POLICY).getroot().find("policy[@context='default']")
    assert default is not None
    denied_signals = {
        rule.get("send_interface")
        for rule in default.iter("deny")
        if rule.get("send_type") == "signal"
    }
    assert set(INTERFACES.values()) <= denied_signals, set(INTERFACES.values()) - denied_signals


def test_only_root_may_own_the_names(policy_bus: PrivateBus) -> None:
    def own(user: list[str], name: str) -> str:
        said, _ = rawbus_as(user, "own", policy_bus.address, name).communicate(timeout=30)
        return said.strip()

    for name in NAMES:
        assert own(NOBODY, name) == DENIED, name
        assert own(MEMBER, name) == DENIED, name
        assert own([], name) == "granted", name


BURST = 1024


async def test_a_reader_pipelining_past_its_cap_gets_limits_exceeded(served: Damond) -> None:
    """1024 Gets sent at once on the group's name: the daemon keeps at most 32 of one
    caller waiting and answers the rest LimitsExceeded at once, never more memory.

    (With 128, a quick daemon once took them from the bus as they came, never
    holding 33, and answered all: the burst must outrun it.)"""
    import rawbus  # tests/rawbus.py

    sock = rawbus.connect(served.address)
    calls = [
        rawbus.message(
            2 + i,
            1,
            K0,
            "org.freedesktop.DBus.Properties",
            "Get",
            "org.damond1.Kdamond",
            "state",
            destination=READERS,
        )
        for i in range(BURST)
    ]
    sock.sendall(b"".join(calls))
    received = b""
    while received.count(b"\x05\x01u\x00") < BURST + 1:  # the replies and Hello's, by reply_serial
        chunk = await asyncio.get_running_loop().sock_recv(sock, 1 << 16)
        assert chunk, "the bus closed the connection"
        received += chunk
    sock.close()
    refused = received.count(b"org.damond1.Error.LimitsExceeded\x00")
    answered = received.count(b"\x01s\x00\x00\x02\x00\x00\x00on\x00")  # the variant 's' "on"
    # the bus keeps a cap of its own on replies a connection awaits, and refuses past it
    by_bus = received.count(b"org.freedesktop.DBus.Error.LimitsExceeded\x00")
    assert refused + answered + by_bus == BURST, (refused, answered, by_bus)
    assert refused >= 1 and answered >= 32, (refused, answered, by_bus)
    assert b"at most 32 per caller" in received
