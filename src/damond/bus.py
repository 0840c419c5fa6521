"""The D-Bus adapter: serves the admin tree as org.damond1 objects.

Only adaptation happens here: object paths ↔ tree paths, attribute groups ↔
interfaces, value kinds ↔ signatures, DamondError kinds ↔ error names, tree
events → PropertiesChanged / InterfacesAdded / InterfacesRemoved / Snapshot.

Isolation. dbus-daemon charges every message a peer has not read yet (a
reply to a caller that never reads, a signal to a stalled subscriber) to the
connection that sent it, and stops reading that connection once it has
127 MiB outstanding: everything it sends then waits. So each class of peer
is served by a connection of its own, under its own name (NAMES), and the
policy (packaging/dbus-policy.conf) lets each class reach only its own:
root's control plane `org.damond1` sends nothing to anyone else, and a
stalled reader can pin only the connection of its own class.

Fairness. One event loop serves every connection. Each name queues its
method calls per caller (fairqueue.FairQueue: one request per caller in
turn, at most `per_caller` waiting, past that LimitsExceeded at once), and
answers them from a task that gives the loop back every TURN_S; answers
that cost are marshalled once per change (treecache, wire). A name whose
replies pile up unsent (the bus stopped reading it) stops reading requests
until they drain: its callers wait in the bus, not in the daemon's memory.

Objects are dispatched from one message handler per connection instead of
exported ServiceInterfaces: dbus-fast would send InterfacesAdded from each
object's own path (the spec and GDBus clients expect the manager's path),
never emits PropertiesChanged on Set, answers a wrongly typed Set with an
error name outside the contract, and forwards Peer.GetMachineId to the bus,
whose policy denies it (docs/architecture.md). Dispatching ourselves fixes
all four and keeps thousands of region objects cheap.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.constants import ArgDirection, ErrorType, PropertyAccess

from damond import busio, treecache, wire
from damond.errors import Busy, DamondError, InvalidArgument, NoData, NotSupported
from damond.fairqueue import FairQueue
from damond.hierarchy import Context, Method, Node, Tree
from damond.monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

BUS_NAME = "org.damond1"
READERS_NAME = "org.damond1.Readers"
PUBLIC_NAME = "org.damond1.Public"
SNAPSHOTS_NAME = "org.damond1.Snapshots"
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
TRIED_REGIONS_SIGNATURE = "a(uttuu)"
EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"

ERROR_NAMES: dict[type[DamondError], str] = {
    InvalidArgument: ERROR_PREFIX + "InvalidArgument",
    Busy: ERROR_PREFIX + "Busy",
    NotSupported: ERROR_PREFIX + "NotSupported",
    NoData: ERROR_PREFIX + "NoData",
}
LIMITS_EXCEEDED = ERROR_PREFIX + "LimitsExceeded"
ACCESS_DENIED = ErrorType.ACCESS_DENIED.value

PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PEER = "org.freedesktop.DBus.Peer"

MAX_QUEUED_MESSAGES = 64
"""Snapshots are dropped (clients see a seq gap) while this many messages wait
for the socket: the daemon's memory stays bounded when the bus is slow."""

MAX_WAITING_PER_CALLER = 32
"""Requests one caller of a reader name may have waiting; past it, LimitsExceeded."""
MAX_WAITING_PER_NAME = 4096
"""Requests all callers of one name may have waiting (of small ones: ~4 MiB)."""
TURN_S = 0.002
"""A name's requests are answered for at most this long before the loop gets a turn."""
HIGH_WATER_BYTES = 8 << 20
"""Unsent replies on one connection above which it stops reading requests..."""
LOW_WATER_BYTES = 1 << 20
"""...until they are back below this."""
DRAIN_POLL_S = 0.01

MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))

UNANNOUNCED_REFRESH_S = 1.0
"""A context's GetManagedObjects entry is marshalled again at most this often for
its properties that change with each snapshot and are not announced (effective_*,
EmitsChangedSignal=false): as fresh as the scheme stats, which are announced at
most once a second; Get reads them current."""

