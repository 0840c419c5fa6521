"""Bodies damond marshals itself (wire.py) are dbus-fast's bytes; the fair queue's order.

dbus-fast's own marshaller is the oracle: whatever damond builds once and
sends many times must be byte for byte what dbus-fast would have sent.
"""

from __future__ import annotations

import numpy as np
import pytest
from dbus_fast import Message, Variant

from damond import wire
from damond.fairqueue import FairQueue
from damond.monitor.snapshot import Snapshot, TargetSnapshot


def target(index: int, n: int, rng: np.random.Generator) -> TargetSnapshot:
    starts = np.sort(rng.integers(0, 1 << 47, n, dtype=np.uint64))
    return TargetSnapshot(
        index,
        -1 if index % 2 else 1000 + index,
        starts,
        starts + np.uint64(4096),
        rng.integers(0, 20, n).astype(np.uint32),
        rng.integers(0, 1 << 31, n).astype(np.uint32),
    )


@pytest.mark.parametrize("shape", [[], [0], [1], [3], [1000], [5, 0, 7], [1000, 1000]])
def test_snapshot_body_is_dbus_fasts(shape: list[int]) -> None:
    rng = np.random.default_rng(len(shape))
    snapshot = Snapshot(
        7, 1_700_000_000_000_000, 20, tuple(target(i, n, rng) for i, n in enumerate(shape))
    )
    assert wire.snapshot_body(snapshot) == wire.marshal("ttua(uia(ttuu))", snapshot.as_dbus())


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_an_array_of_marshalled_entries_is_the_marshalled_dict(n: int) -> None:
    objects = {
        f"/org/damond1/kdamonds/{i}" + "/x" * i: {
            "org.damond1.Kdamond": {"state": Variant("s", "off" * (i + 1)), "pid": Variant("i", -1)}
        }
        for i in range(n)
    }
    entries = [wire.marshal("oa{sa{sv}}", [path, ifaces]) for path, ifaces in objects.items()]
    assert wire.array_at(0, entries) == wire.marshal("a{oa{sa{sv}}}", [objects])


def test_a_prepared_message_is_dbus_fasts_message() -> None:
    snapshot = Snapshot(3, 99, 5, (target(0, 10, np.random.default_rng(0)),))
    call = Message(
        destination="org.damond1",
        path="/org/damond1/kdamonds/0/contexts/0",
        interface="org.damond1.Context",
        member="GetSnapshot",
        serial=5,
        sender=":1.7",
    )
    ours = wire.prepared_return(call, "ttua(uia(ttuu))", wire.snapshot_body(snapshot))
    theirs = Message.new_method_return(call, "ttua(uia(ttuu))", snapshot.as_dbus())
    ours.serial = theirs.serial = 9
    assert bytes(ours._marshall(False)) == bytes(theirs._marshall(False))
    path = "/org/damond1/kdamonds/0/contexts/0"
    ours = wire.prepared_signal(
        path, "org.damond1.Context", "Snapshot", "ttua(uia(ttuu))", wire.snapshot_body(snapshot)
    )
    theirs = Message.new_signal(
        path, "org.damond1.Context", "Snapshot", "ttua(uia(ttuu))", snapshot.as_dbus()
    )
    ours.serial = theirs.serial = 4
    assert bytes(ours._marshall(False)) == bytes(theirs._marshall(False))


def test_fair_queue_serves_callers_in_turn_and_caps_each() -> None:
    queue: FairQueue[int] = FairQueue(per_caller=3, total=5)
    assert all(queue.put("a", i) for i in range(3))
    assert not queue.put("a", 3)  # a's cap
    assert queue.put("b", 10) and queue.put("c", 20)
    assert not queue.put("d", 30)  # the total
    assert queue.waiting("a") == 3 and len(queue) == 5
    order = [queue.pop() for _ in range(5)]
    assert order == [("a", 0), ("b", 10), ("c", 20), ("a", 1), ("a", 2)]
    assert len(queue) == 0 and queue.put("a", 4)
