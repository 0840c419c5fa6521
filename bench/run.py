"""`make bench`: run every benchmark and write docs/benchmarks.md.

Each section compares against a reference measured in the same run (the
targets the issue set, the idle daemon, the smallest process).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

from bench import ceiling, clear_refs, damos, dbus, engine, guest, page_idle, wire, wss

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def main() -> int:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print("engine …", file=sys.stderr)
    engine_md = engine.markdown(engine.run())
    print("clear_refs …", file=sys.stderr)
    clear_md = clear_refs.markdown(clear_refs.run())
    print("D-Bus …", file=sys.stderr)
    dbus_md = dbus.markdown(dbus.run())
    print("marshalling …", file=sys.stderr)
    wire_md = wire.markdown(wire.run())
    print("page_idle vs clear_refs, in the test guest …", file=sys.stderr)
    found = page_idle.in_vm([])
    page_idle_md = (
        page_idle.ops_markdown(found["kernel_ops"]) + "\n\n" + page_idle.markdown(found["rows"])
    )
    print("damond vs the kernel's DAMON, in the test guest …", file=sys.stderr)
    guest_md = guest.markdown(guest.run())
    print("the CPU ceiling on one large target …", file=sys.stderr)
    ceiling_md = ceiling.markdown(ceiling.run())
    print("working-set estimation, here and in the test guest …", file=sys.stderr)
    wss_md = wss.markdown(wss.run())
    print("DAMOS: damond vs the kernel's DAMOS, in the test guest …", file=sys.stderr)
    damos_md = damos.markdown(damos.run())
    text = f"""# damond benchmarks

Written by `make bench` ({Path(__file__).name}); numbers from one run.

- Date: {stamp}
- Machine: {machine()}

## Engine (synthetic access source, no kernel files)

Target set by the issue: ≤ 50 µs per sample and ≤ 1 ms per aggregation at
1000 regions. `fixed`: min = max = N (the count really is N; nothing to merge
or split). `adaptive`: min 10, max ≈ 1.4 N, half the pages accessed at random,
so merges and splits happen every aggregation.

{engine_md}

## clear_refs access check vs process size

One sample = write `1` to clear_refs + read and parse smaps + 1000 sampled
addresses looked up, on a child process whose memory is resident and
rewritten around each sample. The kernel walks every page-table entry of the
target on both the clear and the smaps read, so the cost grows with resident
memory (and with the number of mappings), not with the number of regions;
transparent huge pages cut the walk by 512×. When a sample takes longer than
`sample_us`, sampling runs slower (aggregations are counted in samples).

{clear_md}

## D-Bus: Snapshot delivery and Get latency

A private dbus-daemon, the daemon from this tree, `sleep` processes as
targets (vaddr, clear_refs), dbus-fast clients. Latency is the client's
CLOCK_REALTIME at receipt minus the snapshot's `timestamp_us`.

{dbus_md}

## D-Bus: bodies marshalled once (bench/wire.py)

Event-loop time to produce one message body: dbus-fast marshalling Python
values at every send (what the daemon did before; the reference, same run)
vs damond's bodies built once (`wire.py`: a Snapshot from its numpy arrays;
`treecache.py`: GetManagedObjects from one cached entry per object, only
changed objects marshalled again). A tree of 4 kdamonds × 4 targets × 1000
regions, as in tests/test_attacks.py.

{wire_md}

## page_idle (C and Python), soft_dirty and clear_refs per region per sample (test guest)

In the tests/vm guest: Linux {found["kernel"]} built from Debian's
linux-source-6.12 with idle page tracking, soft-dirty and DAMON, 1 vCPU under
QEMU TCG (software emulation, roughly 10-20× slower than this host for
Python; ratios between rows are what carries over), `python -m bench.page_idle
--vm`. The target is a child with a 256 MiB resident anonymous buffer (4 KiB
pages or THP), split into N equal regions; one sample = prepare (one random
address per region), the child writes the first half, check. Only prepare and
check are timed; syscalls are counted in separate rounds (page_idle's C path
makes the same calls as its Python path, from C, where they are not
counted). clear_refs and soft_dirty do most of their work once per sample
whatever N is, so their per-region cost is their sample cost / N. page_idle
makes four kernel calls per region when the sampled pages are far apart
(pagemap, kpageflags, one bitmap word written and read back) and about two
when they are close (1000 regions over 256 MiB share bitmap words and runs);
the kpageflags read is the one correctness needs: without it a THP tail
(whose bit never reads idle) or a page off the LRU lists would count as
accessed.

{page_idle_md}

{guest_md}

## The CPU ceiling on one large target (this host)

`python -m bench.ceiling`: a kdamond (no bus) over one child holding 4 GiB
resident, at the default intervals, with the default `cpu_limit_pct` and
with none. The sampling's CPU is the kdamond worker thread's.

{ceiling_md}

## Working-set estimation: the kernel selftest's, by each check

`python -m bench.wss`. The kernel's DAMON selftest estimates a working set of
two buffers written in turn (2 s each): 40 readings every 100 ms of the bytes
in regions with 5 ≤ nr_accesses ≤ 20 and age ≥ 2, at the default intervals;
the 50th and 75th percentile reading within 20 % of one buffer passes. Here
the buffers come from malloc and share one mapping (damond.tools.pair), which
is what per-mapping information cannot see into. damond runs through its
engine with no CPU ceiling. In the guest, the last column is the share of the
written buffer its writer really covers in one 5 ms window (the full pagemap
after clearing the soft-dirty bits): an emulated CPU writes far slower than a
real one, so where that share is low, no sampler can find nr_accesses of 5
or more with a stable age.

{wss_md}

{damos_md}
"""
    OUT.write_text(text)
    print(text)
    print(f"written to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
