"""What every damondctl command shares: the bus, errors as exit codes, output, files."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from damond import kdamonds_format as fmt
from damond.tools import client

EXIT_OK = 0
EXIT_REFUSED = 1
"""The daemon refused (its message names the object and rule), or the work failed."""
EXIT_USAGE = 2
"""The command line is wrong (argparse's own code)."""
EXIT_UNREACHABLE = 3
"""No bus at that address, or no damond on it."""
EXIT_DENIED = 4
"""The bus policy refused: writes need root, snapshots need root or group damond."""
EXIT_INPUT = 5
"""A configuration or record file that cannot be read or does not say what damond can do."""

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_REFUSED: "the daemon refused (the message names the object and rule), or the work failed",
    EXIT_USAGE: "the command line is wrong",
    EXIT_UNREACHABLE: "no bus at that address, or damond is not running on it",
    EXIT_DENIED: "the bus policy refused: writing needs root; snapshots need root or group damond",
    EXIT_INPUT: "a configuration or record file cannot be read or is refused",
}

BUS_ENV = "DAMOND_BUS"
"""The bus when --bus is not given: 'system' (the default), 'session' or an address."""

_UNREACHABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
}


class CtlError(Exception):
    """A reason to exit with ``code``, said in one line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def from_dbus(e: DBusError, doing: str = "") -> CtlError:
    """The daemon's (or the bus's) error as damondctl reports it: its text, and its name."""
    name = e.type or "unknown"
    short = name.rsplit(".", 1)[-1]
    prefix = f"{doing}: " if doing else ""
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return CtlError(
            EXIT_DENIED,
            f"{prefix}the bus policy refused ({e.text}); changing damond needs root, reading "
            "snapshots root or membership of group damond",
        )
    if name in _UNREACHABLE:
        return CtlError(EXIT_UNREACHABLE, f"{prefix}damond is not running on this bus ({e.text})")
    return CtlError(EXIT_REFUSED, f"{prefix}{e.text} [{short}]")


@asynccontextmanager
async def connected(bus_spec: str) -> AsyncIterator[MessageBus]:
    """A connection to the bus named by --bus (system, session, or an address)."""
    try:
        if bus_spec == "system":
            bus = await client.connect(None)
        elif bus_spec == "session":
            from dbus_fast import BusType

            bus = await MessageBus(bus_type=BusType.SESSION).connect()
        else:
            bus = await client.connect(bus_spec)
    except Exception as e:  # any failure to connect is the same answer to the user
        raise CtlError(EXIT_UNREACHABLE, f"cannot connect to the {bus_spec} bus: {e}") from None
    try:
        yield bus
    finally:
        bus.disconnect()


def default_bus() -> str:
    return os.environ.get(BUS_ENV, "system")


def emit_json(data: Any) -> None:
    """One JSON document (or line) on stdout, for scripts."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def read_document(path: Path) -> Any:
    """A JSON or YAML file, decoded (YAML for .yaml/.yml, else JSON, else YAML)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CtlError(EXIT_INPUT, f"{path}: cannot read: {e}") from None
    if path.suffix not in (".yaml", ".yml"):
        try:
            return json.loads(text)
        except ValueError as json_error:
            if text.lstrip().startswith(("{", "[")):
                raise CtlError(EXIT_INPUT, f"{path}: not JSON: {json_error}") from None
    try:
        import yaml
    except ImportError as e:
        raise missing_extra(e) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CtlError(EXIT_INPUT, f"{path}: neither JSON nor YAML: {e}") from None


def read_config(path: Path) -> list[fmt.KdamondSpec]:
    """damo's kdamonds format from a JSON or YAML file."""
    try:
        return fmt.parse(read_document(path))
    except fmt.FormatError as e:
        raise CtlError(EXIT_INPUT, f"{path}: {e}") from None


def missing_extra(e: ImportError) -> CtlError:
    return CtlError(
        EXIT_REFUSED,
        f"this command needs damond's tools extra (pip install 'damond[tools]'): {e}",
    )


def comm(pid: int) -> str:
    """A process's command name (readable by anyone), or '' when it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
