"""Bad input over a real bus: random sequences of writes, nr changes, state commands and
method calls with random values and types (hypothesis), and malformed or huge arguments.

After every step: the daemon answers, an error is one of the contract's
(docs/dbus-api.md, "Errors") and never a traceback, the tree is consistent
(object paths match every `nr`), a refused request changed nothing, and an
accepted one changed exactly what it should.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import ROOT, Damond, call
from dbus_fast import MessageType, Variant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dbus_tree import DEFAULTS  # one table of the contract's defaults

from damond.monitor.config import MAX_NR_REGIONS, MAX_REGION_END

PROPS = "org.freedesktop.DBus.Properties"
CONTRACT_ERRORS = {
    "org.damond1.Error.InvalidArgument",
    "org.damond1.Error.Busy",
    "org.damond1.Error.NotSupported",
    "org.damond1.Error.NoData",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.UnknownMethod",
}
INVALID = "org.damond1.Error.InvalidArgument"
K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
T0 = f"{C0}/targets/0"

# Each path kind: its properties (interface, name, signature, writable), written out
# from the contract rather than taken from the code.
KINDS: dict[str, list[tuple[str, str, str, bool]]] = {
    "root": [("org.damond1.Kdamonds", "nr", "u", True)],
    "kdamond": [
        ("org.damond1.Kdamond", "state", "s", True),
        ("org.damond1.Kdamond", "pid", "i", False),
        ("org.damond1.Contexts", "nr", "u", True),
    ],
    "context": [
        ("org.damond1.Context", "operations", "s", True),
        ("org.damond1.Context", "avail_operations", "as", False),
        ("org.damond1.Context", "access_check", "s", True),
        ("org.damond1.Context", "avail_access_checks", "as", False),
        ("org.damond1.Intervals", "sample_us", "t", True),
        ("org.damond1.Intervals", "aggr_us", "t", True),
        ("org.damond1.Intervals", "update_us", "t", True),
        ("org.damond1.NrRegions", "min", "t", True),
        ("org.damond1.NrRegions", "max", "t", True),
        ("org.damond1.Targets", "nr", "u", True),
        ("org.damond1.Schemes", "nr", "u", True),
    ],
    "target": [("org.damond1.Target", "pid", "i", True), ("org.damond1.Regions", "nr", "u", True)],
    "region": [
        ("org.damond1.Region", "start", "t", True),
        ("org.damond1.Region", "end", "t", True),
    ],
    "scheme": [
        ("org.damond1.Scheme", "action", "s", True),
        ("org.damond1.Scheme", "avail_actions", "as", False),
        ("org.damond1.Scheme", "apply_interval_us", "t", True),
        *[("org.damond1.AccessPattern", n, "t", True) for n in ("sz_min", "sz_max")],
        *[
            ("org.damond1.AccessPattern", n, "u", True)
            for n in ("nr_accesses_min", "nr_accesses_max", "age_min", "age_max")
        ],
        *[("org.damond1.Quotas", n, "t", True) for n in ("ms", "bytes", "reset_interval_ms")],
        *[
            ("org.damond1.Quotas", n, "u", True)
            for n in ("weight_sz", "weight_nr_accesses", "weight_age")
        ],
        ("org.damond1.Quotas", "effective_bytes", "t", False),
        ("org.damond1.Watermarks", "metric", "s", True),
        *[("org.damond1.Watermarks", n, "t", True) for n in ("interval_us", "high", "mid", "low")],
        ("org.damond1.Filters", "nr", "u", True),
        *[
            ("org.damond1.SchemeStats", n, "t", False)
            for n in ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")
        ],
    ],
    "filter": [
        ("org.damond1.Filter", "type", "s", True),
        ("org.damond1.Filter", "matching", "b", True),
        ("org.damond1.Filter", "allow", "b", True),
        ("org.damond1.Filter", "memcg_path", "s", True),
        ("org.damond1.Filter", "addr_start", "t", True),
        ("org.damond1.Filter", "addr_end", "t", True),
        ("org.damond1.Filter", "target_idx", "u", True),
    ],
}
NR_IFACES = {
    "root": {"org.damond1.Kdamonds": "kdamonds"},
    "kdamond": {"org.damond1.Contexts": "contexts"},
    "context": {"org.damond1.Targets": "targets", "org.damond1.Schemes": "schemes"},
    "target": {"org.damond1.Regions": "regions"},
    "scheme": {"org.damond1.Filters": "filters"},
}
"""Each kind's nr interfaces and the collection each governs."""
KIND_OF_COLLECTION = {
    "kdamonds": "kdamond",
    "contexts": "context",
    "targets": "target",
    "regions": "region",
    "schemes": "scheme",
    "filters": "filter",
}
VOLATILE = {"org.damond1.SchemeStats": None, "org.damond1.Quotas": "effective_bytes"}
"""What changes by itself while a kdamond runs (a scheme's results): left out of the
before/after comparisons. None: the whole interface."""


