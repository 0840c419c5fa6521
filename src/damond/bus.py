"""The D-Bus adapter: serves the admin tree as org.damond1 objects.

Only adaptation happens here: object paths ↔ tree paths, attribute groups ↔
interfaces, value kinds ↔ signatures, DamondError kinds ↔ error names, tree
events → PropertiesChanged / InterfacesAdded / InterfacesRemoved / Snapshot.

Objects are dispatched from one message handler instead of exported
ServiceInterfaces: dbus-fast would send InterfacesAdded from each object's own
path (the spec and GDBus clients expect the manager's path), never emits
PropertiesChanged on Set, and answers a wrongly typed Set with an error name
outside the contract (docs/architecture.md). Dispatching ourselves fixes all three and
keeps thousands of region objects cheap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cache
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.constants import ArgDirection, ErrorType, PropertyAccess

from damond import busio
from damond.errors import Busy, DamondError, InvalidArgument, NoData, NotSupported
from damond.hierarchy import Context, Method, Node, Tree
from damond.monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

BUS_NAME = "org.damond1"
ROOT_PATH = "/org/damond1"
ERROR_PREFIX = "org.damond1.Error."

INTERFACES = {
    "kdamonds": "org.damond1.Kdamonds",
    "kdamond": "org.damond1.Kdamond",
    "contexts": "org.damond1.Contexts",
    "context": "org.damond1.Context",
    "intervals": "org.damond1.Intervals",
    "nr_regions": "org.damond1.NrRegions",
    "targets": "org.damond1.Targets",
    "target": "org.damond1.Target",
    "regions": "org.damond1.Regions",
    "region": "org.damond1.Region",
    "schemes": "org.damond1.Schemes",
    "scheme": "org.damond1.Scheme",
    "access_pattern": "org.damond1.AccessPattern",
    "quotas": "org.damond1.Quotas",
    "watermarks": "org.damond1.Watermarks",
    "filters": "org.damond1.Filters",
    "filter": "org.damond1.Filter",
    "scheme_stats": "org.damond1.SchemeStats",
}
GROUPS = {iface: group for group, iface in INTERFACES.items()}
SIGNATURES = {"u32": "u", "i32": "i", "u64": "t", "bool": "b", "str": "s", "strlist": "as"}
SNAPSHOT_SIGNATURE = "ttua(uia(ttuu))"
SNAPSHOT_ARGS = (
    ("t", "seq"),
    ("t", "timestamp_us"),
    ("u", "max_nr_accesses"),
    ("a(uia(ttuu))", "targets"),
)
RETURNS: dict[str, tuple[tuple[tuple[str, str], ...], Callable[[Any], list]]] = {
    "snapshot": (SNAPSHOT_ARGS, lambda snapshot: snapshot.as_dbus()),
    "tried_regions": (
        (("a(uttuu)", "regions"),),
        lambda regions: [[list(r) for r in regions]],
    ),
}
"""How each kind of method result goes on the wire: (signature, name) of each out
argument, and the body. The shapes are built here, once, for dbus-fast's weak checks."""

ERROR_NAMES: dict[type[DamondError], str] = {
    InvalidArgument: ERROR_PREFIX + "InvalidArgument",
    Busy: ERROR_PREFIX + "Busy",
    NotSupported: ERROR_PREFIX + "NotSupported",
    NoData: ERROR_PREFIX + "NoData",
}

PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PEER = "org.freedesktop.DBus.Peer"

MAX_QUEUED_MESSAGES = 64
"""Snapshots are dropped (clients see a seq gap) while this many messages wait
for the socket: the daemon's memory stays bounded when the bus is slow."""


def object_path(path: str) -> str:
    """A tree path (``kdamonds/0``, '' for the root) as clients know it: the object path."""
    return f"{ROOT_PATH}/{path}" if path else ROOT_PATH


