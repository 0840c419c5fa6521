"""The backends: who samples a context once it is on. One table each, as for the ops.

- ``user``: damond's own engine (monitor/kdamond.py's KdamondTask) over an
  access check (page_idle, clear_refs);
- ``kernel``: the kernel's own DAMON, driven through its sysfs admin tree
  (monitor/kernel.py), its results relayed as the same Snapshots.

A ``Backend`` table says everything the rest of damond may know of a
backend: whether it works here and why not, which operations sets it runs,
whether the context's access check applies, whether it can start a context
of a given operations set now, which DAMOS actions and filters it can do
for one, and how to start one. The admin tree asks a ``Backends`` registry
to resolve a context's ``backend`` (``auto`` picks the first of the tables,
in order, that can start it and do its schemes) and to list what is
available; the daemon asks it for the factory; ``damond --help`` for what
works here. Tests inject tables, as with the ops Registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from damond.monitor import ops
from damond.monitor.config import ACTIONS, ContextConfig, FilterConfig, SchemeConfig
from damond.monitor.kernel import KernelDamon
from damond.monitor.snapshot import Snapshot

AUTO = "auto"
"""The backend to ask for when any will do: the first of the tables that can run it."""
KERNEL = "kernel"
USER = "user"


class Monitor(Protocol):
    """A running context's monitor, as the admin tree drives it."""

    @property
    def pid(self) -> int:
        """Who samples: the daemon, or the kernel's kdamond thread."""
        ...

    def stop(self) -> None: ...

    def commit(self, config: ContextConfig) -> None: ...


MonitorFactory = Callable[
    [str, ContextConfig, Callable[[Snapshot], None], Callable[[str], None]], Monitor
]
"""(kdamond name, config, on_snapshot, on_stop(reason)) → a started Monitor.

The factory and Monitor.commit pin the config's target pids before they return
(a pid that dies and is reused afterwards is not adopted), and may refuse a
config with ConfigError (a target that cannot be pinned) or ops.KernelRefused
(the kernel's own DAMON said no); then nothing started or changed."""


@dataclass(frozen=True)
class Backend:
    """One backend: what it offers here and how to start it."""

    name: str
    uses_access_check: bool
    """The context's access_check applies (damond samples) or not (the kernel does)."""
    probe: Callable[[], str]
    """'' when it works here now, else why not. Writes nothing (--help, avail_backends)."""
    operations: Callable[[], Sequence[str]]
    """The operations sets it runs here."""
    ready: Callable[[str], str]
    """(operations) → '' when it can start a context of that operations set now, else why
    not; may take what it needs first (the kernel backend claims the admin tree)."""
    why_action_unavailable: Callable[[str, str], str]
    """(action, operations) → '' when it can do that DAMOS action to a context of that
    operations set here, else why not."""
    why_filter_unavailable: Callable[[FilterConfig, str], str]
    """(filter, operations) → '' when it can honour that DAMOS filter (its type, and
    whether it allows or rejects) for that operations set here, else why not."""
    start: MonitorFactory | None = None
    """None in tables that only answer questions (tests, --help)."""
    owns_host_damon: Callable[[], bool] = lambda: False
    """It holds the machine's own kernel DAMON admin tree (whose kdamonds are then its own,
    not another user's to warn about)."""
    granularity: str = ""
    """What one access answer stands for where it checks accesses itself (no access
    check of damond's: the kernel checks each sampled page's accessed bits)."""

    def available_actions(self, operations: str) -> list[str]:
        """The DAMOS actions it can do to a context of this operations set here."""
        return [a for a in ACTIONS if not self.why_action_unavailable(a, operations)]

    def why_schemes_unavailable(
        self, schemes: Sequence[SchemeConfig], operations: str
    ) -> tuple[str, str]:
        """('', '') when it can do every scheme's action and honour every filter for that
        operations set here; else (where, relative to the context, why not)."""
        for scheme in schemes:
            where = f"schemes/{scheme.index}"
            reason = self.why_action_unavailable(scheme.action, operations)
            if reason:
                return where, reason
            for i, f in enumerate(scheme.filters):
                reason = self.why_filter_unavailable(f, operations)
                if reason:
                    return f"{where}/filters/{i}", reason
        return "", ""


