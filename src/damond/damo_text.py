"""damo's text: its numbers with units, the shape of its documents, the tree files they set.

damo (the DAMON user-space tool) writes numbers plain or as text for people:
``"5 ms"``, ``"1,000"``, ``"4 KiB"``, ``"30 %"``, ``"max"``, ``"yes"``. Each
reader here takes both and gives the tree's integer, or raises FormatError
naming where in the document the value was. Shared by kdamonds_format.py (the
document) and damos_format.py (its schemes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from damond.errors import DamondError
from damond.hierarchy import U64_MAX, Attribute, Node


class FormatError(ValueError):
    """A file that is not damo's kdamonds format, or asks for what damond cannot do.

    ``where`` is a path into the document, e.g. ``kdamonds[0].contexts[0].intervals``.
    """

    def __init__(self, where: str, rule: str) -> None:
        super().__init__(f"{where}: {rule}" if where else rule)
        self.where = where
        self.rule = rule


# --- numbers ---------------------------------------------------------------------------

_NS_PER = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
}
_BYTES_PER = {
    "": 1,
    "B": 1,
    **{f"{p}{s}": 1 << (10 * i) for i, p in enumerate("KMGTPE", 1) for s in ("", "B", "iB")},
}
_QUANTITY = re.compile(r"\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_PERCENT = re.compile(r"\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*%\s*")


def plain(value: Any, where: str) -> int | float:
    """A number as damo writes one without a unit: 1000, '1,000', '2.5', 'min', 'max'."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FormatError(where, f"must be a number, not {value!r}")
    if isinstance(value, str):
        if value.strip() == "max":
            return U64_MAX
        if value.strip() == "min":
            return 0
        try:
            return float(value.replace(",", "")) if "." in value else int(value.replace(",", ""))
        except ValueError:
            raise FormatError(where, f"must be a number, not {value!r}") from None
    return value


def integral(number: float, where: str, unit: str) -> int:
    """A whole, unsigned 64-bit number of unit; FormatError if not."""
    if isinstance(number, float) and (not math.isfinite(number) or number != int(number)):
        raise FormatError(where, f"must be a whole number of {unit}, not {number!r}")
    number = int(number)
    if not 0 <= number <= U64_MAX:
        raise FormatError(where, f"must be in [0, {U64_MAX}], not {number}")
    return number


def _with_units(value: Any, where: str, units: Mapping[str, int], kind: str) -> float:
    """A number given with damo's units ('5 ms', '1 m 30 s', '4 KiB'), in the smallest unit."""
    if not isinstance(value, str):
        return plain(value, where)
    total = 0.0
    rest = value.strip()
    if not rest:
        raise FormatError(where, f"must be a {kind}, not {value!r}")
    while rest:
        match = _QUANTITY.match(rest)
        if not match or match.group(2) not in units:
            raise FormatError(
                where,
                f"must be a {kind} (a number, or with a unit of "
                f"{', '.join(u for u in units if u)}), not {value!r}",
            )
        total += float(match.group(1).replace(",", "")) * units[match.group(2)]
        rest = rest[match.end() :]
    return total


def _time(value: Any, where: str, ns_per_unit: int, unit: str) -> int:
    """damo's time: plain numbers are in ``unit``; text may carry its own units."""
    if isinstance(value, str) and value.strip() in ("max", "min"):
        return integral(plain(value, where), where, unit)
    if isinstance(value, str) and not value.strip().replace(",", "").isdigit():
        ns = _with_units(value, where, _NS_PER, "time")
        return integral(round(ns / ns_per_unit, 6), where, unit)
    return integral(plain(value, where), where, unit)


def time_us(value: Any, where: str) -> int:
    """damo's time ('5 ms', '100ms', '1 s', or plain microseconds) in microseconds."""
    return _time(value, where, 1_000, "microseconds")


def time_ms(value: Any, where: str) -> int:
    """damo's time in milliseconds (plain numbers are milliseconds: quotas' ``time_ms``)."""
    return _time(value, where, 1_000_000, "milliseconds")


def size_bytes(value: Any, where: str) -> int:
    """damo's size ('4 KiB', '1,048,576', '2M', 'max', or plain bytes) in bytes."""
    if isinstance(value, str) and value.strip() in ("max", "min"):
        return integral(plain(value, where), where, "bytes")
    return integral(_with_units(value, where, _BYTES_PER, "size"), where, "bytes")


def number(value: Any, where: str) -> int:
    """damo's count ('1,000', 'max', or plain)."""
    return integral(plain(value, where), where, "units")


def percent(value: str) -> float | None:
    """The number of '30 %' (damo's ratios), or None if value is not written so."""
    match = _PERCENT.fullmatch(value)
    return float(match.group(1).replace(",", "")) if match else None


def permil(value: Any, where: str) -> int:
    """damo's ratio in per thousand: plain numbers are per thousand, '30 %' is 300."""
    given = percent(value) if isinstance(value, str) else None
    if given is not None:
        return integral(round(given * 10, 6), where, "per thousand")
    return integral(plain(value, where), where, "per thousand")


_TRUE = ("y", "yes", "true")
_FALSE = ("n", "no", "false")


def boolean(value: Any, where: str) -> bool:
    """damo's boolean: true/false, or the words it takes (yes, n, …)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise FormatError(where, f"must be true or false, not {value!r}")


def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(where, f"must be a string, not {value!r}")
    return value


# --- the shape of a document ---------------------------------------------------------------


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FormatError(where, f"must be a mapping (JSON object), not {type(value).__name__}")
    return value


def listed(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise FormatError(where, f"must be a list, not {type(value).__name__}")
    return value


def known_keys(kv: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(kv) - set(known), key=str)  # YAML keys need not be strings
    if unknown:
        raise FormatError(
            where, f"unknown key {unknown[0]!r} (known here: {', '.join(sorted(known))})"
        )


def refuse_unless(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise FormatError(where, f"{what} is not supported by damond")


# --- the tree's files ----------------------------------------------------------------------


def stored_files(node: type[Node], group: str) -> tuple[Attribute, ...]:
    """The writable files of a node's group that keep a value (not `nr`, not `state`)."""
    return tuple(a for a in node.GROUPS[group] if a.writable and a.field is not None)


def attribute(node: type[Node], group: str, name: str) -> Attribute:
    return next(a for a in node.GROUPS[group] if a.name == name)


def fits(node: type[Node], group: str, name: str, value: Any, where: str) -> Any:
    """value, if the tree's file takes its kind (a u32 is no u64); FormatError if not,
    before any transport is asked to carry it."""
    try:
        attribute(node, group, name).check_kind(where, value)
    except DamondError as e:
        raise FormatError(where, e.rule) from None
    return value
