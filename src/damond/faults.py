"""Fault injection for tests: kernel files that fail, an event loop that hangs.

The daemon imports this module only when a ``DAMOND_FAULT_*`` variable is set
(cli.py), so a production daemon carries none of it. Documented in
docs/reliability.md; never set in production.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from damond.monitor.ops import AccessCheck, AddressSpace

log = logging.getLogger(__name__)

PREFIX = "DAMOND_FAULT_"
"""Every variable of this module starts so: cli.py looks for the prefix only."""

FAULT_OPS_ENV = "DAMOND_FAULT_OPS"
"""``KDAMOND:OP:N:ERRNO[,…]``: in the kdamond named KDAMOND (its index, e.g. ``1``),
the Nth call (from 1) of the ops method OP and every later one raises
OSError(ERRNO) as if the kernel file had failed. OP is one of ``prepare``,
``check`` (the access check), ``initial_ranges``, ``update_ranges`` (the
address space); ERRNO a name such as EIO, ENOENT or EPERM."""

STALL_FAULT_ENV = "DAMOND_FAULT_STALL_S"
"""N: SIGUSR1 blocks the event loop for N seconds (as a hung kernel read would),
so a test can watch the watchdog pings stop."""

SYSFS_FAULT_ENV = "DAMOND_FAULT_SYSFS"
"""``FILE:VALUE:ERRNO[,…]``: the kernel backend's write of VALUE (``*``: any) to FILE
(relative to the admin tree, fnmatch patterns such as ``kdamonds/*/state``) fails
with ERRNO instead of reaching the kernel, as if the kernel had refused it; only
what cannot be made to fail for real (the kernel refuses little of what damond's
rules allow) is tested this way."""

SPACE_OPS = ("initial_ranges", "update_ranges")
ACCESS_OPS = ("prepare", "check")


@dataclass(frozen=True)
class Fault:
    kdamond: str
    op: str
    nth: int
    errno: int

    @classmethod
    def parse(cls, spec: str) -> Fault:
        kdamond, op, nth, name = spec.strip().split(":")
        if op not in SPACE_OPS + ACCESS_OPS:
            raise ValueError(f"{FAULT_OPS_ENV}: unknown ops method {op!r}")
        code = getattr(errno, name, None)
        if not isinstance(code, int) or int(nth) < 1:
            raise ValueError(f"{FAULT_OPS_ENV}: bad fault {spec!r}")
        return cls(kdamond, op, int(nth), code)


def faults_for(name: str) -> list[Fault]:
    text = os.environ.get(FAULT_OPS_ENV, "")
    faults = [Fault.parse(spec) for spec in text.split(",") if spec.strip()]
    return [f for f in faults if f.kdamond == name]


class FaultyOps:
    """An AddressSpace or AccessCheck whose method `fault.op` fails from its Nth call."""

    def __init__(self, inner: Any, fault: Fault) -> None:
        self._inner = inner
        self._fault = fault
        self._calls = 0
        self.name = inner.name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if attr != self._fault.op:
            return value

        def faulty(*args: Any) -> Any:
            self._calls += 1
            if self._calls >= self._fault.nth:
                code = self._fault.errno
                log.warning(
                    "fault injection: %s call %d raises %s",
                    attr,
                    self._calls,
                    errno.errorcode.get(code, code),
                )
                raise OSError(code, os.strerror(code), f"(injected fault in {attr})")
            return value(*args)

        return faulty


def wrap_ops(
    name: str, space: AddressSpace, access: AccessCheck
) -> tuple[AddressSpace, AccessCheck]:
    """The kdamond's ops with the faults FAULT_OPS_ENV names for it (kdamond.OpsWrapper)."""
    wrapped_space: Any = space
    wrapped_access: Any = access
    for fault in faults_for(name):
        if fault.op in SPACE_OPS:
            wrapped_space = FaultyOps(wrapped_space, fault)
        else:
            wrapped_access = FaultyOps(wrapped_access, fault)
    return wrapped_space, wrapped_access


def sysfs_write_fault(file: str, value: str) -> int | None:
    """The errno SYSFS_FAULT_ENV makes this write fail with, or None (damon_sysfs.WriteFault)."""
    for spec in os.environ.get(SYSFS_FAULT_ENV, "").split(","):
        if not spec.strip():
            continue
        pattern, wanted, name = spec.strip().rsplit(":", 2)
        code = getattr(errno, name, None)
        if not isinstance(code, int):
            raise ValueError(f"{SYSFS_FAULT_ENV}: unknown errno {name!r}")
        if fnmatch.fnmatchcase(file, pattern) and wanted in ("*", value):
            log.warning("fault injection: writing %r to %s fails with %s", value, file, name)
            return code
    return None


def install_stall(loop: asyncio.AbstractEventLoop) -> None:
    """With STALL_FAULT_ENV set, SIGUSR1 blocks the event loop for that many seconds."""
    seconds = os.environ.get(STALL_FAULT_ENV)
    if not seconds:
        return

    def stall() -> None:
        log.warning("fault injection: blocking the event loop for %s s", seconds)
        time.sleep(float(seconds))

    loop.add_signal_handler(signal.SIGUSR1, stall)
