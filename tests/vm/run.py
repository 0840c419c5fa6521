#!/usr/bin/env python3
"""Run a command in a QEMU guest whose kernel has page_idle and DAMON.

The guest sees the host's whole file system read-only (9p, tag ``hostroot``)
under a tmpfs overlay, so the host's Python, the repository and its venv work
unchanged; writes stay in the guest. A second, writable 9p share (tag
``results``) is a host directory mounted at ``/results`` in the guest: the
command script and the exit code travel through it, and the command may leave
files there for the caller. See tests/vm/README.md.

As a script::

    tests/vm/run.py [options] -- COMMAND [ARG...]   # run COMMAND with ARGs
    tests/vm/run.py [options] 'shell text'         # one argument: run by sh

It prints the guest's console as it comes and exits with the command's exit
code (124 on a timeout, 125 when the guest gave no exit code).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_KERNEL = HERE / "build-kernel"
BUILD_INITRAMFS = HERE / "initramfs"
MARK = "@@damond-vm@@"
DEFAULT_BOOT_TIMEOUT = 120.0
# Host variables handed to the guest command when set.
PASSED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CI", "TZ")


class VMUnavailable(RuntimeError):
    """The test kernel, the initramfs or QEMU could not be had."""


@dataclass
class GuestResult:
    """What one `run_in_guest` call gave."""

    exit_code: int | None
    """The command's exit status; None when the guest wrote none."""
    console_output: str
    """Everything the guest printed on its serial console (the command's
    stdout and stderr among it), of the last attempt."""
    results_dir: Path
    """The host directory shared with the guest as /results."""
    timed_out: bool = False
    attempts: int = 1
    boot_seconds: float | None = None
    """Host wall time from starting QEMU to the command's start."""
    seconds: float = 0.0
    """Host wall time of the last attempt, QEMU start to exit."""
    qemu_returncode: int | None = None
    earlier_consoles: list[str] = field(default_factory=list)
    """Consoles of attempts that were retried."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def command_output(self) -> str:
        """The console between the command's start and exit markers."""
        lines = self.console_output.splitlines()
        start = next((i for i, ln in enumerate(lines) if f"{MARK} command start" in ln), None)
        if start is None:
            return ""
        end = next(
            (i for i in range(start + 1, len(lines)) if f"{MARK} command exit" in lines[i]),
            len(lines),
        )
        return "\n".join(lines[start + 1 : end])

    def describe(self) -> str:
        """A summary for assertion messages: status and the console's tail."""
        status = "timed out" if self.timed_out else f"exit code {self.exit_code}"
        tail = "\n".join(self.console_output.splitlines()[-60:])
        return (
            f"guest {status} after {self.attempts} attempt(s), {self.seconds:.1f} s "
            f"(results in {self.results_dir}); console tail:\n{tail}"
        )


def _run_builder(script: Path, what: str) -> Path:
    try:
        proc = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    except OSError as e:
        raise VMUnavailable(f"cannot run {script}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        raise VMUnavailable(
            f"{script} failed (exit {proc.returncode}) building the {what}:\n{tail}"
        )
    lines = proc.stdout.strip().splitlines()
    if not lines or not Path(lines[-1]).is_file():
        raise VMUnavailable(f"{script} printed no {what} path: {proc.stdout!r}")
    return Path(lines[-1])


def kernel_path() -> Path:
    """The test kernel: $DAMOND_TEST_KERNEL, or tests/vm/build-kernel's (built if needed)."""
    env = os.environ.get("DAMOND_TEST_KERNEL")
    if env:
        if not Path(env).is_file():
            raise VMUnavailable(f"DAMOND_TEST_KERNEL={env} does not exist")
        return Path(env)
    return _run_builder(BUILD_KERNEL, "kernel")


def initramfs_path() -> Path:
    """The initramfs: $DAMOND_TEST_INITRAMFS, or tests/vm/initramfs's (built if needed)."""
    env = os.environ.get("DAMOND_TEST_INITRAMFS")
    if env:
        if not Path(env).is_file():
            raise VMUnavailable(f"DAMOND_TEST_INITRAMFS={env} does not exist")
        return Path(env)
    return _run_builder(BUILD_INITRAMFS, "initramfs")


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VMUnavailable(
            "qemu-system-x86_64 is not installed (tests/vm/build-kernel installs it)"
        )
    return qemu


