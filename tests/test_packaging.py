"""`make install` / `make uninstall`, the systemd unit, and the capabilities it keeps.

Everything here is real: the Makefile builds a venv with Debian's python3 and
pip, the installed daemon serves a private bus, systemd-analyze checks the
installed unit, the capability set is measured with setpriv against a process
of user nobody, and a throwaway systemd (systemd-nspawn booting this machine's
own OS on a tmpfs overlay) runs `make install` and uses the service as an
operator would: bus activation, READY/STATUS, the sandbox, the watchdog, stop,
`make uninstall`.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nspawn  # tests/nspawn.py
import pytest
from dbus_fast.aio import MessageBus

from damond.tools.privatebus import start_private_bus, wait_for_name

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging" / "damond.service"
EXPORTER_UNIT = REPO / "packaging" / "damond-exporter.service"
ACTIVATION = REPO / "packaging" / "org.damond1.service"
POLICY = REPO / "packaging" / "dbus-policy.conf"
SYSTEM_PYTHON = "/usr/bin/python3"
MAKE_TIMEOUT = 900  # a first install downloads and builds the dependencies
EXPECTED_CAPS = {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE", "CAP_SYS_NICE"}


def make(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=MAKE_TIMEOUT,
    )
    assert result.returncode == 0, f"make {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key → values of a unit file (keys may repeat), sections merged."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def files_under(root: Path) -> list[Path]:
    """Every file and symlink (not directory) below root."""
    return sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def group_files() -> bytes:
    return b"".join(
        Path(p).read_bytes() for p in ("/etc/group", "/etc/gshadow") if Path(p).exists()
    )


@dataclass
class Layout:
    """Where `make install` puts things for a PREFIX, as seen from the final system."""

    prefix: str
    policy_dir: str

    @property
    def venv(self) -> str:
        return f"{self.prefix}/lib/damond"

    @property
    def bin(self) -> str:
        return f"{self.prefix}/bin/damond"

    @property
    def tools(self) -> tuple[str, ...]:
        """The client commands linked next to the daemon's."""
        return (f"{self.prefix}/bin/damondctl", f"{self.prefix}/bin/damond-exporter")

    @property
    def unit(self) -> str:
        return f"{self.prefix}/lib/systemd/system/damond.service"

    @property
    def exporter_unit(self) -> str:
        return f"{self.prefix}/lib/systemd/system/damond-exporter.service"

    @property
    def activations(self) -> dict[str, str]:
        """Each name whose first call starts the daemon, and its activation file."""
        return {
            name: f"{self.prefix}/share/dbus-1/system-services/{name}.service"
            for name in ("org.damond1", "org.damond1.Readers", "org.damond1.Public")
        }

    @property
    def policy(self) -> str:
        return f"{self.policy_dir}/org.damond1.conf"

    @property
    def doc(self) -> str:
        return f"{self.prefix}/share/doc/damond/operations.md"