def kind_of(path: str) -> str:
    """The kind of object at path ("root", "scheme", ...); "" where none can be."""
    if path == ROOT:
        return "root"
    parts = path[len(ROOT) + 1 :].split("/")
    if len(parts) % 2:
        return ""
    return KIND_OF_COLLECTION.get(parts[-2], "")



# --- strategies -----------------------------------------------------------------------------

KEYWORDS = [
    *("on", "off", "commit", "vaddr", "fvaddr", "paddr", "auto", "clear_refs", "page_idle"),
    *("stat", "pageout", "cold", "willneed", "hugepage", "nohugepage", "lru_prio"),
    *("none", "free_mem_rate", "anon", "addr", "target", "memcg", "young", "/sys/fs/cgroup"),
]
texts = st.one_of(
    st.sampled_from(KEYWORDS),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12),
)
u32 = st.one_of(
    st.integers(0, 4),
    st.sampled_from([5, 64, 65, 256, 257, 4096, 4097, 10**6, 2**31, 2**32 - 1]),
)
u64 = st.one_of(
    st.integers(0, 10),
    st.sampled_from([1000, 5000, 100_000, MAX_NR_REGIONS, MAX_NR_REGIONS + 1]),
    st.sampled_from([0x10000, 0x20000, MAX_REGION_END, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)


SIGNATURES = ["u", "i", "t", "s", "b", "d", "x", "y", "as", "au", "o", "(ii)"]


def values(sig: str, pid: int) -> st.SearchStrategy[Any]:
    """Values of one D-Bus signature, biased to the edges that matter here."""
    pids = st.one_of(st.just(pid), st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1]))
    strategies: dict[str, st.SearchStrategy[Any]] = {
        "u": u32,
        "i": pids,
        "t": u64,
        "s": texts,
        "b": st.booleans(),
        "d": st.floats(allow_nan=False),
        "x": st.integers(-(2**63), 2**63 - 1),
        "y": st.integers(0, 255),
        "as": st.lists(texts, max_size=3),
        "au": st.lists(u32, max_size=3),
        "o": st.sampled_from([ROOT, K0, "/", "/x/y"]),
        "(ii)": st.tuples(pids, pids).map(list),
    }
    return strategies[sig]


def variants(pid: int, sig: str | None = None) -> st.SearchStrategy[Variant]:
    """A value of the given signature, or of any: right or wrong for its property."""
    sigs = st.just(sig) if sig else st.sampled_from(SIGNATURES)
    return sigs.flatmap(lambda s: values(s, pid).map(lambda v: Variant(s, v)))


@st.composite
def paths(draw: st.DrawFn) -> str:
    """Mostly paths that may exist (small indices), sometimes ones that cannot."""
    depth = draw(st.integers(0, 4))
    parts = [ROOT]
    below_context = draw(st.sampled_from([["targets", "regions"], ["schemes", "filters"]]))
    for collection in ["kdamonds", "contexts", *below_context][:depth]:
        index = draw(
            st.one_of(st.integers(0, 1), st.integers(0, 1), st.sampled_from([2, "00", "9999", "x"]))
        )
        parts += [collection, str(index)]
    path = "/".join(parts)
    return draw(st.one_of(st.just(path), st.just(path), st.just(path), st.just(path + "/nope")))


