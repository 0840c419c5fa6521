"""Record files in damo's format, so that damo's reports read damond's records.

A record is what damo's ``record`` writes and its ``report`` commands read: a
JSON list of DamonRecord objects, one per monitoring target (``kdamond_idx``,
``context_idx``, ``target_id``, ``intervals``, ``snapshots``), each snapshot
with ``start_time``/``end_time`` in nanoseconds and its ``regions`` (``start``,
``end``, ``nr_accesses.samples``, ``age.aggr_intervals``). damo's default
file type, zlib-compressed JSON (``json_compressed``), is written by default;
plain ``json`` on request (damo reads it only where file(1) calls it "JSON
data", which Debian 12's file does not). Beside FILE, as damo's record does:
FILE.kdamonds (the monitoring parameters, damo's kdamonds list) and FILE.vmas
(the targets' mappings, to name regions).

damond's own facts ride along under ``"damond"`` keys that damo ignores: each
snapshot's ``max_nr_accesses`` (the samples the aggregation really had) and
``seq``, and each record's target ``pid``. Records written by damo (without
them) read here too, with max_nr_accesses from the intervals.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damond.tools.mappings import Mappings
from damond.tools.render import parse
from damond.tools.stats import Region
from damond.tools.tree import ContextInfo

JSON_COMPRESSED = "json_compressed"
JSON = "json"
FORMATS = (JSON_COMPRESSED, JSON)
FILE_MODE = 0o600
"""As damo's record: an access pattern is nobody else's business."""


@dataclass
class SnapshotRecord:
    start_ns: int
    end_ns: int
    max_nr_accesses: int
    regions: list[Region]
    seq: int | None = None


@dataclass
class TargetRecord:
    """The snapshots of one target of one context."""

    kdamond: int
    context: int
    target: int
    pid: int
    sample_us: int
    aggr_us: int
    update_us: int
    snapshots: list[SnapshotRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"kdamond {self.kdamond} context {self.context} target {self.target} pid {self.pid}"


class Recorder:
    """Collects Snapshot signals of some contexts into TargetRecords."""

    def __init__(self, contexts: Sequence[ContextInfo]) -> None:
        self.contexts = {c.path: c for c in contexts}
        self.records: dict[tuple[str, int], TargetRecord] = {}
        self.last_seq: dict[str, int] = {}
        self.gaps = 0
        """Snapshots the bus dropped (seq gaps), over all contexts."""

    def add(self, path: str, body: Sequence[Any]) -> None:
        context = self.contexts.get(path)
        if context is None:
            return
        snap = parse(body)
        previous = self.last_seq.get(path)
        if previous is not None and snap.seq > previous + 1:
            self.gaps += snap.seq - previous - 1
        self.last_seq[path] = snap.seq
        end_ns = snap.timestamp_us * 1000
        for target in snap.targets:
            record = self.records.get((path, target.index))
            if record is None:
                record = self.records[(path, target.index)] = TargetRecord(
                    context.kdamond,
                    context.index,
                    target.index,
                    target.pid,
                    context.sample_us,
                    context.aggr_us,
                    context.update_us,
                )
            last = record.snapshots[-1] if record.snapshots else None
            contiguous = last is not None and last.seq == snap.seq - 1
            start_ns = last.end_ns if contiguous and last else end_ns - context.aggr_us * 1000
            record.snapshots.append(
                SnapshotRecord(
                    start_ns, end_ns, snap.max_nr_accesses, list(target.regions), snap.seq
                )
            )

    def result(self) -> list[TargetRecord]:
        return sorted(self.records.values(), key=lambda r: (r.kdamond, r.context, r.target))


# --- damo's kvpairs ---------------------------------------------------------------------


def _region_kv(region: Region) -> dict[str, Any]:
    start, end, nr, age = region
    return {
        "start": start,
        "end": end,
        "nr_accesses": {"samples": nr, "percent": None},
        "age": {"usec": None, "aggr_intervals": age},
        "probe_hits": [],
        "sz_filter_passed": 0,
    }


def to_damo(records: Sequence[TargetRecord]) -> list[dict[str, Any]]:
    """damo's list of DamonRecord kvpairs."""
    return [
        {
            "kdamond_idx": r.kdamond,
            "context_idx": r.context,
            "intervals": {
                "sample_us": r.sample_us,
                "aggr_us": r.aggr_us,
                "ops_update_us": r.update_us,
                "intervals_goal": {
                    "access_bp": "0%",
                    "aggrs": 0,
                    "min_sample_us": 0,
                    "max_sample_us": 0,
                },
            },
            "scheme_idx": None,
            "target_id": r.target,
            "scheme_filters": [],
            "snapshots": [
                {
                    "start_time": s.start_ns,
                    "end_time": s.end_ns,
                    "regions": [_region_kv(x) for x in s.regions],
                    "total_bytes": sum(e - b for b, e, _n, _a in s.regions),
                    "damos_stats": None,
                    "sample_interval_us": None,
                    "damond": {"max_nr_accesses": s.max_nr_accesses, "seq": s.seq},
                }
                for s in r.snapshots
            ],
            "data_source": "unknown",
            "damond": {"pid": r.pid},
        }
        for r in records
    ]