SNAPSHOTS_STUCK_S = 5.0
"""A Snapshots connection that has had MAX_QUEUED_MESSAGES waiting for the bus this
long is replaced by a new one. dbus-daemon stops reading a connection once 127 MiB
of what it sent wait in other peers' queues: a subscriber that stops reading pins
that much of the Snapshot stream and then stops it for everyone. Its own queue is
full by then, so the bus drops (and frees) what is sent to it: a new connection
is charged nothing for it, and the others receive again."""


class Access(enum.IntEnum):
    """What a name answers; each class of peer reaches one name (the policy says who)."""

    PUBLIC = 0
    """Introspect, Peer, Get, GetAll: everyone."""
    READ = 1
    """And GetManagedObjects and the nodes' methods (GetSnapshot, GetTriedRegions: access
    patterns): group damond."""
    CONTROL = 2
    """And Set: root."""


@dataclass(frozen=True)
class Name:
    """A bus name damond owns, on a connection of its own."""

    name: str
    access: Access | None
    """What it answers; None: Peer only (it sends signals)."""
    per_caller: int | None
    """Requests one caller may have waiting; None: no cap (root's own name)."""
    replaceable: bool = False
    """Owned with ALLOW_REPLACEMENT, so that a new connection of damond's can take it
    over without a moment with no owner (SNAPSHOTS_STUCK_S)."""


SNAPSHOTS = Name(SNAPSHOTS_NAME, None, MAX_WAITING_PER_CALLER, replaceable=True)
PUBLIC = Name(PUBLIC_NAME, Access.PUBLIC, MAX_WAITING_PER_CALLER)
READERS = Name(READERS_NAME, Access.READ, MAX_WAITING_PER_CALLER)
CONTROL = Name(BUS_NAME, Access.CONTROL, None)
NAMES = (SNAPSHOTS, PUBLIC, READERS, CONTROL)
"""In the order they are requested: the control name last, so that once clients
see org.damond1 (and D-Bus activation returns), every name is served."""

Answer = Message | Awaitable[Message]
Connect = Callable[[], Awaitable[MessageBus]]
"""A new connection to the bus the daemon serves (for replacing a stuck one)."""


async def own_name(bus: MessageBus, name: Name, replace: bool = False) -> RequestNameReply:
    """Ask for name on bus (DBusError when the policy says no)."""
    flags = NameFlag.DO_NOT_QUEUE
    if name.replaceable:
        flags |= NameFlag.ALLOW_REPLACEMENT
    if replace:
        flags |= NameFlag.REPLACE_EXISTING
    return await bus.request_name(name.name, flags)


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


# --- methods of the tree's nodes ----------------------------------------------------------------


@dataclass(frozen=True)
class Returns:
    """How one kind of method result (hierarchy.Method.returns) goes on the wire."""

    args: tuple[tuple[str, str], ...]
    """(signature, name) of each value of the reply (for introspection)."""
    marshal: Callable[[Any], bytes]
    """The reply's body from the result: made once per result (BusAdapter.method_body)."""

    @property
    def signature(self) -> str:
        return "".join(sig for sig, _ in self.args)


RETURNS: dict[str, Returns] = {
    "snapshot": Returns(SNAPSHOT_ARGS, wire.snapshot_body),
    "tried_regions": Returns(
        ((TRIED_REGIONS_SIGNATURE, "regions"),),
        lambda regions: wire.marshal(TRIED_REGIONS_SIGNATURE, [[list(r) for r in regions]]),
    ),
}
"""Each kind of result a node's method answers with: a new method is a line in its node's
METHODS (hierarchy.py), and here when it answers with a new kind."""

NODE_METHOD_ACCESS = Access.READ
"""Who may call the nodes' methods: each answers with what monitored processes do
(access patterns, address layouts), which is group damond's to read (and root's)."""

SIGNALS = {INTERFACES["context"]: (("Snapshot", SNAPSHOT_ARGS),)}
"""Signals of damond's interfaces, for introspection."""