def nr_step(path: str, iface: str, nr: int) -> Step:
    return Step("set", path, PROPS, "Set", "ssv", (iface, "nr", Variant("u", nr)))


@st.composite
def trees(draw: st.DrawFn) -> list[Step]:
    """nr writes, top down, that build a small tree for the random steps to work on."""
    out = []
    kdamonds = draw(st.integers(0, 3))
    out.append(nr_step(ROOT, "org.damond1.Kdamonds", kdamonds))
    for k in range(kdamonds):
        kd = f"{ROOT}/kdamonds/{k}"
        if not draw(st.integers(0, 3)):
            continue
        out.append(nr_step(kd, "org.damond1.Contexts", 1))
        context = f"{kd}/contexts/0"
        targets = draw(st.integers(0, 3))
        out.append(nr_step(context, "org.damond1.Targets", targets))
        for t in range(targets):
            out.append(
                nr_step(f"{context}/targets/{t}", "org.damond1.Regions", draw(st.integers(0, 3)))
            )
        schemes = draw(st.integers(0, 2))
        out.append(nr_step(context, "org.damond1.Schemes", schemes))
        for sc in range(schemes):
            out.append(
                nr_step(f"{context}/schemes/{sc}", "org.damond1.Filters", draw(st.integers(0, 2)))
            )
    return out


@dataclass(frozen=True)
class Step:
    kind: str  # "set", "nr", "state", "call"
    path: str
    interface: str
    member: str
    signature: str
    body: tuple[Any, ...]

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"{self.kind} {self.path} {self.interface}.{self.member} {self.body!r:.80}"


@st.composite
def steps(draw: st.DrawFn, pid: int) -> Step:
    choice = draw(st.sampled_from(["set", "set", "typed", "nr", "nr", "state", "call"]))
    path = draw(paths())
    kind = kind_of(path.removesuffix("/nope"))
    if choice in ("set", "typed"):
        iface, name, sig, _ = draw(st.sampled_from(KINDS[draw(st.sampled_from(list(KINDS)))]))
        if draw(st.booleans()):
            iface, name, sig, _ = draw(st.sampled_from(KINDS[kind]))
        # "typed": the right signature with a random value; "set": any signature
        value = draw(variants(pid, sig if choice == "typed" else None))
        return Step("set", path, PROPS, "Set", "ssv", (iface, name, value))
    if choice == "nr" and kind in NR_IFACES:
        iface = draw(st.sampled_from(sorted(NR_IFACES[kind])))
        return nr_step(path, iface, draw(u32))
    if choice == "state":
        k = draw(st.integers(0, 2))
        cmd = draw(st.sampled_from(["on", "on", "off", "commit", "start", ""]))
        return Step(
            "set",
            f"{ROOT}/kdamonds/{k}",
            PROPS,
            "Set",
            "ssv",
            ("org.damond1.Kdamond", "state", Variant("s", cmd)),
        )
    member, signature, body = draw(
        st.sampled_from(
            [
                ("GetSnapshot", "", ()),
                ("GetSnapshot", "s", ("x",)),
                ("GetTriedRegions", "", ()),
                ("GetTriedRegions", "u", (1,)),
                ("GetManagedObjects", "", ()),
                ("Introspect", "", ()),
                ("Get", "ss", ("org.damond1.Kdamonds", "nr")),
                ("Get", "s", ("org.damond1.Kdamonds",)),
                ("GetAll", "s", ("org.damond1.Context",)),
                ("GetAll", "s", ("org.damond1.Nope",)),
                ("Set", "ss", ("org.damond1.Kdamonds", "nr")),
                ("Nope", "u", (1,)),
            ]
        )
    )
    iface = {
        "GetSnapshot": "org.damond1.Context",
        "GetTriedRegions": "org.damond1.Scheme",
        "GetManagedObjects": "org.freedesktop.DBus.ObjectManager",
        "Introspect": "org.freedesktop.DBus.Introspectable",
        "Nope": "org.damond1.Context",
    }.get(member, PROPS)
    return Step("call", path, iface, member, signature, body)