class Backends:
    """A set of backend tables, in the order ``auto`` tries them."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self._backends = {b.name: b for b in backends}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._backends)

    def get(self, name: str) -> Backend:
        """The table of a backend; ValueError for a name that does not exist."""
        try:
            return self._backends[name]
        except KeyError:
            raise ValueError(f"unknown backend {name!r}") from None

    def available(self) -> list[str]:
        return [name for name, b in self._backends.items() if not b.probe()]

    def why_unavailable(self, name: str) -> str:
        reason = self.get(name).probe()
        return f"{name} backend: {reason}" if reason else ""

    def available_operations(self, names: Sequence[str]) -> list[str]:
        """Of names, the operations sets some available backend runs, in names' order."""
        offered: set[str] = set()
        for b in self._backends.values():
            if not b.probe():
                offered.update(b.operations())
        return [name for name in names if name in offered]

    def own_host_damon(self) -> bool:
        return any(b.owns_host_damon() for b in self._backends.values())

    def why_not_offered(self, operations: str) -> str:
        """Why no backend runs this operations set here, each backend's reason in turn."""
        reasons = []
        for b in self._backends.values():
            reason = b.probe()
            if not reason and operations in b.operations():
                return ""
            reasons.append(f"{b.name} backend: {reason or b.ready(operations)}")
        return "; ".join(reasons)

    def resolve(
        self, requested: str, operations: str, schemes: Sequence[SchemeConfig] = ()
    ) -> Backend:
        """The backend a context of this operations set (and schemes) runs on: AUTO picks
        the first table that can start it now and do its schemes, or else the first that
        can start it (whose refusal of a scheme the caller names). ValueError for an
        unknown name; ops.Unsupported, with every reason, when none can start it."""
        if requested != AUTO:
            backend = self.get(requested)
            reason = backend.ready(operations)
            if reason:
                raise ops.Unsupported(f"{requested} backend: {reason}")
            return backend
        reasons = {b.name: b.ready(operations) for b in self._backends.values()}
        ready = [self._backends[name] for name, reason in reasons.items() if not reason]
        for backend in ready:
            if not backend.why_schemes_unavailable(schemes, operations)[1]:
                return backend
        if ready:
            return ready[0]
        raise ops.Unsupported(
            "; ".join(f"{name} backend: {reason}" for name, reason in reasons.items())
        )

    def ready_for(self, operations: str) -> list[Backend]:
        """The tables that can start a context of this operations set now, in AUTO's order."""
        return [b for b in self._backends.values() if not b.ready(operations)]


def user_backend(registry: ops.Registry, start: MonitorFactory | None = None) -> Backend:
    """damond's own engine: runs what the access checks of this host serve."""
    return Backend(
        USER,
        uses_access_check=True,
        probe=lambda: "",
        operations=registry.available_operations,
        ready=registry.why_unavailable,
        why_action_unavailable=registry.why_action_unavailable,
        why_filter_unavailable=lambda f, operations: registry.why_filter_unavailable(
            f.type, operations
        ),
        start=start,
    )


def user_only(registry: ops.Registry = ops.REGISTRY) -> Backends:
    """The backends of a tree with no kernel backend (tests, tools)."""
    return Backends([user_backend(registry)])


def kernel_backend(kernel: KernelDamon, registry: ops.Registry = ops.REGISTRY) -> Backend:
    """The kernel's own DAMON, through damond's claim on its admin tree."""
    return Backend(
        KERNEL,
        uses_access_check=False,
        probe=kernel.why_unavailable,
        operations=kernel.operations,
        ready=kernel.ready,
        why_action_unavailable=lambda action, operations: kernel.why_action_unavailable(
            action, registry.operations(operations)
        ),
        why_filter_unavailable=lambda f, operations: kernel.why_filter_unavailable(
            f, registry.operations(operations)
        ),
        start=kernel.start,
        owns_host_damon=kernel.owns_host_damon,
        granularity="page",
    )