def guest_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the guest command starts with.

    PATH puts the repository's venv and the running Python's directory first,
    then the host's PATH, so `python` is the venv's.
    """
    path: list[str] = []
    for entry in [
        str(REPO / ".venv" / "bin"),
        str(Path(sys.executable).parent),
        *os.environ.get("PATH", "").split(os.pathsep),
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]:
        if entry and entry not in path:
            path.append(entry)
    env = {
        "PATH": os.pathsep.join(path),
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "DAMOND_IN_VM": "1",
    }
    venv = REPO / ".venv"
    if venv.is_dir():
        env["VIRTUAL_ENV"] = str(venv)
    for name in PASSED_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    if extra:
        env.update(extra)
    return env


def command_script(
    command: Sequence[str] | str, cwd: str | os.PathLike[str], env: Mapping[str, str]
) -> str:
    """The /bin/sh script the guest runs: environment, directory, command."""
    lines = ["# written by tests/vm/run.py"]
    for key, value in env.items():
        if not key.isidentifier():
            raise ValueError(f"bad environment variable name: {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(os.fspath(cwd))} || exit 125")
    if isinstance(command, str):
        lines.append(command)
    else:
        if not command:
            raise ValueError("empty command")
        lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


def _virtfs_path(path: Path) -> str:
    return str(path).replace(",", ",,")


def qemu_command(
    kernel: Path,
    initramfs: Path,
    results_dir: Path,
    vcpus: int,
    memory_mib: int,
    append: str = "",
) -> list[str]:
    cmdline = "console=ttyS0 panic=-1 quiet loglevel=4"
    if append:
        cmdline += " " + append
    return [
        qemu_binary(),
        "-accel", "tcg",
        "-cpu", "max",
        "-m", str(memory_mib),
        "-smp", str(vcpus),
        "-nographic",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(kernel),
        "-initrd", str(initramfs),
        "-append", cmdline,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={_virtfs_path(results_dir)},mount_tag=results,security_model=none,"
        "multidevs=remap",
    ]  # fmt: skip


@dataclass
class _Attempt:
    console: str
    exit_code: int | None
    timed_out: bool
    command_started: bool
    boot_seconds: float | None
    seconds: float
    qemu_returncode: int | None


def _boot_once(
    argv: list[str],
    results_dir: Path,
    timeout: float,
    boot_timeout: float,
    echo: TextIO | None,
) -> _Attempt:
    exit_file = results_dir / "exit-code"
    exit_file.unlink(missing_ok=True)
    chunks: list[str] = []
    started = threading.Event()
    start = time.monotonic()
    boot_seconds: list[float] = []
    log_path = results_dir / "console.log"

    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    stdout = proc.stdout

    def reader() -> None:
        with open(log_path, "w", encoding="utf-8", errors="replace") as log:
            for raw in iter(stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
                chunks.append(line)
                log.write(line)
                log.flush()
                if echo is not None:
                    echo.write(line)
                    echo.flush()
                if not started.is_set() and f"{MARK} command start" in line:
                    boot_seconds.append(time.monotonic() - start)
                    started.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    timed_out = False
    try:
        if not started.wait(min(boot_timeout, timeout)) and proc.poll() is None:
            timed_out = True  # no command start in time: a boot failure
        else:
            remaining = timeout - (time.monotonic() - start)
            try:
                proc.wait(max(remaining, 0.0))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        thread.join(10)
    seconds = time.monotonic() - start
    exit_code: int | None = None
    try:
        exit_code = int(exit_file.read_text().strip())
    except (OSError, ValueError):
        exit_code = None
    return _Attempt(
        console="".join(chunks),
        exit_code=exit_code,
        timed_out=timed_out and exit_code is None,
        command_started=started.is_set(),
        boot_seconds=boot_seconds[0] if boot_seconds else None,
        seconds=seconds,
        qemu_returncode=proc.returncode,
    )


def run_in_guest(
    command: Sequence[str] | str,
    timeout: float,
    vcpus: int = 1,
    memory_mib: int = 1024,
    results_dir: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    append: str = "",
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    echo: TextIO | None = None,
    kernel: Path | None = None,
    initramfs: Path | None = None,
) -> GuestResult:
    """Boot the test kernel, run `command` as root in the guest, power off.

    command: an argv list (run with exec), or shell text run by /bin/sh.
    timeout: seconds for the whole run, boot included.
    results_dir: host directory mounted at /results in the guest (made if
        missing; a new temporary directory when None). The guest writes
        command.sh, exit-code and console.log there.
    cwd: the command's working directory (default: the caller's).
    env: variables added to `guest_environment()`'s.
    append: extra kernel command line.
    boot_timeout: seconds to wait for the command to start.
    echo: a stream to copy the console to as it arrives.

    When the command never started (a boot that printed nothing, as happens
    about once in 50 boots), the guest is booted once more. A command that ran
    and timed out or crashed the guest is not retried.
    Raises VMUnavailable when the kernel, initramfs or QEMU cannot be had.
    """
    kernel = kernel or kernel_path()
    initramfs = initramfs or initramfs_path()
    if results_dir is None:
        rdir = Path(tempfile.mkdtemp(prefix="damond-vm-"))
    else:
        rdir = Path(results_dir).resolve()
        rdir.mkdir(parents=True, exist_ok=True)
    full_env = guest_environment(env)
    script = command_script(command, cwd if cwd is not None else os.getcwd(), full_env)
    (rdir / "command.sh").write_text(script)
    argv = qemu_command(kernel, initramfs, rdir, vcpus, memory_mib, append)

    earlier: list[str] = []
    attempt = _boot_once(argv, rdir, timeout, boot_timeout, echo)
    if attempt.exit_code is None and not attempt.command_started:
        earlier.append(attempt.console)
        (rdir / "console.attempt1.log").write_text(attempt.console)
        if echo is not None:
            echo.write("[run.py] the command did not start; booting again\n")
        attempt = _boot_once(argv, rdir, timeout, boot_timeout, echo)
    return GuestResult(
        exit_code=attempt.exit_code,
        console_output=attempt.console,
        results_dir=rdir,
        timed_out=attempt.timed_out,
        attempts=len(earlier) + 1,
        boot_seconds=attempt.boot_seconds,
        seconds=attempt.seconds,
        qemu_returncode=attempt.qemu_returncode,
        earlier_consoles=earlier,
    )


@dataclass
class Guest:
    """Runs commands in fresh guests booted from one kernel and initramfs."""

    kernel: Path
    initramfs: Path

    @classmethod
    def build(cls) -> Guest:
        """Kernel and initramfs from the environment or the (cached) builders."""
        guest = cls(kernel=kernel_path(), initramfs=initramfs_path())
        qemu_binary()
        return guest

    def run(self, command: Sequence[str] | str, timeout: float, **kwargs: Any) -> GuestResult:
        """run_in_guest with this kernel and initramfs."""
        return run_in_guest(
            command, timeout, kernel=self.kernel, initramfs=self.initramfs, **kwargs
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command in a QEMU guest with the damond test kernel.",
        epilog="One COMMAND argument is shell text run by /bin/sh; several are an argv.",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=1024, help="MiB (default 1024)")
    parser.add_argument("--results", help="host directory mounted at /results")
    parser.add_argument("--cwd", help="working directory in the guest (default: this one)")
    parser.add_argument("--append", default="", help="extra kernel command line")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not echo the console")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    words = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        parser.error("no command")
    command: Sequence[str] | str = words[0] if len(words) == 1 else words
    try:
        result = run_in_guest(
            command,
            timeout=args.timeout,
            vcpus=args.vcpus,
            memory_mib=args.memory,
            results_dir=args.results,
            cwd=args.cwd,
            append=args.append,
            echo=None if args.quiet else sys.stdout,
        )
    except VMUnavailable as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 125
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "never"
    print(
        f"run.py: exit code {result.exit_code}, timed out: {result.timed_out}, "
        f"attempts: {result.attempts}, boot to command: {boot}, total: {result.seconds:.1f} s, "
        f"results: {result.results_dir}",
        file=sys.stderr,
    )
    if result.timed_out:
        return 124
    return 125 if result.exit_code is None else result.exit_code


if __name__ == "__main__":
    sys.exit(main())