# --- checks ---------------------------------------------------------------------------------


def check_consistent(objects: dict[str, dict[str, dict[str, Any]]], root_nr: int) -> None:
    """Every object's parent exists and names it among 0..nr-1; every nr has its children."""
    nrs = {(ROOT, "kdamonds"): root_nr}
    for path, ifaces in objects.items():
        kind = kind_of(path)
        for iface, collection in NR_IFACES.get(kind, {}).items():
            nrs[(path, collection)] = ifaces[iface]["nr"]
        expected = {iface for iface, _, _, _ in KINDS[kind]}
        assert set(ifaces) == expected, (path, set(ifaces))
    children: dict[tuple[str, str], list[int]] = {p: [] for p in nrs}
    for path in objects:
        parent, _, index = path.rpartition("/")
        parent, _, collection = parent.rpartition("/")
        assert (parent, collection) in nrs, f"{path} has no parent object"
        children[(parent, collection)].append(int(index))
    for parent, nr in nrs.items():
        assert sorted(children[parent]) == list(range(nr)), (parent, nr, sorted(children[parent]))


async def snapshot_tree(d: Damond) -> tuple[int, dict[str, Any]]:
    """Kdamonds.nr and every object's properties, but the VOLATILE ones."""
    objects = {
        path: {
            iface: {
                name: value
                for name, value in props.items()
                if iface not in VOLATILE or VOLATILE[iface] not in (None, name)
            }
            for iface, props in ifaces.items()
        }
        for path, ifaces in (await d.managed_objects()).items()
    }
    return await d.get(ROOT, "org.damond1.Kdamonds", "nr"), objects


def expected_after_set(
    before: tuple[int, dict[str, Any]], path: str, iface: str, name: str, value: Any, pid: int
) -> tuple[int, dict[str, Any]] | None:
    """What a successful Set of a plain property leaves; None for nr and state (checked
    separately)."""
    if name in ("nr", "state"):
        return None
    root_nr, objects = before
    after = {p: {i: dict(props) for i, props in v.items()} for p, v in objects.items()}
    after[path][iface][name] = value
    return root_nr, after


async def run_step(d: Damond, step: Step, pid: int) -> None:
    before = await snapshot_tree(d)
    reply = await call(
        d.client, step.path, step.interface, step.member, step.signature, list(step.body)
    )
    assert d.process.poll() is None, f"damond died on {step}"
    after = await snapshot_tree(d)  # also: the daemon still answers
    check_consistent(after[1], after[0])
    if reply.message_type is MessageType.ERROR:
        assert reply.error_name in CONTRACT_ERRORS, (step, reply.error_name, reply.body)
        text = reply.body[0]
        assert "Traceback" not in text and len(text) < 400, text
        assert after == before, f"refused {step} changed the tree"
        if step.kind == "set":
            iface, name, value = step.body
            props = dict(
                (n, (s, w)) for i, n, s, w in KINDS.get(kind_of(step.path), []) if i == iface
            )
            if step.path in after[1] or step.path == ROOT:
                if name in props and value.signature != props[name][0]:
                    assert reply.error_name == INVALID, (step, reply.error_name)
                if name in props and not props[name][1]:
                    assert reply.error_name == INVALID, (step, reply.error_name)
        return
    if step.kind != "set":
        assert after == before, f"{step} changed the tree"
        return
    iface, name, value = step.body
    if name == "state":
        state = await d.get(step.path, "org.damond1.Kdamond", "state")
        assert state == ("off" if value.value == "off" else "on"), (step, state)
        return
    if name == "nr":
        nr = await d.get(step.path, iface, "nr")
        assert nr == value.value
        # kept children keep their values: everything outside the collection is as before
        prefix = f"{step.path}/{NR_IFACES[kind_of(step.path)][iface]}/"
        for p, props in before[1].items():
            if p == step.path:
                props = {**props, iface: {"nr": nr}}
            if not p.startswith(prefix) or int(p[len(prefix) :].split("/")[0]) < nr:
                assert after[1][p] == props, p
        created = [p for p in after[1] if p not in before[1]]
        for p in created:  # new children get the defaults, except for their own nr
            assert all(
                DEFAULTS[(i, n)] == v
                for i, props in after[1][p].items()
                for n, v in props.items()
                if (i, n) in DEFAULTS
            ), (p, after[1][p])
        return
    assert after == expected_after_set(before, step.path, iface, name, value.value, pid), step


