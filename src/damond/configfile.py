"""The declarative configuration: damo's kdamonds JSON, applied at start and on reload.

A restart (the watchdog's, an upgrade's) would otherwise lose every kdamond: the
tree lives in memory, as the kernel's sysfs does across a reboot. The file
(``/etc/damond/kdamonds.json`` or ``damond --config FILE``) says what should
run; the daemon applies it when it starts and on SIGHUP (``systemctl reload
damond``).

Applying is all or nothing: the whole document is first built on a scratch
tree and every kdamond it turns on is validated there (the same Node.set and
the same checks as `on`, so the same rules and messages as any D-Bus write);
only a document that passes touches the real tree. A refused document changes
nothing, and the daemon keeps running what it ran, logging the object and the
rule. What a reload does to running kdamonds is kdamonds_format.plan's rule:
unchanged shapes are committed without stopping.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from damond import kdamonds_format as fmt
from damond.errors import DamondError
from damond.hierarchy import Monitor, Node, Tree
from damond.monitor.config import ContextConfig

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/etc/damond/kdamonds.json")
MAX_FILE_BYTES = 16 << 20
"""A configuration larger than this is refused unread (the tree's own caps are far below)."""


class ConfigFileError(Exception):
    """A configuration refused as a whole; the message names the file, object and rule."""


@dataclass(frozen=True)
class Applied:
    """What applying a document did."""

    kdamonds: int
    on: int
    steps: int


class _NoMonitor:
    """The scratch tree validates `on` without starting anything."""

    pid = -1

    def stop(self) -> None:
        pass

    def commit(self, config: ContextConfig) -> None:
        pass


def read(path: Path) -> list[fmt.KdamondSpec]:
    """The kdamonds of a configuration file; ConfigFileError naming what is wrong."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: not JSON: {e}") from None
    try:
        return fmt.parse(document)
    except fmt.FormatError as e:
        raise ConfigFileError(f"{path}: {e}") from None


def validate(specs: list[fmt.KdamondSpec], tree: Tree) -> None:
    """Build specs on a scratch tree with tree's ops tables and check every kdamond that
    would turn on; DamondError (naming the tree object and rule) if anything is refused."""

    def no_monitor(*_: object) -> Monitor:
        return _NoMonitor()

    scratch = Tree(no_monitor, tree.registry, tree.backends)
    for step in fmt.build(specs):
        if isinstance(step, fmt.Write):
            _node(scratch, step.path).set(step.group, step.name, step.value)
    for k, spec in enumerate(specs):
        if spec.on:
            scratch.kdamonds()[k].check()


def _node(tree: Tree, path: str) -> Node:
    node = tree.lookup(path)
    if node is None:  # the steps create parents before children: a bug if not
        raise AssertionError(f"no tree object at {path!r}")
    return node


def apply(specs: list[fmt.KdamondSpec], tree: Tree) -> Applied:
    """Validate specs as a whole, then move the tree to them (kdamonds_format.plan).

    Raises DamondError, having changed nothing, when validation refuses. A step
    that fails afterwards (a target exiting in between) is logged, and the rest
    of that kdamond's steps are skipped; other kdamonds go on.
    """
    validate(specs, tree)
    steps = fmt.plan(specs, fmt.tree_objects(tree.root))
    failed: set[str] = set()
    for step in steps:
        owner = "/".join(step.path.split("/")[:2])
        if owner in failed:
            continue
        try:
            if isinstance(step, fmt.StateChange):
                _node(tree, step.path).set("kdamond", "state", step.state)
            else:
                _node(tree, step.path).set(step.group, step.name, step.value)
        except DamondError as e:
            log.error("configuration: %s; %s left as it is", e, owner or "the tree")
            failed.add(owner)
    on = sum(1 for k in tree.kdamonds() if k.running)
    return Applied(len(specs), on, len(steps))


def load(path: Path, tree: Tree, *, missing_ok: bool) -> Applied | None:
    """Read and apply path; None when it is missing and that is fine.

    ConfigFileError (nothing changed) when the file cannot be read, parsed or
    validated."""
    if missing_ok and not path.exists():
        log.debug("no configuration file at %s: nothing to apply", path)
        return None
    specs = read(path)
    try:
        applied = apply(specs, tree)
    except DamondError as e:
        raise ConfigFileError(f"{path}: {e}") from None
    log.info("configuration %s applied: %d kdamond(s), %d on", path, applied.kdamonds, applied.on)
    return applied
