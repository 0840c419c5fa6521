"""The tree as readers see it, marshalled once per change instead of once per call.

GetManagedObjects of the largest tree is megabytes built from tens of
thousands of objects (0.16 s of event loop for 16,000 regions); Introspect
is cheap, but thousands of calls a second are not. Both answers change only
when the tree does, so they are kept, and the adapter tells the caches what
changed (its tree events): a changed object's GetManagedObjects entry is
marshalled again, the rest is reused; a new or removed object clears the
introspection of every path.

A rebuild never holds the event loop for long: missing entries are
marshalled in slices of at most BUILD_SLICE_S, with the loop free between
them, and every caller waiting for the answer shares one rebuild. The
answers are as current as the tree events, which the contract requires for
every property change (docs/dbus-api.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from damond import wire
from damond.hierarchy import Node, Tree

BUILD_SLICE_S = 0.005
"""Longest stretch of marshalling between two turns of the event loop."""


class ManagedObjects:
    """The GetManagedObjects body (``a{oa{sa{sv}}}``), one marshalled entry per object."""

    def __init__(self, tree: Tree, entry: Callable[[Node], bytes]) -> None:
        self.tree = tree
        self._entry = entry
        """Marshals one object's ``(o a{sa{sv}})``."""
        self._entries: dict[Node, bytes] = {}
        self._body: bytes | None = None
        self._rebuild: asyncio.Task[None] | None = None

    def changed(self, node: Node) -> None:
        """node's properties changed, or it was added or removed."""
        self._entries.pop(node, None)
        self._body = None

    async def body(self) -> bytes:
        """The current body; marshals what changed since the last call, in slices."""
        while self._body is None:
            if self._rebuild is None:
                self._rebuild = asyncio.ensure_future(self._build())
            rebuild = self._rebuild
            await asyncio.shield(rebuild)  # a caller that gives up leaves it to the others
        return self._body

    async def _build(self) -> None:
        try:
            slice_end = time.monotonic() + BUILD_SLICE_S
            for node in self._objects():
                if node in self._entries:
                    continue
                self._entries[node] = self._entry(node)
                if time.monotonic() > slice_end:
                    await asyncio.sleep(0)
                    slice_end = time.monotonic() + BUILD_SLICE_S
            # what changed during the slices is marshalled now, with the loop held:
            # the answer is the tree as it is at this moment
            objects = self._objects()
            entries = {n: self._entries.get(n) or self._entry(n) for n in objects}
            self._entries = entries  # forgets removed objects
            self._body = wire.array_at(0, entries.values())
        finally:
            self._rebuild = None

    def _objects(self) -> list[Node]:
        root = self.tree.root
        return [n for n in root.walk() if n is not root]


class Introspection:
    """Introspect replies by object path, until the tree's shape changes.

    At most MAX_PATHS are kept (least recently asked go first): a caller
    walking every region's path must not make the cache as big as the tree.
    """

    MAX_PATHS = 1024

    def __init__(self, build: Callable[[str], str]) -> None:
        self._build = build
        self._bodies: OrderedDict[str, bytes] = OrderedDict()

    def reshaped(self) -> None:
        """An object was added or removed: any path's children may have changed."""
        self._bodies.clear()

    def body(self, path: str) -> bytes:
        """The marshalled ``s`` of path's introspection XML (build may raise for a bad path)."""
        body = self._bodies.get(path)
        if body is not None:
            self._bodies.move_to_end(path)
            return body
        body = self._bodies[path] = wire.marshal("s", [self._build(path)])
        if len(self._bodies) > self.MAX_PATHS:
            self._bodies.popitem(last=False)
        return body
