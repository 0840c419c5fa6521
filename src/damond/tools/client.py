"""A small asyncio client for org.damond1 (dbus-fast): the demo, benchmarks and scripts.

Replies that are D-Bus errors are raised as dbus_fast.DBusError, whose
``type`` is the error name (e.g. org.damond1.Error.InvalidArgument) and
``text`` the daemon's message.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BUS_NAME = "org.damond1"
"""root's name: everything (configure, start, stop)."""
READERS_NAME = "org.damond1.Readers"
"""Group damond's name: properties, GetManagedObjects, GetSnapshot."""
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
    variant = (await call(bus, path, PROPERTIES, "Get", "ss", [interface, name]))[0]
    return variant.value


async def set_property(
    bus: MessageBus, path: str, interface: str, name: str, signature: str, value: Any
) -> None:
    await call(bus, path, PROPERTIES, "Set", "ssv", [interface, name, Variant(signature, value)])


async def start_kdamonds(bus: MessageBus, pids: list[int], **attrs: int) -> None:
    """Kdamond k monitors pids[k] (vaddr, one context, one target); then all turn on.

    attrs are the context's Intervals (sample_us, aggr_us, update_us) and
    NrRegions (min, max) to set, by property name. Every kdamond is configured
    before the first starts, so none samples while the others are still being
    set up.
    """
    await set_property(bus, ROOT, "org.damond1.Kdamonds", "nr", "u", len(pids))
    for k, pid in enumerate(pids):
        kdamond = f"{ROOT}/kdamonds/{k}"
        context = f"{kdamond}/contexts/0"
        await set_property(bus, kdamond, "org.damond1.Contexts", "nr", "u", 1)
        await set_property(bus, context, "org.damond1.Targets", "nr", "u", 1)
        await set_property(bus, f"{context}/targets/0", "org.damond1.Target", "pid", "i", pid)
        for name, value in attrs.items():
            iface = "org.damond1.NrRegions" if name in ("min", "max") else "org.damond1.Intervals"
            await set_property(bus, context, iface, name, "t", value)
    for k in range(len(pids)):
        await set_property(bus, f"{ROOT}/kdamonds/{k}", "org.damond1.Kdamond", "state", "s", "on")
