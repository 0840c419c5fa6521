"""Is the kernel's own DAMON running on this host? (read-only look at its sysfs)

Kernel DAMON and damond disturb each other: both clear the accessed bits
(page table young bits, page_idle flags) of the pages they sample, so each
sees fewer accesses than happened. damond only reads the kernel's admin tree,
never writes it: it belongs to the machine.
"""

from __future__ import annotations

from pathlib import Path

ADMIN = Path("/sys/kernel/mm/damon/admin/kdamonds")


def running_kdamonds(admin: Path = ADMIN) -> list[str]:
    """Kernel kdamonds whose state reads "on", as "kdamonds/N (pid P)"."""
    found = []
    try:
        entries = sorted(
            (p for p in admin.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
    except OSError:
        return []
    for kdamond in entries:
        try:
            if (kdamond / "state").read_text().strip() != "on":
                continue
            pid = (kdamond / "pid").read_text().strip()
        except OSError:
            continue
        found.append(f"kdamonds/{kdamond.name} (pid {pid})")
    return found


def interference_warning(admin: Path = ADMIN) -> str | None:
    """A one-line warning when kernel DAMON runs, else None."""
    running = running_kdamonds(admin)
    if not running:
        return None
    return (
        f"the kernel's own DAMON is running ({', '.join(running)}): it and damond both "
        "clear the access bits of the pages they sample, so each sees fewer accesses"
    )