def _node_method(node: Node | None, iface: str | None, member: str | None) -> Method | None:
    """The node's method of that name, in that interface (any, when none is given)."""
    if node is None:
        return None
    groups = [GROUPS.get(iface, "")] if iface is not None else list(node.METHODS)
    for group in groups:
        for method in node.METHODS.get(group, ()):
            if method.name == member:
                return method
    return None


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


def _build_interface(node_type: type[Node], group: str) -> intr.Interface:
    name = INTERFACES[group]
    props = [
        intr.Property(
            a.name,
            SIGNATURES[a.kind],
            PropertyAccess.READWRITE if a.writable else PropertyAccess.READ,
            # measured anew each aggregation, not announced: clients read them
            annotations=None if a.emits_changed else {EMITS_CHANGED: "false"},
        )
        for a in node_type.GROUPS[group]
    ]
    methods = [
        intr.Method(
            m.name,
            out_args=[intr.Arg(sig, ArgDirection.OUT, arg) for sig, arg in RETURNS[m.returns].args],
        )
        for m in node_type.METHODS.get(group, ())
    ]
    signals = [
        intr.Signal(member, [intr.Arg(s, None, n) for s, n in args])
        for member, args in SIGNALS.get(name, ())
    ]
    return intr.Interface(name, methods=methods, signals=signals, properties=props)


def _machine_id() -> str:
    for path in MACHINE_ID_FILES:
        try:
            return path.read_text().strip()
        except OSError:
            continue
    return ""


# --- one name, one connection -----------------------------------------------------------------


class Face:
    """One of the daemon's names: its connection, its callers' queue, the task answering."""

    def __init__(self, adapter: BusAdapter, name: Name, bus: MessageBus) -> None:
        self.adapter = adapter
        self.name = name
        self.bus = bus
        self.queue: FairQueue[Message] = FairQueue(name.per_caller, MAX_WAITING_PER_NAME)
        self.refused = 0
        """Requests answered LimitsExceeded (over a cap)."""
        self.stalls = 0
        """Times its replies piled up and it stopped reading."""
        self.retired = False
        """Replaced by a new connection: its going away is no loss."""
        self._work = asyncio.Event()
        self._gate: busio.ReadGate | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self) -> None:
        busio.harden(self.bus)
        self._gate = busio.ReadGate(self.bus)
        self.bus.add_message_handler(self._receive)
        self._tasks = [asyncio.ensure_future(self._serve()), asyncio.ensure_future(self._watch())]

    def detach(self) -> None:
        self.bus.remove_message_handler(self._receive)
        for task in self._tasks:
            task.cancel()

    async def _watch(self) -> None:
        """Tell the adapter when the bus goes away (unless this connection was retired)."""
        error: BaseException | None = None
        try:
            await self.bus.wait_for_disconnect()
        except Exception as e:  # the cause of an unexpected disconnection
            error = e
        if not self.retired:
            self.adapter.connection_lost(error)

    def send(self, message: Message) -> None:
        if self.bus.connected:
            busio.send(self.bus, message)

    def _receive(self, msg: Message) -> bool | None:
        """dbus-fast's handler: every method call is ours (dbus-fast answers none)."""
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        if self.queue.put(msg.sender or "", msg):
            self._work.set()
        else:
            self.refused += 1
            self._reply(
                msg,
                Message.new_error(
                    msg,
                    LIMITS_EXCEEDED,
                    f"{self.name.name}: {self.queue.waiting(msg.sender or '')} requests of "
                    f"{msg.sender} already wait (at most {self.name.per_caller} per caller, "
                    f"{MAX_WAITING_PER_NAME} in all): wait for their replies",
                ),
            )
        return True

    def _reply(self, call: Message, reply: Message) -> None:
        if not call.flags & MessageFlag.NO_REPLY_EXPECTED:
            # sent here rather than returned to dbus-fast, whose own send leaves the
            # future unconsumed: "exception never retrieved" when the bus goes away
            self.send(reply)

    async def _serve(self) -> None:
        """Answer the queue in turn; the loop gets a turn every TURN_S."""
        while True:
            await self._work.wait()
            self._work.clear()
            turn_end = time.monotonic() + TURN_S
            while self.queue:
                if busio.unsent_bytes(self.bus, HIGH_WATER_BYTES) > HIGH_WATER_BYTES:
                    await self._drain()
                _, msg = self.queue.pop()
                self._reply(msg, await self._answer(msg))
                if time.monotonic() > turn_end:
                    await asyncio.sleep(0)
                    turn_end = time.monotonic() + TURN_S

    async def _drain(self) -> None:
        """Replies pile up unsent (the bus does not read them): read no more requests
        until they drain, so that callers wait in the bus, not in this process."""
        assert self._gate is not None
        self.stalls += 1
        log.warning(
            "%s: %d MiB of replies wait for the bus; not reading requests until they drain",
            self.name.name,
            HIGH_WATER_BYTES >> 20,
        )
        self._gate.stop()
        try:
            while busio.unsent_bytes(self.bus, LOW_WATER_BYTES) > LOW_WATER_BYTES:
                await asyncio.sleep(DRAIN_POLL_S)
        finally:
            if self.bus.connected:
                self._gate.resume()

    async def _answer(self, msg: Message) -> Message:
        try:
            answer = self.adapter.dispatch(self.name, msg)
            return answer if isinstance(answer, Message) else await answer
        except _Reply as e:
            return Message.new_error(msg, e.name, e.text)
        except DamondError as e:
            err = _error_reply(e)
            return Message.new_error(msg, err.name, err.text)
        except Exception:  # never a traceback to the caller; the log has it
            log.exception(
                "internal error handling %s.%s on %s", msg.interface, msg.member, msg.path
            )
            return Message.new_error(msg, ErrorType.FAILED, "internal error (see the daemon's log)")


