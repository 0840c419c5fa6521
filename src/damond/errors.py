"""The daemon's error kinds, independent of any transport.

Each names the object it is about (a sysfs-like relative path such as
``kdamonds/0/contexts/0``) and the rule that was broken; bus.py maps the kinds to
the D-Bus error names of docs/dbus-api.md.
"""

from __future__ import annotations


class DamondError(Exception):
    """A refused request. Nothing was changed when one is raised."""

    def __init__(self, where: str, rule: str) -> None:
        super().__init__(f"{where}: {rule}" if where else rule)
        self.where = where
        self.rule = rule


class InvalidArgument(DamondError):
    """A value or combination that the rules forbid."""


class Busy(DamondError):
    """A structural change under a running kdamond, or `on` while on."""


class NotSupported(DamondError):
    """An operations set or access check this host's kernel cannot provide."""


class NoData(DamondError):
    """No snapshot yet."""