async def reset(d: Damond) -> None:
    for k in range(await d.get(ROOT, "org.damond1.Kdamonds", "nr")):
        await d.set(f"{ROOT}/kdamonds/{k}", "org.damond1.Kdamond", "state", "s", "off")
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 0)


# --- the property-based test ----------------------------------------------------------------


@pytest.fixture(scope="module")
def target() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "3600"])
    yield process.pid
    process.kill()
    process.wait()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_random_sequences_keep_the_contract(
    damond: Damond, target: int, data: st.DataObject
) -> None:
    started = time.monotonic()
    await reset(damond)
    sequence = data.draw(trees(), label="tree") + data.draw(
        st.lists(steps(target), min_size=5, max_size=40), label="steps"
    )
    for step in sequence:
        await run_step(damond, step, target)
    assert time.monotonic() - started < 20


# --- malformed and huge arguments -----------------------------------------------------------


async def expect(d: Damond, reply: Any, error: str, *words: str) -> None:
    assert reply.error_name == error, (reply.error_name, reply.body)
    text = reply.body[0]
    assert all(w in text for w in words), text
    assert len(text) < 400 and "Traceback" not in text, text
    assert d.process.poll() is None


async def test_huge_and_malformed_arguments(damond: Damond, target: int) -> None:
    d = damond
    before = await snapshot_tree(d)
    # nr = 10^6 at every level, and nr as a 10^6-element array
    await expect(
        d, await d.try_set(ROOT, "org.damond1.Kdamonds", "nr", "u", 10**6), INVALID, "limit"
    )
    big = await call(
        d.client,
        ROOT,
        PROPS,
        "Set",
        "ssv",
        ["org.damond1.Kdamonds", "nr", Variant("au", [7] * 10**6)],
    )
    await expect(d, big, INVALID, "'u'", "'au'")
    # a 1 MB string where a keyword belongs: refused, and not echoed back in full
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await expect(d, await d.try_set(K0, "org.damond1.Kdamond", "state", "s", "x" * 10**6), INVALID)
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 0)
    assert await snapshot_tree(d) == before
    # a 10^5-element argument to a method that takes none
    reply = await call(d.client, C0, "org.damond1.Context", "GetSnapshot", "as", [["x"] * 10**5])
    await expect(d, reply, "org.freedesktop.DBus.Error.UnknownObject")
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    reply = await call(d.client, C0, "org.damond1.Context", "GetSnapshot", "as", [["x"] * 10**5])
    await expect(d, reply, "org.freedesktop.DBus.Error.UnknownMethod")
    for nr_path, iface in [(K0, "org.damond1.Contexts"), (C0, "org.damond1.Targets")]:
        reply = await d.try_set(nr_path, iface, "nr", "u", 10**6)
        assert reply.error_name == INVALID, reply.body


async def test_negative_and_odd_pids_are_refused_at_on(damond: Damond) -> None:
    d = damond
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await d.set(C0, "org.damond1.Targets", "nr", "u", 1)
    for pid in [-1, -(2**31), 0, 2**31 - 1, 1 << 22]:
        await d.set(T0, "org.damond1.Target", "pid", "i", pid)  # stored, as sysfs does
        before = await snapshot_tree(d)
        reply = await d.try_set(K0, "org.damond1.Kdamond", "state", "s", "on")
        await expect(d, reply, INVALID, T0, f"pid {pid}")
        assert await snapshot_tree(d) == before