def _int(value: Any) -> int:
    """damo writes numbers plain or as text with thousands separators ('1,048,576')."""
    if isinstance(value, str):
        return int(float(value.replace(",", "")))
    return int(value)


def from_damo(kvpairs: Sequence[dict[str, Any]]) -> list[TargetRecord]:
    """TargetRecords from damo's DamonRecord kvpairs (damond's or damo's own)."""
    records = []
    for kv in kvpairs:
        iv = kv.get("intervals") or {}
        sample_us = _int(iv.get("sample_us", 5000))
        aggr_us = _int(iv.get("aggr_us", 100000))
        record = TargetRecord(
            _int(kv.get("kdamond_idx") or 0),
            _int(kv.get("context_idx") or 0),
            _int(kv.get("target_id") or 0),
            _int((kv.get("damond") or {}).get("pid", -1)),
            sample_us,
            aggr_us,
            _int(iv.get("ops_update_us", 0)),
        )
        for s in kv["snapshots"]:
            ext = s.get("damond") or {}
            regions = [
                (
                    _int(r["start"]),
                    _int(r["end"]),
                    _int(r["nr_accesses"]["samples"]),
                    _int(r["age"]["aggr_intervals"]),
                )
                for r in s["regions"]
                if r.get("nr_accesses") is not None and _int(r["nr_accesses"]["samples"]) >= 0
            ]
            max_nr = ext.get("max_nr_accesses") or max(1, aggr_us // max(1, sample_us))
            start = s.get("start_time")
            end = _int(s["end_time"])
            record.snapshots.append(
                SnapshotRecord(
                    _int(start) if start is not None else end - aggr_us * 1000,
                    end,
                    _int(max_nr),
                    regions,
                    ext.get("seq"),
                )
            )
        records.append(record)
    return records


# --- files ------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write(
    path: Path,
    records: Sequence[TargetRecord],
    file_format: str = JSON_COMPRESSED,
    kdamonds: list[dict[str, Any]] | None = None,
    mappings: Sequence[Mappings] = (),
) -> list[Path]:
    """Write a record (and FILE.kdamonds, FILE.vmas); the paths written."""
    if file_format not in FORMATS:
        raise ValueError(f"record format must be one of {', '.join(FORMATS)}, not {file_format!r}")
    text = json.dumps(to_damo(records), indent=4).encode()
    _write(path, zlib.compress(text) if file_format == JSON_COMPRESSED else text)
    written = [path]
    if kdamonds is not None:
        side = Path(f"{path}.kdamonds")
        _write(side, json.dumps(kdamonds, indent=4).encode())
        written.append(side)
    if mappings:
        side = Path(f"{path}.vmas")
        vmas = [{"time": time.time(), "procvmas": [m.to_damo() for m in mappings]}]
        _write(side, json.dumps(vmas, indent=4).encode())
        written.append(side)
    return written


class RecordError(Exception):
    """A file that is not a record this module reads."""


def read(path: Path) -> list[TargetRecord]:
    """The records of a damo-format record file (json or json_compressed)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecordError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = zlib.decompress(raw) if raw[:1] == b"\x78" else raw
        document = json.loads(text)
        if isinstance(document, dict) and "damo_records" in document:
            document = document["damo_records"]["damon_records"]["record_list"]
        return from_damo(document)
    except (zlib.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise RecordError(
            f"{path}: not a record in damo's json or json_compressed format ({e!r}); "
            "perf_script records: convert them with damo's convert_record_format"
        ) from None


def read_mappings(path: Path) -> dict[int, Mappings]:
    """The mappings recorded beside path (FILE.vmas), by pid; {} when there are none."""
    try:
        snapshots = json.loads(Path(f"{path}.vmas").read_text())
    except (OSError, ValueError):
        return {}
    found: dict[int, Mappings] = {}
    for snapshot in snapshots:
        for kv in snapshot.get("procvmas", []):
            mappings = Mappings.from_damo(kv)
            found[mappings.pid] = mappings
    return found
