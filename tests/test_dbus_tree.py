"""The admin tree over a real dbus-daemon: introspection, defaults, nr semantics."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from conftest import ROOT, Damond, call

# docs/dbus-api.md, written out independently of the code: path kind → interface →
# {property: (signature, access)}.
CONTRACT = {
    "root": {"org.damond1.Kdamonds": {"nr": ("u", "readwrite")}},
    "kdamond": {
        "org.damond1.Kdamond": {"state": ("s", "readwrite"), "pid": ("i", "read")},
        "org.damond1.Contexts": {"nr": ("u", "readwrite")},
    },
    "context": {
        "org.damond1.Context": {
            "operations": ("s", "readwrite"),
            "avail_operations": ("as", "read"),
            "access_check": ("s", "readwrite"),
            "avail_access_checks": ("as", "read"),
            "effective_access_check": ("s", "read"),
            "backend": ("s", "readwrite"),
            "avail_backends": ("as", "read"),
            "effective_backend": ("s", "read"),
            "access_granularity": ("s", "read"),
            "cpu_limit_pct": ("u", "readwrite"),
            "effective_sample_us": ("t", "read"),
            "effective_aggr_us": ("t", "read"),
        },
        "org.damond1.Intervals": {
            "sample_us": ("t", "readwrite"),
            "aggr_us": ("t", "readwrite"),
            "update_us": ("t", "readwrite"),
        },
        "org.damond1.NrRegions": {"min": ("t", "readwrite"), "max": ("t", "readwrite")},
        "org.damond1.Targets": {"nr": ("u", "readwrite")},
        "org.damond1.Schemes": {"nr": ("u", "readwrite")},
    },
    "target": {
        "org.damond1.Target": {"pid": ("i", "readwrite")},
        "org.damond1.Regions": {"nr": ("u", "readwrite")},
    },
    "region": {"org.damond1.Region": {"start": ("t", "readwrite"), "end": ("t", "readwrite")}},
    "scheme": {
        "org.damond1.Scheme": {
            "action": ("s", "readwrite"),
            "avail_actions": ("as", "read"),
            "apply_interval_us": ("t", "readwrite"),
        },
        "org.damond1.AccessPattern": {
            "sz_min": ("t", "readwrite"),
            "sz_max": ("t", "readwrite"),
            "nr_accesses_min": ("u", "readwrite"),
            "nr_accesses_max": ("u", "readwrite"),
            "age_min": ("u", "readwrite"),
            "age_max": ("u", "readwrite"),
        },
        "org.damond1.Quotas": {
            "ms": ("t", "readwrite"),
            "bytes": ("t", "readwrite"),
            "reset_interval_ms": ("t", "readwrite"),
            "weight_sz": ("u", "readwrite"),
            "weight_nr_accesses": ("u", "readwrite"),
            "weight_age": ("u", "readwrite"),
            "effective_bytes": ("t", "read"),
        },
        "org.damond1.Watermarks": {
            "metric": ("s", "readwrite"),
            "interval_us": ("t", "readwrite"),
            "high": ("t", "readwrite"),
            "mid": ("t", "readwrite"),
            "low": ("t", "readwrite"),
        },
        "org.damond1.Filters": {"nr": ("u", "readwrite")},
        "org.damond1.SchemeStats": {
            "nr_tried": ("t", "read"),
            "sz_tried": ("t", "read"),
            "nr_applied": ("t", "read"),
            "sz_applied": ("t", "read"),
            "qt_exceeds": ("t", "read"),
        },
    },
    "filter": {
        "org.damond1.Filter": {
            "type": ("s", "readwrite"),
            "matching": ("b", "readwrite"),
            "allow": ("b", "readwrite"),
            "memcg_path": ("s", "readwrite"),
            "addr_start": ("t", "readwrite"),
            "addr_end": ("t", "readwrite"),
            "target_idx": ("u", "readwrite"),
        }
    },
}
STANDARD = {
    "org.freedesktop.DBus.Introspectable",
    "org.freedesktop.DBus.Properties",
    "org.freedesktop.DBus.Peer",
}
DEFAULTS = {
    ("org.damond1.Kdamond", "state"): "off",
    ("org.damond1.Kdamond", "pid"): -1,
    ("org.damond1.Contexts", "nr"): 0,
    ("org.damond1.Context", "operations"): "vaddr",
    ("org.damond1.Context", "access_check"): "auto",
    ("org.damond1.Context", "effective_access_check"): "",
    ("org.damond1.Context", "backend"): "auto",
    ("org.damond1.Context", "effective_backend"): "",
    ("org.damond1.Context", "access_granularity"): "",
    ("org.damond1.Context", "cpu_limit_pct"): 10,
    ("org.damond1.Context", "effective_sample_us"): 0,
    ("org.damond1.Context", "effective_aggr_us"): 0,
    ("org.damond1.Intervals", "sample_us"): 5000,
    ("org.damond1.Intervals", "aggr_us"): 100000,
    ("org.damond1.Intervals", "update_us"): 60000000,
    ("org.damond1.NrRegions", "min"): 10,
    ("org.damond1.NrRegions", "max"): 1000,
    ("org.damond1.Targets", "nr"): 0,
    ("org.damond1.Target", "pid"): -1,
    ("org.damond1.Regions", "nr"): 0,
    ("org.damond1.Region", "start"): 0,
    ("org.damond1.Region", "end"): 0,
    ("org.damond1.Schemes", "nr"): 0,
    ("org.damond1.Scheme", "action"): "stat",
    ("org.damond1.Scheme", "apply_interval_us"): 0,
    ("org.damond1.AccessPattern", "sz_min"): 0,
    ("org.damond1.AccessPattern", "sz_max"): 2**64 - 1,
    ("org.damond1.AccessPattern", "nr_accesses_min"): 0,
    ("org.damond1.AccessPattern", "nr_accesses_max"): 2**32 - 1,
    ("org.damond1.AccessPattern", "age_min"): 0,
    ("org.damond1.AccessPattern", "age_max"): 2**32 - 1,
    ("org.damond1.Quotas", "ms"): 0,
    ("org.damond1.Quotas", "bytes"): 0,
    ("org.damond1.Quotas", "reset_interval_ms"): 0,
    ("org.damond1.Quotas", "weight_sz"): 0,
    ("org.damond1.Quotas", "weight_nr_accesses"): 0,
    ("org.damond1.Quotas", "weight_age"): 0,
    ("org.damond1.Quotas", "effective_bytes"): 0,
    ("org.damond1.Watermarks", "metric"): "none",
    ("org.damond1.Watermarks", "interval_us"): 0,
    ("org.damond1.Watermarks", "high"): 0,
    ("org.damond1.Watermarks", "mid"): 0,
    ("org.damond1.Watermarks", "low"): 0,
    ("org.damond1.Filters", "nr"): 0,
    ("org.damond1.SchemeStats", "nr_tried"): 0,
    ("org.damond1.SchemeStats", "sz_tried"): 0,
    ("org.damond1.SchemeStats", "nr_applied"): 0,
    ("org.damond1.SchemeStats", "sz_applied"): 0,
    ("org.damond1.SchemeStats", "qt_exceeds"): 0,
    ("org.damond1.Filter", "type"): "anon",
    ("org.damond1.Filter", "matching"): False,
    ("org.damond1.Filter", "allow"): False,
    ("org.damond1.Filter", "memcg_path"): "",
    ("org.damond1.Filter", "addr_start"): 0,
    ("org.damond1.Filter", "addr_end"): 0,
    ("org.damond1.Filter", "target_idx"): 0,
}
K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
T0 = f"{C0}/targets/0"
R0 = f"{T0}/regions/0"
S0 = f"{C0}/schemes/0"
F0 = f"{S0}/filters/0"


async def build_full_tree(d: Damond) -> None:
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await d.set(C0, "org.damond1.Targets", "nr", "u", 1)
    await d.set(T0, "org.damond1.Regions", "nr", "u", 1)
    await d.set(C0, "org.damond1.Schemes", "nr", "u", 1)
    await d.set(S0, "org.damond1.Filters", "nr", "u", 1)


async def introspect(d: Damond, path: str) -> ET.Element:
    reply = await call(d.client, path, "org.freedesktop.DBus.Introspectable", "Introspect")
    return ET.fromstring(reply.body[0])


async def test_introspection_matches_contract(damond: Damond) -> None:
    await build_full_tree(damond)
    for kind, path in [
        ("root", ROOT),
        ("kdamond", K0),
        ("context", C0),
        ("target", T0),
        ("region", R0),
        ("scheme", S0),
        ("filter", F0),
    ]:
        node = await introspect(damond, path)
        seen = {
            i.get("name"): {
                p.get("name"): (p.get("type"), p.get("access")) for p in i.findall("property")
            }
            for i in node.findall("interface")
        }
        ours = {name: props for name, props in seen.items() if name.startswith("org.damond1")}
        assert ours == CONTRACT[kind], path
        assert set(seen) >= STANDARD, path
        has_manager = "org.freedesktop.DBus.ObjectManager" in seen
        assert has_manager == (kind == "root"), path
    context = await introspect(damond, C0)
    iface = next(i for i in context.findall("interface") if i.get("name") == "org.damond1.Context")
    signal = iface.find("signal[@name='Snapshot']")
    assert signal is not None
    assert "".join(a.get("type") or "" for a in signal.findall("arg")) == "ttua(uia(ttuu))"
    method = iface.find("method[@name='GetSnapshot']")
    assert method is not None
    assert "".join(a.get("type") or "" for a in method.findall("arg")) == "ttua(uia(ttuu))"
    # the effective intervals change with every aggregation: never announced, and said so
    unannounced = {
        p.get("name")
        for p in iface.findall("property")
        if any(
            a.get("name") == "org.freedesktop.DBus.Property.EmitsChangedSignal"
            and a.get("value") == "false"
            for a in p.findall("annotation")
        )
    }
    assert unannounced == {"effective_sample_us", "effective_aggr_us"}
    scheme = await introspect(damond, S0)
    iface = next(i for i in scheme.findall("interface") if i.get("name") == "org.damond1.Scheme")
    method = iface.find("method[@name='GetTriedRegions']")
    assert method is not None
    assert [(a.get("type"), a.get("direction")) for a in method.findall("arg")] == [
        ("a(uttuu)", "out")
    ]


async def test_busctl_introspect_shows_types(damond: Damond) -> None:
    await build_full_tree(damond)
    out = damond.busctl("introspect", "org.damond1", C0).stdout
    lines = {tuple(line.split()[:3]) for line in out.splitlines() if line.startswith(".")}
    assert (".sample_us", "property", "t") in lines
    assert (".avail_operations", "property", "as") in lines
    assert (".GetSnapshot", "method", "-") in lines
    assert (".Snapshot", "signal", "ttua(uia(ttuu))") in lines


async def test_defaults(damond: Damond) -> None:
    # every nr starts at 0, one level at a time
    assert await damond.get(ROOT, "org.damond1.Kdamonds", "nr") == 0
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    assert await damond.get(K0, "org.damond1.Contexts", "nr") == 0
    await damond.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    assert await damond.get(C0, "org.damond1.Targets", "nr") == 0
    await damond.set(C0, "org.damond1.Targets", "nr", "u", 1)
    assert await damond.get(T0, "org.damond1.Regions", "nr") == 0
    await damond.set(T0, "org.damond1.Regions", "nr", "u", 1)
    assert await damond.get(C0, "org.damond1.Schemes", "nr") == 0
    await damond.set(C0, "org.damond1.Schemes", "nr", "u", 1)
    assert await damond.get(S0, "org.damond1.Filters", "nr") == 0
    await damond.set(S0, "org.damond1.Filters", "nr", "u", 1)
    paths = {
        "org.damond1.Kdamond": K0,
        "org.damond1.Context": C0,
        "org.damond1.Intervals": C0,
        "org.damond1.NrRegions": C0,
        "org.damond1.Target": T0,
        "org.damond1.Region": R0,
        **{iface: S0 for iface in CONTRACT["scheme"]},
        "org.damond1.Filter": F0,
    }
    for (iface, name), value in DEFAULTS.items():
        if name != "nr":
            assert await damond.get(paths[iface], iface, name) == value, (iface, name)


def tree_paths(d: Damond) -> set[str]:
    out = d.busctl("tree", "--list", "org.damond1").stdout
    return {line.strip() for line in out.splitlines() if line.strip().startswith(ROOT)}


async def test_busctl_tree_shows_exactly_what_nr_created(damond: Damond) -> None:
    assert tree_paths(damond) == {ROOT}
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 2)
    await damond.set(f"{ROOT}/kdamonds/1", "org.damond1.Contexts", "nr", "u", 1)
    await damond.set(f"{ROOT}/kdamonds/1/contexts/0", "org.damond1.Targets", "nr", "u", 2)
    expected_objects = {
        ROOT,
        f"{ROOT}/kdamonds/0",
        f"{ROOT}/kdamonds/1",
        f"{ROOT}/kdamonds/1/contexts/0",
        f"{ROOT}/kdamonds/1/contexts/0/targets/0",
        f"{ROOT}/kdamonds/1/contexts/0/targets/1",
    }
    groups = {
        f"{ROOT}/kdamonds",
        f"{ROOT}/kdamonds/1/contexts",
        f"{ROOT}/kdamonds/1/contexts/0/targets",
    }
    assert tree_paths(damond) == expected_objects | groups
    assert set(await damond.managed_objects()) == expected_objects - {ROOT}


async def test_nr_up_and_down_keeps_and_destroys_subtrees(damond: Damond) -> None:
    added = await damond.signals(
        interface="org.freedesktop.DBus.ObjectManager", member="InterfacesAdded"
    )
    removed = await damond.signals(
        interface="org.freedesktop.DBus.ObjectManager", member="InterfacesRemoved"
    )
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 2)
    for k in (0, 1):
        await damond.set(f"{ROOT}/kdamonds/{k}", "org.damond1.Contexts", "nr", "u", 1)
        await damond.set(
            f"{ROOT}/kdamonds/{k}/contexts/0", "org.damond1.Intervals", "aggr_us", "t", 200000 + k
        )
    await damond.set(f"{ROOT}/kdamonds/1/contexts/0", "org.damond1.Targets", "nr", "u", 1)

    first = await added.next()
    assert first.path == ROOT  # sent from the manager's path, not the object's
    assert first.body[0] == f"{ROOT}/kdamonds/0"
    assert first.body[1]["org.damond1.Kdamond"]["state"].value == "off"
    assert first.body[1]["org.damond1.Contexts"]["nr"].value == 0
    await added.next()  # kdamonds/1
    await added.next()  # kdamonds/0/contexts/0
    ctx = await added.next()
    assert ctx.body[0] == f"{ROOT}/kdamonds/1/contexts/0"
    assert ctx.body[1]["org.damond1.Intervals"]["sample_us"].value == 5000

    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    gone = []
    while len(gone) < 3:
        msg = await removed.next()
        assert msg.path == ROOT
        gone.append(msg.body[0])
    # the subtree goes deepest first, and only kdamonds/1's subtree goes
    assert gone == [
        f"{ROOT}/kdamonds/1/contexts/0/targets/0",
        f"{ROOT}/kdamonds/1/contexts/0",
        f"{ROOT}/kdamonds/1",
    ]
    assert set(msg.body[1]) == {"org.damond1.Kdamond", "org.damond1.Contexts"}
    # the kept kdamond keeps its values
    assert (
        await damond.get(f"{ROOT}/kdamonds/0/contexts/0", "org.damond1.Intervals", "aggr_us")
        == 200000
    )
    # growing again gives defaults, not the removed subtree's values
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 2)
    assert await damond.get(f"{ROOT}/kdamonds/1", "org.damond1.Contexts", "nr") == 0
    reply = await damond.try_set(
        f"{ROOT}/kdamonds/1/contexts/0", "org.damond1.Intervals", "aggr_us", "t", 5
    )
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownObject"


async def test_properties_changed_on_set(damond: Damond) -> None:
    await build_full_tree(damond)
    changes = await damond.signals(
        path=C0, interface="org.freedesktop.DBus.Properties", member="PropertiesChanged"
    )
    await damond.set(C0, "org.damond1.Intervals", "aggr_us", "t", 250000)
    msg = await changes.next()
    assert msg.body[0] == "org.damond1.Intervals"
    assert {k: v.value for k, v in msg.body[1].items()} == {"aggr_us": 250000}
    # writing the same value again changes nothing and says nothing
    await damond.set(C0, "org.damond1.Intervals", "aggr_us", "t", 250000)
    await damond.set(C0, "org.damond1.NrRegions", "min", "t", 20)
    msg = await changes.next()
    assert msg.body[0] == "org.damond1.NrRegions"


async def test_busctl_set_and_get_roundtrip(damond: Damond) -> None:
    damond.busctl("set-property", "org.damond1", ROOT, "org.damond1.Kdamonds", "nr", "u", "1")
    out = damond.busctl("get-property", "org.damond1", ROOT, "org.damond1.Kdamonds", "nr").stdout
    assert out.strip() == "u 1"
    out = damond.busctl("get-property", "org.damond1", K0, "org.damond1.Kdamond", "pid").stdout
    assert out.strip() == "i -1"


async def test_get_all_and_peer(damond: Damond) -> None:
    await build_full_tree(damond)
    reply = await call(
        damond.client,
        C0,
        "org.freedesktop.DBus.Properties",
        "GetAll",
        "s",
        ["org.damond1.NrRegions"],
    )
    assert {k: v.value for k, v in reply.body[0].items()} == {"min": 10, "max": 1000}
    ping = await call(damond.client, C0, "org.freedesktop.DBus.Peer", "Ping")
    assert ping.error_name is None
