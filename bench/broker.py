"""The attacks of tests/test_attacks.py against the installed service, under dbus-daemon
and under dbus-broker, each the system bus of a booted systemd.

`python -m bench.broker [--json PATH]` (not part of `make test`; about 15 minutes).

dbus-broker needs a real systemd to launch, so this boots one as
tests/test_packaging.py does: systemd-nspawn runs this machine's own OS on a
throwaway overlay, where `make install` puts damond in place and
`bench.broker --inside` attacks it as `nobody` and as a member of `damond`,
while root's client calls Get every 20 ms. The second boot has dbus-broker
as its system bus: Debian's package is unpacked into the overlay only (its
postinst would make it the system bus of this machine's own OS, and so of
every other nspawn boot of it), and `dbus.service` aliased to it there.

Measured per bus: root's Get (p50, p99, max, timeouts), systemd's watchdog
restarts, the daemon's RSS; what the attacker's own class sees (another
`nobody`'s Get on org.damond1.Public during the flood; how many snapshots a
reading subscriber gets while another stalls); what became of the attacker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import nspawn

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
RAWBUS = REPO / "tests" / "rawbus.py"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
MEMBER = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=damond"]
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
ROOT = "/org/damond1"
K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
FLOOD_S, BURST_S, STALL_S = 60.0, 30.0, 90.0

CHECK = """#!/bin/sh
exec >/.damond-results/log 2>&1
set -x
cd "$REPO"
make install > /.damond-results/install.log 2>&1 || exit 1
busctl get-property org.damond1 /org/damond1 org.damond1.Kdamonds nr
"$REPO/.venv/bin/python" -m bench.broker --inside > /.damond-results/result.json
journalctl -u damond.service -o cat > /.damond-results/journal.txt
"""

SETUP_BROKER = """
# merged /usr: the package's ./lib must land in the /lib symlink, not replace it
dpkg-deb --fsys-tarfile "$BROKER_DEB" | tar -x -C "$ROOT" --keep-directory-symlink
ln -sf /lib/systemd/system/dbus-broker.service "$ROOT/etc/systemd/system/dbus.service"
"""


# --- inside the booted container ------------------------------------------------------------


def _quantiles(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms) or [float("inf")]
    return {
        "answered": len(ms),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "max_ms": round(ordered[-1], 1),
    }


def _show(prop: str) -> str:
    out = subprocess.run(
        ["systemctl", "show", "damond.service", "-p", prop, "--value"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _rss_mib() -> float:
    pid = _show("MainPID")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _observe(bus: Any, seconds: float, classmate: list[str] | None) -> dict[str, Any]:
    """Root's Gets every 20 ms; a classmate's busctl Get every 5 s; RSS every second."""
    from damond.tools import client

    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    ms: list[float] = []
    classmate_ms: list[float] = []
    timeouts = 0
    rss = [_rss_mib()]

    async def gets() -> None:
        nonlocal timeouts
        while loop.time() < end:
            started = loop.time()
            try:
                await asyncio.wait_for(
                    client.get_property(bus, K0, "org.damond1.Kdamond", "state"), 5.0
                )
                ms.append((loop.time() - started) * 1000)
            except TimeoutError:
                timeouts += 1
            await asyncio.sleep(max(0.0, started + 0.02 - loop.time()))

    async def others() -> None:
        while classmate is not None and loop.time() < end:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(
                *classmate,
                "busctl",
                "--timeout=10",
                "get-property",
                "org.damond1.Public",
                K0,
                "org.damond1.Kdamond",
                "state",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ok = await proc.wait() == 0
            classmate_ms.append((loop.time() - started) * 1000 if ok else float("inf"))
            await asyncio.sleep(5)

    async def sample() -> None:
        while loop.time() < end:
            await asyncio.sleep(1)
            rss.append(_rss_mib())

    await asyncio.gather(gets(), others(), sample())
    result: dict[str, Any] = {"root_get": {**_quantiles(ms), "timeouts": timeouts}}
    result["rss_mib"] = [round(rss[0]), round(max(rss))]
    if classmate is not None:
        result["classmate_get_ms"] = [round(x) for x in classmate_ms]
    return result


def _attacker(user: list[str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*user, SYSTEM_PYTHON, str(RAWBUS), args[0], SYSTEM_BUS, *args[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _end(process: subprocess.Popen[str]) -> str:
    """What the attacker said, or how it ended (a bus may disconnect it)."""
    try:
        out, err = process.communicate("", timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return "did not stop"
    last = (err.strip().splitlines() or [""])[-1]
    return f"exit {process.returncode}: {out.strip()[:200]} {last[:200]}".strip()


async def inside() -> dict[str, Any]:
    from damond.tools import client

    bus = await client.connect(None)
    sleeper = subprocess.Popen(["sleep", "3600"])
    results: dict[str, Any] = {"bus": _bus_implementation()}
    restarts = _show("NRestarts")
    await client.start_kdamonds(bus, [sleeper.pid])

    flood = _attacker(
        NOBODY, "flood", "org.damond1,org.damond1.Public", C0,
        "org.freedesktop.DBus.Introspectable", "Introspect", "1000",
    )  # fmt: skip
    assert flood.stdout is not None and flood.stdout.readline() == "ready\n"
    results["flood"] = await _observe(bus, FLOOD_S, NOBODY)
    results["flood"]["attacker"] = _end(flood)

    await client.set_property(bus, K0, "org.damond1.Kdamond", "state", "s", "off")
    for k in range(4):
        if k:
            await client.set_property(bus, ROOT, "org.damond1.Kdamonds", "nr", "u", k + 1)
        context = f"{ROOT}/kdamonds/{k}/contexts/0"
        if k:
            await client.set_property(bus, f"{ROOT}/kdamonds/{k}", "org.damond1.Contexts",
                                      "nr", "u", 1)  # fmt: skip
        await client.set_property(bus, context, "org.damond1.Targets", "nr", "u", 4)
        for t in range(4):
            await client.set_property(bus, f"{context}/targets/{t}", "org.damond1.Regions",
                                      "nr", "u", 1000)  # fmt: skip
    burst = _attacker(
        MEMBER, "burst", "org.damond1,org.damond1.Readers", ROOT,
        "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "128", "2",
    )  # fmt: skip
    assert burst.stdout is not None and burst.stdout.readline() == "sent\n"
    results["burst"] = await _observe(bus, BURST_S, None)
    results["burst"]["attacker"] = _end(burst)
    await client.set_property(bus, ROOT, "org.damond1.Kdamonds", "nr", "u", 0)

    await client.start_kdamonds(
        bus, [sleeper.pid], sample_us=1000, aggr_us=1000, min=1000, max=1000
    )
    await asyncio.sleep(1)
    first = (await client.call(bus, C0, "org.damond1.Context", "GetSnapshot"))[0]
    stall = _attacker(MEMBER, "subscribe", "1", "1")
    assert stall.stdout is not None and stall.stdout.readline() == "ready\n"
    results["stall"] = await _observe(bus, STALL_S, None)
    last = (await client.call(bus, C0, "org.damond1.Context", "GetSnapshot"))[0]
    results["stall"]["aggregations"] = last - first
    results["stall"]["reading_subscriber_got"] = _end(stall)

    results["watchdog_restarts"] = f"{restarts} -> {_show('NRestarts')}"
    sleeper.kill()
    bus.disconnect()
    return results


def _bus_implementation() -> str:
    out = subprocess.run(
        ["systemctl", "show", "dbus.service", "-p", "ExecStart", "--value"],
        capture_output=True,
        text=True,
    )
    return "dbus-broker" if "dbus-broker" in out.stdout else "dbus-daemon"


# --- on the host ----------------------------------------------------------------------------


def boot(broker_deb: str) -> dict[str, Any]:
    """One boot of this OS under systemd-nspawn, with dbus-broker when broker_deb is set."""
    with tempfile.TemporaryDirectory(prefix="damond-broker-") as tmp:
        base = Path(tmp)
        os.environ["BROKER_DEB"] = broker_deb
        booted = nspawn.boot(
            base, REPO, CHECK, "attack measurement", 1800, SETUP_BROKER if broker_deb else ""
        )
        result = base / "results" / "result.json"
        if not result.exists():
            log = "\n".join(
                f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                for p in sorted((base / "results").iterdir())
            )
            said = booted.stdout[-5000:] + booted.stderr
            log += f"\n--- nspawn (exit {booted.returncode})\n{said}"
            raise RuntimeError(f"the measurement did not finish:\n{log}")
        out: dict[str, Any] = json.loads(result.read_text())
        journal = (base / "results" / "journal.txt").read_text(errors="replace")
        out["journal_warnings"] = [line for line in journal.splitlines() if "WARNING" in line][:5]
        return out


def broker_package(directory: Path) -> str:
    """Debian's dbus-broker .deb, downloaded (not installed) into directory."""
    subprocess.run(["apt-get", "download", "dbus-broker"], cwd=directory, check=True)
    return str(next(directory.glob("dbus-broker_*.deb")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--buses", default="dbus-daemon,dbus-broker", help="which system buses to boot with"
    )
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(asyncio.run(inside())))
        return
    subprocess.run([str(REPO / "scripts" / "ensure-apt"), "systemd-container"], check=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="damond-broker-deb-") as tmp:
        deb = broker_package(Path(tmp))
        chosen = args.buses.split(",")
        for which in [""] * ("dbus-daemon" in chosen) + [deb] * ("dbus-broker" in chosen):
            started = time.monotonic()
            results.append(boot(which))
            print(json.dumps(results[-1], indent=1), file=sys.stderr)
            print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