# --- the adapter ------------------------------------------------------------------------------


class BusAdapter:
    """Serves one Tree on one connection per Name; listens to the tree for changes."""

    def __init__(
        self, buses: Mapping[Name, MessageBus], tree: Tree, connect: Connect | None = None
    ) -> None:
        self.tree = tree
        self.faces = {name: Face(self, name, bus) for name, bus in buses.items()}
        self.snapshots_dropped = 0
        self.snapshot_connections_replaced = 0
        self._last_drop_log = 0.0
        self._connect = connect
        self._stuck_since: float | None = None
        self._replacing: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[BaseException | None] | None = None
        self._machine_id = _machine_id()
        self._managed = treecache.ManagedObjects(tree, self._managed_entry)
        self._introspection = treecache.Introspection(self._introspect)
        self._bodies: dict[tuple[Node, str], tuple[Any, bytes]] = {}
        """(node, kind of result) -> the latest result of the node's method of that kind,
        and its marshalled body: a latest snapshot is marshalled once for its signal and
        every GetSnapshot, tried regions once for every GetTriedRegions."""
        self._unannounced_at: dict[Context, float] = {}

    def attach(self) -> None:
        self._lost = asyncio.get_running_loop().create_future()
        for face in self.faces.values():
            face.attach()
        self.tree.listeners.append(self)

    def detach(self) -> None:
        if self._replacing is not None:
            self._replacing.cancel()
        for face in self.faces.values():
            face.detach()
        if self in self.tree.listeners:
            self.tree.listeners.remove(self)

    async def wait_lost(self) -> BaseException | None:
        """Until a connection goes away unexpectedly; what ended it (None: the bus closed it)."""
        assert self._lost is not None, "attach() first"
        return await asyncio.shield(self._lost)

    def connection_lost(self, error: BaseException | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(error)

    # --- incoming calls -------------------------------------------------------------

    def dispatch(self, name: Name, msg: Message) -> Answer:
        """The answer to one method call on name: a reply, or one to await."""
        iface, member, path = msg.interface, msg.member, msg.path
        assert path is not None
        if iface == PEER or (iface is None and member in ("Ping", "GetMachineId")):
            return self._peer(msg)
        if name.access is None:
            raise _Reply(
                ACCESS_DENIED, f"{name.name} only sends signals: call {BUS_NAME} or {READERS_NAME}"
            )
        if member == "Introspect" and iface in (INTROSPECTABLE, None) and msg.signature == "":
            return wire.prepared_return(msg, "s", self._introspection.body(path))
        node = self._node(path)
        if iface == PROPERTIES or (iface is None and member in ("Get", "Set", "GetAll")):
            return self._properties(name, msg, node)
        no_args = msg.signature == ""
        if (
            member == "GetManagedObjects"
            and iface in (OBJECT_MANAGER, None)
            and no_args
            and node is self.tree.root
        ):
            _require(name, Access.READ, path, f"{OBJECT_MANAGER}.{member}")
            return self.managed_objects_reply(msg)
        method = _node_method(node, iface, member) if no_args else None
        if method is not None:
            assert node is not None
            _require(name, NODE_METHOD_ACCESS, path, f"{iface}.{member}" if iface else f"{member}")
            returns = RETURNS[method.returns]
            return wire.prepared_return(msg, returns.signature, self.method_body(node, method))
        if node is None:
            raise _Reply(ErrorType.UNKNOWN_OBJECT.value, f"no object at {path}")
        raise _Reply(
            ErrorType.UNKNOWN_METHOD.value,
            f"{path} has no method {iface}.{member} with signature {msg.signature!r}",
        )

    def _peer(self, msg: Message) -> Message:
        """Ping and GetMachineId, answered here: on the system bus the policy denies
        dbus-fast's way (asking the bus)."""
        if msg.member == "Ping" and msg.signature == "":
            return Message.new_method_return(msg)
        if msg.member == "GetMachineId" and msg.signature == "":
            if not self._machine_id:
                raise _Reply(ErrorType.FAILED.value, "no machine id on this host")
            return Message.new_method_return(msg, "s", [self._machine_id])
        raise _Reply(
            ErrorType.UNKNOWN_METHOD.value,
            f"Peer has no method {msg.member} with signature {msg.signature!r}",
        )

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

    def _properties(self, name: Name, msg: Message, node: Node | None) -> Message:
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
        prop = msg.body[1]
        try:
            attr = node.attribute(group, prop)
        except DamondError:
            raise _Reply(
                ErrorType.UNKNOWN_PROPERTY.value, f"{iface} has no property {prop!r}"
            ) from None
        signature = SIGNATURES[attr.kind]
        if msg.member == "Get":
            return Message.new_method_return(msg, "v", [Variant(signature, node.get(group, prop))])
        _require(name, Access.CONTROL, msg.path, f"Set of {iface}.{prop}")
        value: Variant = msg.body[2]
        if not attr.writable:
            raise _Reply(
                ERROR_NAMES[InvalidArgument],
                f"{msg.path}: {iface}.{prop} is read-only",
            )
        if value.signature != signature:
            raise _Reply(
                ERROR_NAMES[InvalidArgument],
                f"{msg.path}: {iface}.{prop} has type {signature!r}, got {value.signature!r}",
            )
        node.set(group, prop, value.value)
        return Message.new_method_return(msg)

    @staticmethod
    def _variants(node: Node, group: str) -> dict[str, Variant]:
        return {
            a.name: Variant(SIGNATURES[a.kind], node.get(group, a.name)) for a in node.GROUPS[group]
        }

    def _interfaces_and_properties(self, node: Node) -> dict[str, dict[str, Variant]]:
        return {INTERFACES[g]: self._variants(node, g) for g in node.GROUPS}

    def _managed_entry(self, node: Node) -> bytes:
        return wire.marshal(
            "oa{sa{sv}}", [object_path(node.path), self._interfaces_and_properties(node)]
        )

    async def managed_objects_reply(self, msg: Message) -> Message:
        """GetManagedObjects: the tree marshalled once per change (treecache)."""
        return wire.prepared_return(msg, "a{oa{sa{sv}}}", await self._managed.body())

    def method_body(self, node: Node, method: Method) -> bytes:
        """The reply body of node's method, marshalled once per result (the method's
        DamondError, e.g. NoData before the first snapshot, goes to the caller)."""
        result = method.call(node)
        kept = self._bodies.get((node, method.returns))
        if kept is None or kept[0] is not result:
            kept = self._kept(node, method.returns, result)
        return kept[1]

    def _kept(self, node: Node, kind: str, result: Any) -> tuple[Any, bytes]:
        kept = self._bodies[node, kind] = (result, RETURNS[kind].marshal(result))
        return kept

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
        """A tree-change signal: from the control name, which only root may receive."""
        face = self.faces.get(CONTROL)
        if face is not None:
            face.send(Message.new_signal(path, iface, member, signature, body))

    def node_added(self, node: Node) -> None:
        self._managed.changed(node)
        self._introspection.reshaped()
        self._signal(
            ROOT_PATH,
            OBJECT_MANAGER,
            "InterfacesAdded",
            "oa{sa{sv}}",
            [object_path(node.path), self._interfaces_and_properties(node)],
        )

    def node_removed(self, node: Node) -> None:
        self._managed.changed(node)
        self._introspection.reshaped()
        for kind in RETURNS:
            self._bodies.pop((node, kind), None)
        if isinstance(node, Context):
            self._unannounced_at.pop(node, None)
        self._signal(
            ROOT_PATH,
            OBJECT_MANAGER,
            "InterfacesRemoved",
            "oas",
            [object_path(node.path), [INTERFACES[g] for g in node.GROUPS]],
        )

    def properties_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None:
        self._managed.changed(node)
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
        now = time.monotonic()
        if now - self._unannounced_at.get(context, -UNANNOUNCED_REFRESH_S) >= UNANNOUNCED_REFRESH_S:
            # its unannounced properties (effective_*) come from the snapshots
            self._unannounced_at[context] = now
            self._managed.changed(context)
        face = self.faces.get(SNAPSHOTS)
        if face is None:
            return
        if busio.queued_messages(face.bus) >= MAX_QUEUED_MESSAGES:
            self.snapshots_dropped += 1
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.warning(
                    "the bus is not keeping up: dropped %d snapshot(s) so far",
                    self.snapshots_dropped,
                )
            if self._stuck_since is None:
                self._stuck_since = now
            elif now - self._stuck_since >= SNAPSHOTS_STUCK_S and self._replacing is None:
                self._replacing = asyncio.ensure_future(self._replace(face))
            return
        self._stuck_since = None
        face.send(
            wire.prepared_signal(
                object_path(context.path),
                INTERFACES["context"],
                "Snapshot",
                SNAPSHOT_SIGNATURE,
                self._kept(context, "snapshot", snapshot)[1],
            )
        )

    async def _replace(self, stuck: Face) -> None:
        """Move the Snapshots name to a new connection (SNAPSHOTS_STUCK_S says why)."""
        try:
            if self._connect is None:
                return
            bus = await self._connect()
            if await own_name(bus, SNAPSHOTS, replace=True) is not RequestNameReply.PRIMARY_OWNER:
                bus.disconnect()
                log.warning("%s: could not move the name to a new connection", SNAPSHOTS_NAME)
                return
            face = Face(self, SNAPSHOTS, bus)
            face.attach()
            self.faces[SNAPSHOTS] = face
            stuck.retired = True
            stuck.detach()
            stuck.bus.disconnect()
            self.snapshot_connections_replaced += 1
            log.warning(
                "%s: the bus read nothing from its connection for %.0f s (a subscriber that "
                "stopped reading holds it): the name moved to a new connection (%d so far)",
                SNAPSHOTS_NAME,
                SNAPSHOTS_STUCK_S,
                self.snapshot_connections_replaced,
            )
        except Exception as e:  # the old connection keeps the name; snapshots stay dropped
            log.warning("%s: could not move to a new connection: %s", SNAPSHOTS_NAME, e)
        finally:
            self._replacing = None
            self._stuck_since = None


def _require(name: Name, needed: Access, path: str, what: str) -> None:
    """Refuse what this name does not answer, as the policy should have (defence in depth:
    a policy installed wrong, or root calling a reader name)."""
    if name.access is not None and name.access >= needed:
        return
    if needed is Access.CONTROL:
        where = f"it is read-only: write through {BUS_NAME} (root)"
    else:
        where = f"access patterns are for group damond: call {READERS_NAME}"
    raise _Reply(ACCESS_DENIED, f"{path}: {what} is not served on {name.name}; {where}")
