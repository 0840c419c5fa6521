"""Run a script under a real systemd: this machine's OS booted by systemd-nspawn.

The machine has no systemd of its own, so tests/test_packaging.py and
bench/broker.py boot one: systemd-nspawn runs the host's own OS on a
throwaway overlay (tmpfs over /, in a private mount namespace, gone with the
container), and a oneshot unit there runs the given script with $REPO set
to this checkout, then powers off. The script writes what it found under
/.damond-results, which is `base / "results"` here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

UNIT = """[Unit]
Description=damond {what}
After=basic.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
Environment=REPO={repo}
ExecStart=/.damond-check/check.sh
"""

TARGET = """[Unit]
Description=damond {what}
Requires=basic.target damond-check.service
After=basic.target
"""

# The check's own files sit at dot-paths no checkout can live under (CI clones
# to /check/...: a bind at /check hid the repository). $SETUP runs before the
# boot, with the overlay's root in $ROOT.
BOOT = """set -eu
mount -t tmpfs tmpfs "$BASE/overlay"
mkdir "$BASE/overlay/upper" "$BASE/overlay/work" "$BASE/overlay/root"
mount -t overlay overlay \\
    -o "lowerdir=/,upperdir=$BASE/overlay/upper,workdir=$BASE/overlay/work" "$BASE/overlay/root"
cp "$BASE/check/damond-check.service" "$BASE/check/damond-check.target" \\
    "$BASE/overlay/root/etc/systemd/system/"
ROOT="$BASE/overlay/root"
eval "$SETUP"
exec systemd-nspawn --quiet -D "$BASE/overlay/root" --register=no --keep-unit \\
    --uuid="$(tr -d - < /proc/sys/kernel/random/uuid)" --link-journal=no \\
    --bind="$REPO" --bind="$BASE/results:/.damond-results" --bind-ro="$BASE/check:/.damond-check" \\
    --console=pipe -b systemd.unit=damond-check.target
"""


def boot(
    base: Path, repo: Path, script: str, what: str, timeout: float, setup: str = ""
) -> subprocess.CompletedProcess[str]:
    """Boot, run script as the check unit, power off; base/"results" has what it wrote."""
    for sub in ("overlay", "results", "check"):
        (base / sub).mkdir()
    check = base / "check" / "check.sh"
    check.write_text(script)
    check.chmod(0o755)
    (base / "check" / "damond-check.service").write_text(UNIT.format(what=what, repo=repo))
    (base / "check" / "damond-check.target").write_text(TARGET.format(what=what))
    return subprocess.run(
        ["unshare", "--mount", "--propagation=private", "sh", "-c", BOOT],
        env={**os.environ, "BASE": str(base), "REPO": str(repo), "SETUP": setup},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