class _Reply(Exception):
    """An error reply: (D-Bus error name, text)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name
        self.text = text


def _error_reply(e: DamondError) -> _Reply:
    return _Reply(ERROR_NAMES[type(e)], f"{object_path(e.where)}: {e.rule}")


@cache
def _standard_interfaces(manager: bool) -> tuple[intr.Interface, ...]:
    return tuple(i for i in intr.Node.default().interfaces if manager or i.name != OBJECT_MANAGER)


_INTERFACE_XML: dict[tuple[type[Node], str], intr.Interface] = {}


def _interface(node_type: type[Node], group: str) -> intr.Interface:
    """Introspection data of one attribute group (built once per node type)."""
    key = (node_type, group)
    if key not in _INTERFACE_XML:
        _INTERFACE_XML[key] = _build_interface(node_type, group)
    return _INTERFACE_XML[key]


EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"


def _build_interface(node_type: type[Node], group: str) -> intr.Interface:
    props = [
        intr.Property(
            a.name,
            SIGNATURES[a.kind],
            PropertyAccess.READWRITE if a.writable else PropertyAccess.READ,
            annotations=None if a.emits_changed else {EMITS_CHANGED: "false"},
        )
        for a in node_type.GROUPS[group]
    ]
    methods = [
        intr.Method(
            m.name,
            out_args=[intr.Arg(sig, ArgDirection.OUT, name) for sig, name in RETURNS[m.returns][0]],
        )
        for m in node_type.METHODS.get(group, ())
    ]
    signals: list[intr.Signal] = []
    if group == "context":
        signals.append(
            intr.Signal("Snapshot", [intr.Arg(sig, None, name) for sig, name in SNAPSHOT_ARGS])
        )
    return intr.Interface(INTERFACES[group], methods=methods, signals=signals, properties=props)


class BusAdapter:
    """Serves one Tree on one connection; listens to the tree for changes."""

    def __init__(self, bus: MessageBus, tree: Tree) -> None:
        self.bus = bus
        self.tree = tree
        self.snapshots_dropped = 0
        self._last_drop_log = 0.0

    def attach(self) -> None:
        busio.harden(self.bus)
        self.bus.add_message_handler(self._handle)
        self.tree.listeners.append(self)

    def detach(self) -> None:
        self.bus.remove_message_handler(self._handle)
        if self in self.tree.listeners:
            self.tree.listeners.remove(self)

    # --- incoming calls -------------------------------------------------------------

    def _handle(self, msg: Message) -> bool | None:
        if msg.message_type is not MessageType.METHOD_CALL or not self._ours(msg.path):
            return None
        if msg.interface == PEER:
            return None  # dbus-fast answers Ping and GetMachineId for every path
        try:
            reply = self._dispatch(msg)
        except _Reply as e:
            reply = Message.new_error(msg, e.name, e.text)
        except DamondError as e:
            err = _error_reply(e)
            reply = Message.new_error(msg, err.name, err.text)
        except Exception:  # never a traceback to the caller; the log has it
            log.exception(
                "internal error handling %s.%s on %s", msg.interface, msg.member, msg.path
            )
            reply = Message.new_error(
                msg, ErrorType.FAILED, "internal error (see the daemon's log)"
            )
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            # sent here rather than returned to dbus-fast, whose own send leaves the
            # future unconsumed: "exception never retrieved" when the bus goes away
            busio.send(self.bus, reply)
        return True

    @staticmethod
    def _ours(path: str | None) -> bool:
        return path is not None and (
            path in ("/", "/org") or path == ROOT_PATH or path.startswith(ROOT_PATH + "/")
        )

    def _dispatch(self, msg: Message) -> Message:
        iface, member, path = msg.interface, msg.member, msg.path
        assert path is not None
        if member == "Introspect" and iface in (INTROSPECTABLE, None) and msg.signature == "":
            return Message.new_method_return(msg, "s", [self._introspect(path)])
        node = self._node(path)
        if iface == PROPERTIES or (iface is None and member in ("Get", "Set", "GetAll")):
            return self._properties(msg, node)
        no_args = msg.signature == ""
        if (
            member == "GetManagedObjects"
            and iface in (OBJECT_MANAGER, None)
            and no_args
            and node is self.tree.root
        ):
            return Message.new_method_return(msg, "a{oa{sa{sv}}}", [self._managed_objects()])
        method = self._method(node, iface, member) if no_args else None
        if method is not None:
            assert node is not None
            out, body = RETURNS[method.returns]
            signature = "".join(sig for sig, _ in out)
            return Message.new_method_return(msg, signature, body(method.call(node)))
        if node is None:
            raise _Reply(ErrorType.UNKNOWN_OBJECT.value, f"no object at {path}")
        raise _Reply(
            ErrorType.UNKNOWN_METHOD.value,
            f"{path} has no method {iface}.{member} with signature {msg.signature!r}",
        )

    @staticmethod
    def _method(node: Node | None, iface: str | None, member: str | None) -> Method | None:
        """The node's method of that name, in that interface (any, when none is given)."""
        if node is None:
            return None
        groups = [GROUPS.get(iface, "")] if iface is not None else list(node.METHODS)
        for group in groups:
            for method in node.METHODS.get(group, ()):
                if method.name == member:
                    return method
        return None

    def _node(self, path: str) -> Node | None:
        if path == ROOT_PATH:
            return self.tree.root
        if not path.startswith(ROOT_PATH + "/"):
            return None
        return self.tree.lookup(path[len(ROOT_PATH) + 1 :])

    def _group(self, node: Node | None, path: str, iface: str) -> str:
        if node is None:
            raise _Reply(ErrorType.UNKNOWN_OBJECT.value, f"no object at {path}")
        group = GROUPS.get(iface)
        if group is None or group not in node.GROUPS:
            raise _Reply(ErrorType.UNKNOWN_INTERFACE.value, f"{path} has no interface {iface}")
        return group

    def _properties(self, msg: Message, node: Node | None) -> Message:
        signatures = {"Get": "ss", "Set": "ssv", "GetAll": "s"}
        if signatures.get(msg.member or "") != msg.signature:
            raise _Reply(
                ErrorType.UNKNOWN_METHOD.value,
                f"Properties has no method {msg.member} with signature {msg.signature!r}",
            )
        assert msg.path is not None
        iface = msg.body[0]
        if msg.member == "GetAll" and iface in (PROPERTIES, INTROSPECTABLE, PEER, OBJECT_MANAGER):
            return Message.new_method_return(msg, "a{sv}", [{}])
        group = self._group(node, msg.path, iface)
        assert node is not None
        if msg.member == "GetAll":
            return Message.new_method_return(msg, "a{sv}", [self._variants(node, group)])
        name = msg.body[1]
        try:
            attr = node.attribute(group, name)
        except DamondError:
            raise _Reply(
                ErrorType.UNKNOWN_PROPERTY.value, f"{iface} has no property {name!r}"
            ) from None
        signature = SIGNATURES[attr.kind]
        if msg.member == "Get":
            return Message.new_method_return(msg, "v", [Variant(signature, node.get(group, name))])
        value: Variant = msg.body[2]
        if not attr.writable:
            raise _Reply(
                ERROR_NAMES[InvalidArgument],
                f"{msg.path}: {iface}.{name} is read-only",
            )
        if value.signature != signature:
            raise _Reply(
                ERROR_NAMES[InvalidArgument],
                f"{msg.path}: {iface}.{name} has type {signature!r}, got {value.signature!r}",
            )
        node.set(group, name, value.value)
        return Message.new_method_return(msg)

    @staticmethod
    def _variants(node: Node, group: str) -> dict[str, Variant]:
        return {
            a.name: Variant(SIGNATURES[a.kind], node.get(group, a.name)) for a in node.GROUPS[group]
        }

    def _interfaces_and_properties(self, node: Node) -> dict[str, dict[str, Variant]]:
        return {INTERFACES[g]: self._variants(node, g) for g in node.GROUPS}

    def _managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        return {
            object_path(n.path): self._interfaces_and_properties(n)
            for n in self.tree.root.walk()
            if n is not self.tree.root
        }

    def _introspect(self, path: str) -> str:
        node = self._node(path)
        result = intr.Node(path)
        if path == "/":
            result.nodes = [intr.Node("org", is_root=False)]
        elif path == "/org":
            result.nodes = [intr.Node("damond1", is_root=False)]
        elif node is not None:
            result.interfaces = [
                *_standard_interfaces(node is self.tree.root),
                *(_interface(type(node), g) for g in node.GROUPS),
            ]
            names = [c.name for c in node.collections() if c.items]
            result.nodes = [intr.Node(n, is_root=False) for n in names]
        else:
            parent_path, _, collection = path.rpartition("/")
            parent = self._node(parent_path)
            items = (
                next((c.items for c in parent.collections() if c.name == collection), None)
                if parent is not None
                else None
            )
            if items is None:
                raise _Reply(ErrorType.UNKNOWN_OBJECT.value, f"no object at {path}")
            result.nodes = [intr.Node(str(i), is_root=False) for i in range(len(items))]
        return result.tostring()

    # --- tree events → signals ----------------------------------------------------

    def _signal(self, path: str, iface: str, member: str, signature: str, body: list) -> None:
        if self.bus.connected:
            busio.send(self.bus, Message.new_signal(path, iface, member, signature, body))

    def node_added(self, node: Node) -> None:
        self._signal(
            ROOT_PATH,
            OBJECT_MANAGER,
            "InterfacesAdded",
            "oa{sa{sv}}",
            [object_path(node.path), self._interfaces_and_properties(node)],
        )

    def node_removed(self, node: Node) -> None:
        self._signal(
            ROOT_PATH,
            OBJECT_MANAGER,
            "InterfacesRemoved",
            "oas",
            [object_path(node.path), [INTERFACES[g] for g in node.GROUPS]],
        )

    def properties_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None:
        kinds = {a.name: a.kind for a in node.GROUPS[group]}
        variants = {k: Variant(SIGNATURES[kinds[k]], v) for k, v in changed.items()}
        self._signal(
            object_path(node.path),
            PROPERTIES,
            "PropertiesChanged",
            "sa{sv}as",
            [INTERFACES[group], variants, []],
        )

    def snapshot(self, context: Context, snapshot: Snapshot) -> None:
        if busio.queued_messages(self.bus) >= MAX_QUEUED_MESSAGES:
            self.snapshots_dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.warning(
                    "the bus is not keeping up: dropped %d snapshot(s) so far",
                    self.snapshots_dropped,
                )
            return
        self._signal(
            object_path(context.path),
            INTERFACES["context"],
            "Snapshot",
            SNAPSHOT_SIGNATURE,
            snapshot.as_dbus(),
        )