async def region_target(d: Damond, pid: int, start: int, end: int) -> None:
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await d.set(C0, "org.damond1.Context", "operations", "s", "fvaddr")
    await d.set(C0, "org.damond1.Targets", "nr", "u", 1)
    await d.set(T0, "org.damond1.Target", "pid", "i", pid)
    await d.set(T0, "org.damond1.Regions", "nr", "u", 1)
    await d.set(f"{T0}/regions/0", "org.damond1.Region", "start", "t", start)
    await d.set(f"{T0}/regions/0", "org.damond1.Region", "end", "t", end)


async def test_ranges_at_the_top_of_the_address_space(damond: Damond, target: int) -> None:
    """A region ending at 2^64-1 cannot be page aligned in 64 bits: refused at on (it
    used to be accepted and the kdamond then failed on an integer overflow)."""
    d = damond
    await region_target(d, target, 2**64 - 8192, 2**64 - 1)
    await expect(
        d,
        await d.try_set(K0, "org.damond1.Kdamond", "state", "s", "on"),
        INVALID,
        "end",
        "regions/0",
    )
    assert await d.get(K0, "org.damond1.Kdamond", "state") == "off"
    # the last whole page is fine: monitored (nothing is mapped there), then off
    await d.set(f"{T0}/regions/0", "org.damond1.Region", "start", "t", MAX_REGION_END - 4096)
    await d.set(f"{T0}/regions/0", "org.damond1.Region", "end", "t", MAX_REGION_END)
    snapshots = await d.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
    await d.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    body = (await snapshots.next()).body
    assert [tuple(r[:3]) for r in body[3][0][2]] == [(MAX_REGION_END - 4096, MAX_REGION_END, 0)]
    assert await d.get(K0, "org.damond1.Kdamond", "state") == "on"
    await d.set(K0, "org.damond1.Kdamond", "state", "s", "off")


async def test_region_count_caps(damond: Damond, target: int) -> None:
    d = damond
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await d.set(C0, "org.damond1.Targets", "nr", "u", 5)
    for t in range(4):
        await d.set(f"{C0}/targets/{t}", "org.damond1.Regions", "nr", "u", 4096)
    before = await snapshot_tree(d)
    reply = await d.try_set(f"{C0}/targets/4", "org.damond1.Regions", "nr", "u", 4096)
    await expect(d, reply, INVALID, "16384", "in the tree")
    reply = await d.try_set(f"{C0}/targets/4", "org.damond1.Regions", "nr", "u", 4097)
    await expect(d, reply, INVALID, "limit of 4096")
    assert await snapshot_tree(d) == before
    await d.set(C0, "org.damond1.Targets", "nr", "u", 1)
    await d.set(f"{C0}/targets/0", "org.damond1.Regions", "nr", "u", 0)
    await d.set(f"{C0}/targets/0", "org.damond1.Target", "pid", "i", target)
    # nr_regions: the engine would split the address space into min regions at once
    await d.set(C0, "org.damond1.NrRegions", "max", "t", 2**64 - 1)
    await d.set(C0, "org.damond1.NrRegions", "min", "t", 2**40)
    reply = await d.try_set(K0, "org.damond1.Kdamond", "state", "s", "on")
    await expect(d, reply, INVALID, "max", str(MAX_NR_REGIONS))
    await d.set(C0, "org.damond1.NrRegions", "max", "t", MAX_NR_REGIONS)
    await d.set(C0, "org.damond1.NrRegions", "min", "t", MAX_NR_REGIONS)
    await d.set(C0, "org.damond1.Targets", "nr", "u", 2)
    await d.set(f"{C0}/targets/1", "org.damond1.Target", "pid", "i", target)
    reply = await d.try_set(K0, "org.damond1.Kdamond", "state", "s", "on")
    await expect(d, reply, INVALID, "would start with 20000 regions")
    assert await d.get(K0, "org.damond1.Kdamond", "state") == "off"