def check_layout(root: Path, layout: Layout, tools: bool = True) -> None:
    """The files of an install below root (DESTDIR, or / for a real install); with the
    tools extra's libraries unless ``tools`` is False (EXTRAS= was given)."""

    def at(path: str) -> Path:
        return root / path.lstrip("/")

    for command in (layout.bin, *layout.tools):
        link = at(command)
        assert link.is_symlink(), link
        assert os.readlink(link) == f"{layout.venv}/bin/{Path(command).name}"
        assert os.access(at(os.readlink(link)), os.X_OK), command

    script = at(f"{layout.venv}/bin/damond")
    assert script.read_text().splitlines()[0] == f"#!{layout.venv}/bin/python"
    assert os.access(script, os.X_OK)
    # The venv is Debian's python3, not the python running these tests.
    assert os.readlink(at(f"{layout.venv}/bin/python3")) == SYSTEM_PYTHON
    cfg = dict(
        line.split(" = ", 1) for line in at(f"{layout.venv}/pyvenv.cfg").read_text().splitlines()
    )
    assert cfg["home"] == "/usr/bin"
    assert cfg["command"].endswith(f"-m venv {layout.venv}")
    assert list(at(layout.venv).glob("lib/python3*/site-packages/damond/cli.py"))
    # the daemon's dependencies, and the tools extra (damondctl, damond-exporter)
    extra = ("matplotlib", "prometheus_client", "yaml", "rich")
    for dep in ("dbus_fast", "numpy", "systemd", *(extra if tools else ())):
        assert list(at(layout.venv).glob(f"lib/python3*/site-packages/{dep}/__init__.py")), dep

    unit = unit_settings(at(layout.unit))
    assert unit["ExecStart"] == [f"{layout.bin} --bus system"]
    assert unit["Documentation"] == [f"file:{layout.doc}"]
    exporter = unit_settings(at(layout.exporter_unit))
    assert exporter["ExecStart"] == [f"{layout.tools[1]} --bus system --listen 127.0.0.1:9433"]
    assert exporter["Documentation"] == [f"file:{layout.doc}"]
    for name, activation in layout.activations.items():
        assert unit_settings(at(activation)) == {
            "Name": [name],
            "Exec": [f"{layout.bin} --bus system"],
            "User": ["root"],
            "SystemdService": ["damond.service"],
        }
    assert at(layout.policy).read_bytes() == POLICY.read_bytes()
    assert at(layout.doc).read_bytes() == (REPO / "docs" / "operations.md").read_bytes()
    for path in (
        layout.unit,
        layout.exporter_unit,
        *layout.activations.values(),
        layout.policy,
        layout.doc,
    ):
        assert at(path).stat().st_mode & 0o777 == 0o644, path


# --- Staged installs (DESTDIR) ---------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "policy_dir"),
    [("/usr", "/usr/share/dbus-1/system.d"), (None, "/etc/dbus-1/system.d")],
    ids=["prefix-usr", "prefix-default"],
)
def test_staged_install_lays_out_files_for_the_final_paths(
    tmp_path: Path, prefix: str | None, policy_dir: str
) -> None:
    destdir = tmp_path / "stage"
    # the layout does not depend on the optional libraries, which take most of an
    # install's time; the real install and the systemd check install them
    args = [f"DESTDIR={destdir}", "EXTRAS="] + ([f"PREFIX={prefix}"] if prefix else [])
    layout = Layout(prefix or "/usr/local", policy_dir)
    groups_before = group_files()

    out = make("install", *args).stdout
    check_layout(destdir, layout, tools=False)
    installed = files_under(destdir)
    assert {str(p) for p in installed if "/lib/damond/" not in str(p)} == {
        str(destdir) + path
        for path in (layout.bin, *layout.tools, layout.unit, layout.exporter_unit,
                     *layout.activations.values(), layout.policy, layout.doc)
    }  # fmt: skip
    # Nothing that runs names the staging directory: shebangs, activate scripts,
    # pyvenv.cfg and bytecode all say the final path.
    staged = str(destdir).encode()
    leaks = [
        p
        for p in installed
        if p.is_file() and p.name != "direct_url.json" and staged in p.read_bytes()
    ]
    assert not leaks, leaks[:10]
    if prefix is not None:
        for path in (layout.unit, layout.exporter_unit, *layout.activations.values()):
            values = unit_settings(destdir / path.lstrip("/")).values()
            assert not [v for vs in values for v in vs if "/usr/local" in v], path
    # A staging install leaves the build host alone.
    assert "staging only" in out
    assert group_files() == groups_before

    make("install", *args)  # idempotent
    check_layout(destdir, layout, tools=False)
    assert files_under(destdir) == installed

    make("uninstall", *args)
    assert files_under(destdir) == []
    make("uninstall", *args)  # idempotent
    assert files_under(destdir) == []


# --- A real install into a temporary PREFIX --------------------------------------


@dataclass
class RealInstall:
    layout: Layout
    output: str


