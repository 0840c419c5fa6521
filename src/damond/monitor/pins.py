"""Target pids pinned when a configuration is accepted, as the kernel pins them.

The kernel's DAMON resolves a target's pid to its struct pid when `on` or
`commit` is written, and keeps it: a process that exits afterwards and whose
number another process takes is never monitored in its place. damond accepts
`on` and `commit` before its monitor looks at the targets (damond's engine at
the next aggregation, the kernel's DAMON at its own next aggregation), so each
backend pins the new pids here, at acceptance, by pidfd (TargetProcess), and
monitors or watches the pinned process, never a number.
"""

from __future__ import annotations

from damond.monitor.config import ConfigError, ContextConfig
from damond.monitor.ops import TargetGone
from damond.monitor.ops.process import TargetProcess


def pin_targets(config: ContextConfig, pinned: set[int]) -> dict[int, TargetProcess]:
    """Pin the pid of each target not in pinned, now, as the kernel does at `on`/`commit`.

    The process that holds the number at acceptance is the one monitored,
    whenever the monitor first looks at it: a pid that dies and is reused
    before the next aggregation is not adopted. ConfigError (naming the
    target) when one is not a monitorable process; then nothing stays pinned.
    """
    pins: dict[int, TargetProcess] = {}
    if not config.operations.target_has_pid:
        return pins
    try:
        for target in config.targets:
            if target.pid in pinned or target.pid in pins:
                continue
            where = f"targets/{target.index}"
            try:
                proc = TargetProcess(target.pid)
            except (TargetGone, OSError):
                raise ConfigError(where, f"pid {target.pid} is not a live process") from None
            pins[target.pid] = proc
            problem = proc.problem()
            if problem:
                raise ConfigError(where, problem)
    except ConfigError:
        for proc in pins.values():
            proc.close()
        raise
    return pins
