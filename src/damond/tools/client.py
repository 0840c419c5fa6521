"""A small asyncio client for org.damond1 (dbus-fast): the demo, benchmarks and scripts.

Replies that are D-Bus errors are raised as dbus_fast.DBusError, whose
``type`` is the error name (e.g. org.damond1.Error.InvalidArgument) and
``text`` the daemon's message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BUS_NAME = "org.damond1"
"""root's name: everything (configure, start, stop)."""
READERS_NAME = "org.damond1.Readers"
"""Group damond's name: properties, GetManagedObjects, GetSnapshot, GetTriedRegions."""
PUBLIC_NAME = "org.damond1.Public"
"""Everyone's name: properties, Introspect, Peer."""
SNAPSHOTS_NAME = "org.damond1.Snapshots"
"""The name Snapshot signals come from (root and group damond receive them)."""
ROOT = "/org/damond1"
PROPERTIES = "org.freedesktop.DBus.Properties"
SNAPSHOT_RULE = (
    f"type='signal',sender='{SNAPSHOTS_NAME}',interface='org.damond1.Context',member='Snapshot'"
)
"""Snapshot signals, from damond only: the bus delivers only what the owner of the
sender name sent, so nobody else's signal of the same shape reaches the client."""


def tree_changes_rule(**fields: str) -> str:
    """A rule for root's tree-change signals (PropertiesChanged, InterfacesAdded/Removed),
    from damond only; fields (path, member, interface, arg0, ...) narrow it."""
    extra = "".join(f",{k}='{v}'" for k, v in fields.items())
    return f"type='signal',sender='{BUS_NAME}'{extra}"


def reader_name() -> str:
    """The name this process reads through (properties, GetManagedObjects, GetSnapshot,
    GetTriedRegions): root's own, else group damond's, the only one the policy lets a
    member read access patterns through. Writes always go to BUS_NAME (root)."""
    return BUS_NAME if os.geteuid() == 0 else READERS_NAME


P = ParamSpec("P")


async def connect(address: str | None = None) -> MessageBus:
    """A connection to the bus at address, or to the system bus when it is None."""
    if address is None:
        return await MessageBus(bus_type=BusType.SYSTEM).connect()
    return await MessageBus(bus_address=address).connect()


async def call_message(
    bus: MessageBus,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    destination: str = BUS_NAME,
) -> Message:
    """Send a method call and return its reply message, which may be an error."""
    reply = await bus.call(
        Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
    )
    assert reply is not None
    return reply


def _raising(
    send: Callable[P, Coroutine[Any, Any, Message]],
) -> Callable[P, Coroutine[Any, Any, list[Any]]]:
    """send, returning the reply's body instead, with an error reply raised as DBusError."""

    async def call(*args: P.args, **kwargs: P.kwargs) -> list[Any]:
        """A method call's reply body; an error reply is raised as DBusError."""
        reply = await send(*args, **kwargs)
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise DBusError(reply.error_name or "unknown", text, reply=reply)
        return list(reply.body)

    return call


# call(bus, path, interface, member, signature="", body=None, destination=BUS_NAME)
call = _raising(call_message)


async def bus_call(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None
) -> list[Any]:
    """A call to the bus daemon itself (AddMatch, NameHasOwner, …)."""
    return await call(
        bus,
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        member,
        signature,
        body,
        destination="org.freedesktop.DBus",
    )


async def add_match(bus: MessageBus, rule: str) -> None:
    await bus_call(bus, "AddMatch", "s", [rule])


async def name_has_owner(bus: MessageBus, name: str = BUS_NAME) -> bool:
    return bool((await bus_call(bus, "NameHasOwner", "s", [name]))[0])


async def get_property(bus: MessageBus, path: str, interface: str, name: str) -> Any:
    variant = (
        await call(bus, path, PROPERTIES, "Get", "ss", [interface, name], reader_name())
    )[0]
    return variant.value


async def set_property(
    bus: MessageBus, path: str, interface: str, name: str, signature: str, value: Any
) -> None:
    await call(bus, path, PROPERTIES, "Set", "ssv", [interface, name, Variant(signature, value)])


ATTRIBUTE_HOMES = {
    "min": ("org.damond1.NrRegions", "t"),
    "max": ("org.damond1.NrRegions", "t"),
    "cpu_limit_pct": ("org.damond1.Context", "u"),
}
"""A context attribute's interface and signature, where it is not an Intervals' t."""


async def start_kdamonds(
    bus: MessageBus, pids: list[int], backend: str = "auto", **attrs: int
) -> None:
    """Kdamond k monitors pids[k] (vaddr, one context, one target); then all turn on.

    attrs are the context's Intervals (sample_us, aggr_us, update_us),
    NrRegions (min, max) and cpu_limit_pct to set, by property name; backend
    the context's backend. Every kdamond is configured before the first
    starts, so none samples while the others are still being set up.
    """
    await set_property(bus, ROOT, "org.damond1.Kdamonds", "nr", "u", len(pids))
    for k, pid in enumerate(pids):
        kdamond = f"{ROOT}/kdamonds/{k}"
        context = f"{kdamond}/contexts/0"
        await set_property(bus, kdamond, "org.damond1.Contexts", "nr", "u", 1)
        await set_property(bus, context, "org.damond1.Context", "backend", "s", backend)
        await set_property(bus, context, "org.damond1.Targets", "nr", "u", 1)
        await set_property(bus, f"{context}/targets/0", "org.damond1.Target", "pid", "i", pid)
        for name, value in attrs.items():
            iface, signature = ATTRIBUTE_HOMES.get(name, ("org.damond1.Intervals", "t"))
            await set_property(bus, context, iface, name, signature, value)
    for k in range(len(pids)):
        await set_property(bus, f"{ROOT}/kdamonds/{k}", "org.damond1.Kdamond", "state", "s", "on")


OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
CONTEXT_INTERFACE = "org.damond1.Context"


async def managed_objects(bus: MessageBus) -> dict[str, dict[str, dict[str, Any]]]:
    """GetManagedObjects with the variants unwrapped: object path → interface → property."""
    (objects,) = await call(
        bus, ROOT, OBJECT_MANAGER, "GetManagedObjects", destination=reader_name()
    )
    return {
        path: {iface: {k: v.value for k, v in props.items()} for iface, props in ifaces.items()}
        for path, ifaces in objects.items()
    }


async def get_snapshot(bus: MessageBus, context: str) -> list[Any]:
    """GetSnapshot of a context: its latest Snapshot's body (NoData before the first)."""
    return await call(bus, context, CONTEXT_INTERFACE, "GetSnapshot", destination=reader_name())


def is_snapshot(msg: Message) -> bool:
    """A Snapshot signal (the bus delivers those SNAPSHOT_RULE matched)."""
    return (
        msg.message_type is MessageType.SIGNAL
        and msg.interface == CONTEXT_INTERFACE
        and msg.member == "Snapshot"
    )


async def subscribe_snapshots(
    bus: MessageBus, on_snapshot: Callable[[str, list[Any]], None], path: str | None = None
) -> Callable[[], None]:
    """Call on_snapshot(context path, body) for each Snapshot signal (of one context's path,
    or of all); returns a function that stops the calls. The match is SNAPSHOT_RULE, so
    that where and how snapshots are sent is decided in one place."""
    rule = SNAPSHOT_RULE + (f",path='{path}'" if path is not None else "")

    def handle(msg: Message) -> None:
        if is_snapshot(msg) and (path is None or msg.path == path) and msg.path is not None:
            on_snapshot(msg.path, list(msg.body))

    await add_match(bus, rule)
    bus.add_message_handler(handle)
    return lambda: bus.remove_message_handler(handle)
SCHEME_PROPERTIES: dict[str, tuple[str, str]] = {
    **{n: ("org.damond1.Scheme", s) for n, s in (("action", "s"), ("apply_interval_us", "t"))},
    **{n: ("org.damond1.AccessPattern", "t") for n in ("sz_min", "sz_max")},
    **{
        n: ("org.damond1.AccessPattern", "u")
        for n in ("nr_accesses_min", "nr_accesses_max", "age_min", "age_max")
    },
    **{n: ("org.damond1.Quotas", "t") for n in ("ms", "bytes", "reset_interval_ms")},
    **{n: ("org.damond1.Quotas", "u") for n in ("weight_sz", "weight_nr_accesses", "weight_age")},
    "metric": ("org.damond1.Watermarks", "s"),
    **{n: ("org.damond1.Watermarks", "t") for n in ("interval_us", "high", "mid", "low")},
}
"""Each writable file of a scheme by name: its interface and signature."""
FILTER_PROPERTIES: dict[str, str] = {
    "type": "s",
    "matching": "b",
    "allow": "b",
    "memcg_path": "s",
    "addr_start": "t",
    "addr_end": "t",
    "target_idx": "u",
}


async def set_scheme(
    bus: MessageBus,
    context: str,
    index: int,
    filters: tuple[dict[str, Any], ...] = (),
    **props: Any,
) -> str:
    """Write scheme ``index`` of the context (it must exist): its files by name
    (SCHEME_PROPERTIES), then as many filters as given, each a dict of
    FILTER_PROPERTIES. The scheme's object path."""
    path = f"{context}/schemes/{index}"
    for name, value in props.items():
        interface, signature = SCHEME_PROPERTIES[name]
        await set_property(bus, path, interface, name, signature, value)
    await set_property(bus, path, "org.damond1.Filters", "nr", "u", len(filters))
    for i, f in enumerate(filters):
        for name, value in f.items():
            await set_property(
                bus,
                f"{path}/filters/{i}",
                "org.damond1.Filter",
                name,
                FILTER_PROPERTIES[name],
                value,
            )
    return path


async def tried_regions(bus: MessageBus, scheme: str) -> list[tuple[int, int, int, int, int]]:
    """GetTriedRegions of a scheme: (target index, start, end, nr_accesses, age) each."""
    body = await call(
        bus, scheme, "org.damond1.Scheme", "GetTriedRegions", destination=reader_name()
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in body[0]]


def covered(ranges: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Bytes of [lo, hi) inside the union of ranges (e.g. the tried regions of several
    GetTriedRegions calls, which overlap)."""
    total, at = 0, lo
    for start, end in sorted(ranges):
        start, end = max(start, at), min(end, hi)
        if start < end:
            total += end - start
            at = end
    return total