@pytest.fixture(scope="module")
def real_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealInstall]:
    """`make install PREFIX=<tmp>` with an empty DESTDIR: the venv sits at its final
    path and runs. The policy goes to a temporary DBUS_POLICY_DIR, not /etc; the
    group damond is created when missing (and removed again if it was)."""
    base = tmp_path_factory.mktemp("real-install")
    layout = Layout(str(base / "prefix"), str(base / "policy"))
    args = [f"PREFIX={layout.prefix}", f"DBUS_POLICY_DIR={layout.policy_dir}"]
    had_group = _has_group("damond")
    had_user = _has_user("damond-exporter")
    try:
        yield RealInstall(layout, make("install", *args).stdout)
        out = make("uninstall", *args).stdout
        assert "group damond: kept" in out, out
        assert "user damond-exporter: kept" in out, out
        assert files_under(base) == []
    finally:
        if not had_user and _has_user("damond-exporter"):
            subprocess.run(["userdel", "damond-exporter"], check=True)
        if not had_group and _has_group("damond"):
            subprocess.run(["groupdel", "damond"], check=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_real_install_lays_out_files_and_creates_the_group(real_install: RealInstall) -> None:
    check_layout(Path("/"), real_install.layout)
    assert _has_group("damond")
    assert "group damond:" in real_install.output


def test_installed_damond_runs_from_its_own_venv(real_install: RealInstall) -> None:
    layout = real_install.layout
    result = subprocess.run(
        [layout.bin, "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "org.damond1" in result.stdout
    for tool in layout.tools:
        helped = subprocess.run(
            [tool, "--help"], capture_output=True, text=True, timeout=60, check=True
        )
        assert "examples:" in helped.stdout, tool
    # Imports resolve inside the installed venv, with every runtime dependency.
    probe = subprocess.run(
        [
            f"{layout.venv}/bin/python",
            "-c",
            "import json, sys, damond, dbus_fast, numpy, systemd.daemon, systemd.journal;"
            "print(json.dumps([sys.prefix, damond.__file__, systemd.daemon.__file__]))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    prefix, damond_file, systemd_file = json.loads(probe.stdout)
    assert prefix == layout.venv
    assert damond_file.startswith(layout.venv + "/")
    assert systemd_file.startswith(layout.venv + "/")


async def test_installed_damond_serves_a_bus_and_exits_0_on_sigterm(
    real_install: RealInstall, tmp_path: Path
) -> None:
    with start_private_bus() as bus:
        client = await MessageBus(bus_address=bus.address).connect()
        log = tmp_path / "damond.log"
        with log.open("wb") as err:
            process = subprocess.Popen(
                [real_install.layout.bin, "--bus", bus.address],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd="/",
            )
        try:
            await wait_for_name(client, "org.damond1", 30)
            got = subprocess.run(
                ["busctl", f"--address={bus.address}", "get-property", "org.damond1",
                 "/org/damond1", "org.damond1.Kdamonds", "nr"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            assert got.stdout.strip() == "u 0"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            client.disconnect()
    assert "Traceback" not in log.read_text()


def test_systemd_analyze_verify_of_the_installed_unit_is_clean(
    real_install: RealInstall, tmp_path: Path
) -> None:
    """verify checks that ExecStart's binary exists, so it runs on the unit installed
    into the temporary PREFIX (ExecStart=<prefix>/bin/damond, which exists). It exits 0
    on mere warnings (unknown keys, bad values), so any output at all fails the test."""
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze is missing: install the Debian package systemd"

    def run(unit: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [verify, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120
        )

    for unit in (real_install.layout.unit, real_install.layout.exporter_unit):
        result = run(Path(unit))
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            unit + result.stdout + result.stderr
        )
    # The same check sees a mistake: a misspelt key is only a warning, exit 0.
    broken = tmp_path / "damond.service"
    broken.write_text(
        Path(real_install.layout.unit)
        .read_text()
        .replace("ProtectSystem=strict", "ProtectSistem=strict")
    )
    assert "ProtectSistem" in run(broken).stderr


def test_unit_says_what_the_daemon_relies_on() -> None:
    unit = unit_settings(UNIT)
    assert unit["Type"] == ["notify"]
    assert unit["BusName"] == ["org.damond1"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == ["/usr/local/bin/damond --bus system"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # applies kdamonds.json again
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["Restart"] == ["on-failure"]
    assert set(" ".join(unit["CapabilityBoundingSet"]).split()) == EXPECTED_CAPS
    # /sys/kernel/mm/page_idle/bitmap is written; other processes' /proc/PID read.
    assert "ProtectKernelTunables" not in unit
    assert unit["ProtectProc"] == ["default"]
    assert unit.get("ProcSubset", ["all"]) == ["all"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"]
    # the kernel backend's claim record: writable, and kept over a crash and restart
    assert unit["RuntimeDirectory"] == ["damond"]
    assert unit["RuntimeDirectoryPreserve"] == ["yes"]
    assert "User" not in unit and "DynamicUser" not in unit  # root
    assert unit_settings(ACTIVATION)["SystemdService"] == ["damond.service"]


def test_the_exporter_unit_runs_unprivileged_in_group_damond() -> None:
    unit = unit_settings(EXPORTER_UNIT)
    assert "damond.service" in " ".join(unit["After"]).split()
    # a static system user: the system bus refuses dynamic users (see the unit)
    assert unit["User"] == ["damond-exporter"] and "DynamicUser" not in unit
    assert unit["SupplementaryGroups"] == ["damond"]  # the policy's readers
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["IPAddressDeny"] == ["any"] and unit["IPAddressAllow"] == ["localhost"]
    assert "127.0.0.1:" in unit["ExecStart"][0]


# --- The capability set, measured ----------------------------------------------

TARGET = """
import ctypes, mmap, sys
buf = mmap.mmap(-1, 1 << 20)
buf.write(b"x" * (1 << 20))
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(buf))), flush=True)
sys.stdin.read()
"""

PROBE = """
import json, os, struct, sys
pid, addr = int(sys.argv[1]), int(sys.argv[2], 16)
out = {}
def attempt(name, action):
    try:
        out[name] = action()
    except OSError as e:
        out[name] = f"errno {e.errno}"
def clear_refs():
    fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY)
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
    return "ok"
def smaps():
    with open(f"/proc/{pid}/smaps") as f:
        return "ok" if "Referenced:" in f.read() else "no Referenced lines"
pfn = 0
def pagemap():
    global pfn
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        (entry,) = struct.unpack("Q", os.pread(fd, 8, addr // os.sysconf("SC_PAGE_SIZE") * 8))
    finally:
        os.close(fd)
    pfn = entry & ((1 << 55) - 1)
    if not entry >> 63:
        return "not present"
    return "pfn" if pfn else "pfn zero"
def kpageflags():
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        os.pread(fd, 8, pfn * 8)
    finally:
        os.close(fd)
    return "ok"
def process_madvise():  # MADV_COLD on the target's buffer, as a DAMOS cold action does
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    iov = (ctypes.c_void_p * 2)(addr, 1 << 20)
    pidfd = os.pidfd_open(pid)
    try:
        done = libc.syscall(440, pidfd, iov, 1, 20, 0)
    finally:
        os.close(pidfd)
    if done < 0:
        raise OSError(ctypes.get_errno(), "process_madvise")
    return "ok"
for name, action in [("clear_refs", clear_refs), ("smaps", smaps),
                     ("pagemap", pagemap), ("kpageflags", kpageflags),
                     ("process_madvise", process_madvise)]:
    attempt(name, action)
print(json.dumps(out))
"""

ALL_WORK = {
    "clear_refs": "ok",
    "smaps": "ok",
    "pagemap": "pfn",
    "kpageflags": "ok",
    "process_madvise": "ok",
}
EACCES = f"errno {errno.EACCES}"


@pytest.fixture(scope="module")
def nobodys_process() -> Iterator[tuple[int, str]]:
    """A process of user nobody with 1 MiB of written (so present) memory."""
    process = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         SYSTEM_PYTHON, "-c", TARGET],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    address = process.stdout.readline().strip()
    assert address.startswith("0x"), address
    yield process.pid, address
    process.stdin.close()
    process.wait(timeout=30)


def probe_with(caps: set[str], target: tuple[int, str]) -> dict[str, str]:
    """Run the probe as root whose capabilities are limited to caps, as systemd's
    CapabilityBoundingSet= limits the service (root gets its bounding set on exec)."""
    bounding = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in sorted(caps)])
    pid, address = target
    result = subprocess.run(
        ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all",
         SYSTEM_PYTHON, "-c", PROBE, str(pid), address],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def test_the_units_capabilities_suffice_for_another_users_process(
    nobodys_process: tuple[int, str],
) -> None:
    caps = set(" ".join(unit_settings(UNIT)["CapabilityBoundingSet"]).split())
    assert probe_with(caps, nobodys_process) == ALL_WORK


def test_each_capability_is_what_grants_its_access(nobodys_process: tuple[int, str]) -> None:
    # clear_refs is 0200 and owned by the target's uid: root needs CAP_DAC_OVERRIDE.
    without_dac = probe_with(EXPECTED_CAPS - {"CAP_DAC_OVERRIDE"}, nobodys_process)
    assert without_dac["clear_refs"] == EACCES
    # PFNs read as zero without CAP_SYS_ADMIN.
    without_admin = probe_with(EXPECTED_CAPS - {"CAP_SYS_ADMIN"}, nobodys_process)
    assert without_admin["pagemap"] == "pfn zero"
    # Ptrace read access to another user's process: denied with no capability,
    # granted by CAP_SYS_PTRACE. (Some kernels, 6.18 among them, also let
    # CAP_SYS_ADMIN pass this check; the unit keeps CAP_SYS_PTRACE for the others.)
    assert probe_with({"CAP_DAC_OVERRIDE"}, nobodys_process)["smaps"] == EACCES
    assert probe_with({"CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE"}, nobodys_process)["smaps"] == "ok"
    # /proc/kpageflags is root's (0400): no capability needed.
    assert probe_with(set(), nobodys_process)["kpageflags"] == "ok"
    # process_madvise(2) to another process (DAMOS actions) needs CAP_SYS_NICE.
    without_nice = probe_with(EXPECTED_CAPS - {"CAP_SYS_NICE"}, nobodys_process)
    assert without_nice["process_madvise"] == f"errno {errno.EPERM}"


# --- The installed unit under a real systemd ---------------------------------------
# This machine runs no systemd, so the check boots one (tests/nspawn.py): a oneshot
# unit runs CONTAINER_CHECK, which does `make install` from this checkout, then uses
# the daemon as an operator would. Results come back as key=value facts.

CONTAINER_CHECK = r"""#!/bin/sh
exec >/.damond-results/log 2>&1
set -x
fact() { printf '%s=%s\n' "$1" "$2" >> /.damond-results/facts; }
# await MATCH CONDITION: evaluate CONDITION on each line that dbus-monitor prints
# for messages matching MATCH (the line is in $line), until it holds (0) or 60 s
# pass (1). dbus-monitor also prints its own NameAcquired/NameLost.
await() {
    fifo=$(mktemp -u); mkfifo "$fifo"
    timeout 60 dbus-monitor --system "$1" > "$fifo" & monitor=$!
    ok=1
    while read -r line; do
        if eval "$2"; then ok=0; break; fi
    done < "$fifo"
    kill "$monitor" 2>/dev/null; rm -f "$fifo"
    return $ok
}
show() { systemctl show damond.service -p "$1" --value; }

cd "$REPO"
make install > /.damond-results/install.log 2>&1; fact install_rc $?
fact group "$(getent group damond | cut -d: -f1)"
fact fragment "$(show FragmentPath)"
fact before_first_call "$(systemctl is-active damond.service)"
# The container shares the host's kernel, whose DAMON belongs to the machine: this
# service never gets its admin tree (tests/conftest.py keeps every test's daemon off it).
mkdir -p /etc/systemd/system/damond.service.d
printf '[Service]\nEnvironment=DAMOND_KERNEL_DAMON_ADMIN=off\n' \
    > /etc/systemd/system/damond.service.d/no-kernel-damon.conf
systemctl daemon-reload
fact kernel_backend_env "$(show Environment)"

# Bus activation: the bus hands the first call's name to systemd.
fact nr "$(busctl get-property org.damond1 /org/damond1 org.damond1.Kdamonds nr)"
for p in ActiveState Type WatchdogUSec StatusText; do fact "$p" "$(show $p)"; done
main=$(show MainPID)
for f in CapEff CapBnd NoNewPrivs Seccomp; do
    fact "$f" "$(awk -v f="$f:" '$1 == f { print $2 }' /proc/$main/status)"
done

# Monitoring another user's process with clear_refs, inside the sandbox.
setpriv --reuid=nobody --regid=nogroup --clear-groups sleep 600 & target=$!
P=/org/damond1 K=/org/damond1/kdamonds/0 C=/org/damond1/kdamonds/0/contexts/0
busctl set-property org.damond1 $P org.damond1.Kdamonds nr u 1
busctl set-property org.damond1 $K org.damond1.Contexts nr u 1
busctl set-property org.damond1 $C org.damond1.Context access_check s clear_refs
busctl set-property org.damond1 $C org.damond1.Targets nr u 1
busctl set-property org.damond1 $C/targets/0 org.damond1.Target pid i $target
busctl set-property org.damond1 $K org.damond1.Kdamond state s on
await "type='signal',interface='org.damond1.Context',member='Snapshot'" \
    'case $line in *member=Snapshot*) true ;; *) false ;; esac'
fact snapshot_seen $?
fact target $target
fact snapshot "$(busctl call org.damond1 $C org.damond1.Context GetSnapshot)"
fact state "$(busctl get-property org.damond1 $K org.damond1.Kdamond state)"
fact status_on "$(show StatusText)"
fact journal "$(journalctl -u damond.service -o json | grep -m1 TARGET_PID)"

# The configuration file: `systemctl reload` commits it to the running kdamond.
setpriv --reuid=nobody --regid=nogroup --clear-groups sleep 600 & cfgtarget=$!
fact cfgtarget $cfgtarget
mkdir -p /etc/damond
printf '{"kdamonds": [{"contexts": [{"ops": "vaddr", "targets": [{"pid": %s}],
  "intervals": {"aggr_us": "200 ms"}, "access_check": "clear_refs",
  "schemes": [{"action": "stat"}]}]}]}\n' \
  $cfgtarget > /etc/damond/kdamonds.json
systemctl reload damond.service
await "type='signal',sender='org.damond1',path='$C',member='PropertiesChanged'" \
    '[ "$(busctl get-property org.damond1 $C org.damond1.Intervals aggr_us)" = "t 200000" ]'
fact reloaded $?
fact reload_pid "$(busctl get-property org.damond1 $C/targets/0 org.damond1.Target pid)"
fact reload_state "$(busctl get-property org.damond1 $K org.damond1.Kdamond state)"

# The exporter: a DynamicUser in group damond, serving what the snapshots say.
systemctl start damond-exporter.service
fact exporter_state "$(systemctl show damond-exporter.service -p ActiveState --value)"
exporter=$(systemctl show damond-exporter.service -p MainPID --value)
fact exporter_user "$(getent passwd "$(awk '$1 == "Uid:" { print $2 }' /proc/$exporter/status)")"
fact exporter_groups "$(awk '$1 == "Groups:" { $1 = ""; print }' /proc/$exporter/status)"
fact damond_gid "$(getent group damond | cut -d: -f3)"
# metric PREFIX WANT MIN: the first line of /metrics that starts with PREFIX, holds
# WANT and has a value of at least MIN, within 60 s
metric() { /usr/bin/python3 - "$@" <<'PY'
import sys, time, urllib.request
prefix, want, least = sys.argv[1], sys.argv[2], float(sys.argv[3])
for _ in range(60):  # the exporter needs its first snapshot of the new pid
    try:
        text = urllib.request.urlopen("http://127.0.0.1:9433/metrics", timeout=5).read().decode()
    except OSError:
        text = ""
    lines = [l for l in text.splitlines()
             if l.startswith(prefix) and want in l and float(l.rsplit(" ", 1)[1]) >= least]
    if lines:
        print(lines[0])
        break
    time.sleep(1)
PY
}
fact metrics "$(metric 'damond_wss_bytes{' "pid=\"$cfgtarget\"" 0)"
# scheme stats: read through org.damond1.Readers (the group gets no PropertiesChanged)
fact scheme_metric "$(metric 'damond_scheme_tried_regions_total{' 'action="stat"' 1)"
fact exporter_log "$(journalctl -u damond-exporter.service -o cat | tail -n 8 | tr '\n' '|')"

systemctl stop damond-exporter.service
kill $target

# The watchdog: a stalled event loop gets SIGABRT, then Restart=on-failure.
mkdir -p /run/systemd/system/damond.service.d
printf '[Service]\nWatchdogSec=2s\nEnvironment=DAMOND_FAULT_STALL_S=60\n' \
    > /run/systemd/system/damond.service.d/watchdog.conf
systemctl daemon-reload
systemctl restart damond.service
stalled=$(show MainPID)
fact stalled_pid $stalled
kill -USR1 $stalled
await "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.damond1'" \
    '[ "$(show NRestarts)" = 1 ] && busctl call org.freedesktop.DBus /org/freedesktop/DBus \
        org.freedesktop.DBus NameHasOwner s org.damond1 | grep -q true'
fact restarted $?
systemctl start damond.service  # waits for READY=1 if the restart is still starting
fact restarted_pid "$(show MainPID)"
fact restarted_state "$(show ActiveState)"
# ...with the configuration applied again: the restart did not lose the monitoring
fact restarted_kdamond "$(busctl get-property org.damond1 $K org.damond1.Kdamond state)"
fact restarted_target "$(busctl get-property org.damond1 $C/targets/0 org.damond1.Target pid)"
fact NRestarts "$(show NRestarts)"
fact watchdog_log "$(journalctl -u damond.service -o cat | grep -c 'Watchdog timeout')"
rm -r /run/systemd/system/damond.service.d
systemctl daemon-reload

# Stop: SIGTERM, exit 0. Uninstall stops, disables and removes.
systemctl stop damond.service
fact stop_result "$(show Result)"
systemctl enable --now damond.service
fact enabled "$(systemctl is-enabled damond.service)"
make uninstall > /.damond-results/uninstall.log 2>&1; fact uninstall_rc $?
fact after_uninstall "$(show LoadState) $(systemctl is-active damond.service)"
fact leftovers "$(ls -d /usr/local/bin/damond /usr/local/lib/damond /usr/local/bin/damondctl \
    /usr/local/bin/damond-exporter /usr/local/lib/systemd/system/damond-exporter.service \
    /usr/local/lib/systemd/system/damond.service /usr/local/share/doc/damond \
    /usr/local/share/dbus-1/system-services/org.damond1.service \
    /usr/local/share/dbus-1/system-services/org.damond1.Readers.service \
    /usr/local/share/dbus-1/system-services/org.damond1.Public.service \
    /etc/dbus-1/system.d/org.damond1.conf 2>/dev/null | wc -l)"
fact done yes
"""

@dataclass
class Booted:
    facts: dict[str, str]
    log: str

    def __getitem__(self, key: str) -> str:
        assert key in self.facts, f"no fact {key!r}; the check's log:\n{self.log}"
        return self.facts[key]


@pytest.fixture(scope="module")
def under_systemd(tmp_path_factory: pytest.TempPathFactory) -> Booted:
    subprocess.run([str(REPO / "scripts" / "ensure-apt"), "systemd-container"], check=True)
    base = tmp_path_factory.mktemp("systemd")
    boot = nspawn.boot(base, REPO, CONTAINER_CHECK, "packaging check", MAKE_TIMEOUT)
    results = base / "results"
    log = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(results.iterdir())
    )
    log += f"\n--- nspawn (exit {boot.returncode})\n{boot.stdout}{boot.stderr}"
    facts_file = results / "facts"
    facts = dict(
        line.split("=", 1)
        for line in (facts_file.read_text().splitlines() if facts_file.exists() else [])
    )
    booted = Booted(facts, log)
    assert booted["done"] == "yes"
    return booted


def test_make_install_on_a_systemd_machine(under_systemd: Booted) -> None:
    assert under_systemd["install_rc"] == "0"
    assert under_systemd["group"] == "damond"
    assert under_systemd["fragment"] == "/usr/local/lib/systemd/system/damond.service"
    assert "system bus: configuration reloaded" in under_systemd.log
    assert "systemd: daemon-reload done" in under_systemd.log


def test_the_service_under_test_never_gets_the_hosts_kernel_damon(under_systemd: Booted) -> None:
    assert "DAMOND_KERNEL_DAMON_ADMIN=off" in under_systemd["kernel_backend_env"]


def test_first_call_starts_the_unit_which_reports_ready_and_status(under_systemd: Booted) -> None:
    assert under_systemd["before_first_call"] == "inactive"
    assert under_systemd["nr"] == "u 0"
    assert under_systemd["ActiveState"] == "active"  # READY=1 came
    assert under_systemd["Type"] == "notify"
    assert under_systemd["WatchdogUSec"] == "30s"
    assert under_systemd["StatusText"]


def test_the_service_runs_with_only_the_measured_capabilities(under_systemd: Booted) -> None:
    # CAP_SYS_ADMIN, CAP_SYS_NICE, CAP_SYS_PTRACE, CAP_DAC_OVERRIDE
    caps = 1 << 21 | 1 << 23 | 1 << 19 | 1 << 1
    assert int(under_systemd["CapEff"], 16) == caps
    assert int(under_systemd["CapBnd"], 16) == caps
    assert under_systemd["NoNewPrivs"] == "1"
    assert under_systemd["Seccomp"] == "2"  # SystemCallFilter is on


def test_the_sandboxed_service_monitors_another_users_process(under_systemd: Booted) -> None:
    assert under_systemd["snapshot_seen"] == "0"
    assert under_systemd["state"] == 's "on"'
    target = under_systemd["target"]
    # GetSnapshot → (seq, timestamp, max_nr_accesses, [(index, pid, regions)])
    assert f" 0 {target} " in under_systemd["snapshot"], under_systemd["snapshot"]
    assert "clear_refs" in under_systemd["status_on"]
    fields = json.loads(under_systemd["journal"])
    assert fields["TARGET_PID"] == target
    assert fields["ACCESS_CHECK"] == "clear_refs"


def test_the_watchdog_restarts_a_stalled_daemon(under_systemd: Booted) -> None:
    assert under_systemd["restarted"] == "0"
    assert under_systemd["NRestarts"] == "1"
    assert int(under_systemd["watchdog_log"]) >= 1
    assert under_systemd["restarted_state"] == "active"
    assert under_systemd["restarted_pid"] != under_systemd["stalled_pid"]


def test_reload_and_restarts_apply_the_configuration_file(under_systemd: Booted) -> None:
    target = under_systemd["cfgtarget"]
    assert under_systemd["reloaded"] == "0"
    assert under_systemd["reload_pid"] == f"i {target}"
    assert under_systemd["reload_state"] == 's "on"'
    # the watchdog's restart came back monitoring what the file says
    assert under_systemd["restarted_kdamond"] == 's "on"'
    assert under_systemd["restarted_target"] == f"i {target}"


def test_the_exporter_serves_metrics_as_an_unprivileged_member_of_damond(
    under_systemd: Booted,
) -> None:
    assert under_systemd["exporter_state"] == "active"
    assert under_systemd["exporter_user"].startswith("damond-exporter:")
    assert under_systemd["damond_gid"] in under_systemd["exporter_groups"].split()
    metric = under_systemd["metrics"]
    assert metric.startswith("damond_wss_bytes{"), under_systemd.log
    assert 'comm="sleep"' in metric and f'pid="{under_systemd["cfgtarget"]}"' in metric
    # counters that grow, though only root receives the daemon's PropertiesChanged
    scheme = under_systemd["scheme_metric"]
    assert scheme.startswith("damond_scheme_tried_regions_total{"), under_systemd.log
    assert 'action="stat"' in scheme, scheme


def test_stop_exits_cleanly_and_uninstall_removes_the_service(under_systemd: Booted) -> None:
    assert under_systemd["stop_result"] == "success"
    assert under_systemd["enabled"] == "enabled"
    assert under_systemd["uninstall_rc"] == "0"
    assert under_systemd["after_uninstall"] == "not-found inactive"
    assert under_systemd["leftovers"] == "0"
    assert "group damond: kept" in under_systemd.log
