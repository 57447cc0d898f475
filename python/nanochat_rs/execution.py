"""Run untrusted Python (model-written HumanEval solutions) in a throwaway subprocess sandbox.

Every run gets:
  * a fresh interpreter (`sys.executable -I -X utf8`, never a fork of this process) in its own session
    and process group, with a scrubbed environment (PATH, HOME, TMPDIR, TMP, LANG only) and stdin at /dev/null;
  * its own temporary directory as the working directory, removed afterwards (also after a timeout);
  * rlimits on address space, CPU time, file size, open files, processes and core dumps;
  * a guard installed before the code runs: process creation, signals, session and directory changes
    and os._exit are refused, files can only be written, removed, renamed or chmod'ed inside the
    sandbox directory, and ctypes / _posixsubprocess (hence subprocess) cannot be imported;
  * a wall-clock timeout, after which the whole process group is SIGKILLed (so is any process the code
    left behind when it ends), and stdout/stderr read incrementally and cut at `max_output_bytes`;
  * where the kernel allows unprivileged user namespaces, its own empty network namespace
    (`unshare --user --net`): no interface but a down loopback, so no connection can be made.
    `network_isolation()` says whether that is available here and why not; results carry it too.

RLIMIT_NPROC counts processes per *real user* and the kernel exempts real uid 0 (and holders of
CAP_SYS_RESOURCE / CAP_SYS_ADMIN). So when this process is root, the child runs through `setpriv` with
real uid/gid "nobody" (its effective uid stays 0, so it can still read an interpreter under /root) and,
outside a user namespace, no capabilities: then a fork bomb stops at MAX_PROCESSES processes instead of
filling the process table. `process_limit()` says whether the limit binds here.

This is not a security boundary against adversarial code (Python can undo the guard, e.g. by
re-importing `posix`; the child may still read what its user can read); it keeps generated code from
damaging the machine by accident, which is what evaluating a model needs. Linux only (pidfds, /proc).
"""

from __future__ import annotations

import functools
import math
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from nanochat_rs.util import check_int, check_number

__all__ = ["ExecutionResult", "execute_code", "network_isolation", "process_limit"]

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_MEMORY_BYTES = 256 * 2**20
DEFAULT_MAX_OUTPUT_BYTES = 2**20  # per stream
MIN_MEMORY_BYTES = 64 * 2**20  # the interpreter maps ~25 MiB before the code starts
MAX_FILE_BYTES = 16 * 2**20
MAX_OPEN_FILES = 64
MAX_PROCESSES = 64  # per real user (threads count too); the child's own user may already be near it
CHILD_PATH = "/usr/bin:/bin"
PROGRAM_NAME = "program.py"
UNPRIVILEGED_ID = 65534  # "nobody": the real uid/gid a root parent's child runs with
_MEMORY_EXIT_STATUS = 3  # the child's status when the program died of MemoryError
_READ_CHUNK = 1 << 16
_PROBE_TIMEOUT_S = 30.0
_PRINT_NETWORK_NAMESPACE = "import os; print(os.readlink('/proc/self/ns/net'))"

# The child's main program, run as `python -I -X utf8 -c _CHILD_MAIN LIMITS... MEMORY_STATUS PROGRAM`.
# It is a string rather than this module so the child never imports nanochat_rs (which may not be
# importable under -I) and starts in a few tens of milliseconds.
_CHILD_MAIN = r"""
import builtins
import io
import os
import posix
import resource
import sys
import traceback

*LIMITS, MEMORY_STATUS, PROGRAM = sys.argv[1:]
SANDBOX = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
ONE_PATH = ((0, "path", "dir_fd"),)
TWO_PATHS = ((0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
CONFINED = {  # os function -> its path arguments (position, keyword, the keyword of its dir_fd)
    "remove": ONE_PATH, "unlink": ONE_PATH, "rmdir": ONE_PATH, "mkdir": ONE_PATH, "mkfifo": ONE_PATH,
    "mknod": ONE_PATH, "chmod": ONE_PATH, "chown": ONE_PATH, "utime": ONE_PATH,
    "lchown": ((0, "path", None),), "truncate": ((0, "path", None),),
    "rename": TWO_PATHS, "replace": TWO_PATHS, "link": TWO_PATHS, "symlink": ((1, "dst", "dir_fd"),),
}
REFUSED = (
    "system", "popen", "kill", "killpg", "fork", "forkpty", "posix_spawn", "posix_spawnp",
    "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "setsid", "setpgid", "setpgrp", "chdir", "fchdir", "chroot", "fchmod", "fchown", "_exit",
)
exit_process, real_open, real_os_open = os._exit, io.open, os.open


def inside(path, dir_fd=None, or_sandbox=False):
    if isinstance(path, int):  # an open descriptor: its file was checked when it was opened
        return True
    base = os.getcwd() if dir_fd is None else os.readlink(f"/proc/self/fd/{dir_fd}")
    resolved = os.path.realpath(os.path.join(base, os.fsdecode(path)))
    return resolved.startswith(SANDBOX + os.sep) or (or_sandbox and resolved == SANDBOX)


def replace(name, function):
    for module in (os, posix):  # os re-exports posix's functions: both names must go
        if hasattr(module, name):
            setattr(module, name, function)


def refused(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"os.{name} is disabled in the code sandbox")
    return refuse


def confined(name, paths):
    original = getattr(os, name)

    def confine(*args, **kwargs):
        for position, keyword, dir_fd_keyword in paths:
            path = args[position] if len(args) > position else kwargs.get(keyword)
            if path is not None and not inside(path, kwargs.get(dir_fd_keyword)):
                raise PermissionError(f"os.{name} may only touch what is inside the sandbox directory, not {path!r}")
        return original(*args, **kwargs)
    return confine


# open() may name the sandbox itself: tempfile passes the directory and creates the file in its opener
def confined_open(file, mode="r", *args, **kwargs):
    if isinstance(mode, str) and any(flag in mode for flag in "wax+") and not inside(file, or_sandbox=True):
        raise PermissionError(f"open for writing outside the sandbox directory: {file!r}")
    return real_open(file, mode, *args, **kwargs)


def confined_os_open(path, flags, *args, dir_fd=None, **kwargs):
    if flags & WRITE_FLAGS and not inside(path, dir_fd):
        raise PermissionError(f"os.open for writing outside the sandbox directory: {path!r}")
    return real_os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)


with real_open(PROGRAM, "rb") as file:
    source = file.read()
kinds = (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE,
         resource.RLIMIT_NPROC, resource.RLIMIT_CORE)
for kind, value in zip(kinds, [*map(int, LIMITS), 0], strict=True):
    hard = resource.getrlimit(kind)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))  # soft = hard: the code cannot raise them again

for name in REFUSED:
    replace(name, refused(name))
for name, paths in CONFINED.items():
    replace(name, confined(name, paths))
replace("open", confined_os_open)
builtins.open = io.open = confined_open
for module in ("ctypes", "_ctypes", "_posixsubprocess"):
    sys.modules[module] = None

namespace = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(source, PROGRAM, "exec"), namespace)
    status = 0
except BaseException as error:  # SystemExit too: a program that stops early has not passed
    status = int(MEMORY_STATUS) if isinstance(error, MemoryError) else 1
    namespace.clear()  # after a MemoryError, room to format the traceback
    try:
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)  # from the program's frame
    except BaseException:
        pass
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except BaseException:
        pass
exit_process(status)
"""


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one `execute_code` run.

    `success`: the program ran to its end (no uncaught exception, SystemExit included) within the limits.
    `stdout`/`stderr`: what it printed (UTF-8, undecodable bytes replaced), each cut at `max_output_bytes`;
    `output_truncated` says whether anything was cut. `error`: why it failed (None on success): the
    timeout, the memory limit, a signal, or the last line of the traceback. `network_isolated`: whether
    the run had its own empty network namespace.
    """

    success: bool
    stdout: str
    stderr: str
    timed_out: bool
    memory_exceeded: bool
    error: str | None
    network_isolated: bool
    output_truncated: bool


@dataclass(frozen=True)
class _Launcher:
    """How children are started on this machine, found once by running probes."""

    prefix: tuple[str, ...]  # commands the interpreter is started through (setpriv, unshare)
    network_isolated: bool
    network_reason: str
    process_limited: bool
    process_reason: str


def _child_environment(home: str) -> dict[str, str]:
    # TMP as well as TMPDIR: glibc drops TMPDIR when the real and effective uids differ (a root parent's setpriv)
    return {"PATH": CHILD_PATH, "HOME": home, "TMPDIR": home, "TMP": home, "LANG": "C.UTF-8"}


def _probe(prefix: tuple[str, ...]) -> tuple[bool, str]:
    """Start a child through `prefix` that prints its network namespace: (started, namespace or why not)."""
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", _PRINT_NETWORK_NAMESPACE], cwd="/",
                               env=_child_environment("/"), stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"{shlex.join(prefix)} could not run: {error}"
    if probe.returncode != 0:
        return False, f"{shlex.join(prefix)} failed: {probe.stderr.strip() or f'exit status {probe.returncode}'}"
    return True, probe.stdout.strip()


@functools.cache
def _launcher() -> _Launcher:
    setpriv = shutil.which("setpriv") if os.geteuid() == 0 else None
    drop: tuple[str, ...] = ()
    if setpriv:
        drop = (setpriv, f"--ruid={UNPRIVILEGED_ID}", f"--rgid={UNPRIVILEGED_ID}", "--clear-groups")
    unshare = shutil.which("unshare")
    network_reason = "the unshare command (util-linux) is not installed"
    if unshare:
        isolated = (*drop, unshare, "--user", "--net", "--map-root-user")
        started, namespace = _probe(isolated)
        if started and namespace != os.readlink("/proc/self/ns/net"):
            return _Launcher(isolated, True, "each run gets its own empty network namespace (unshare --user --net)",
                             *_process_limit(drop))
        network_reason = namespace if not started else "unshare ran but left the child in this network namespace"
    if drop:
        # Outside a user namespace the child keeps this namespace's capabilities, and CAP_SYS_RESOURCE /
        # CAP_SYS_ADMIN exempt from RLIMIT_NPROC as well: drop them all.
        drop = (*drop, "--inh-caps=-all", "--bounding-set=-all")
        if not _probe(drop)[0]:
            drop = ()
    return _Launcher(drop, False, f"network access is NOT blocked: {network_reason}", *_process_limit(drop))


def _process_limit(drop: tuple[str, ...]) -> tuple[bool, str]:
    if os.geteuid() != 0:
        return True, f"the child runs as uid {os.getuid()}, which RLIMIT_NPROC binds"
    if drop:
        return True, f"the child runs with real uid {UNPRIVILEGED_ID} (setpriv), which RLIMIT_NPROC binds"
    return False, "the child runs as root (setpriv from util-linux is missing or failed): RLIMIT_NPROC does not bind"


def network_isolation() -> tuple[bool, str]:
    """Whether sandboxed code runs without network access on this machine, and why (not)."""
    launcher = _launcher()
    return launcher.network_isolated, launcher.network_reason


def process_limit() -> tuple[bool, str]:
    """Whether RLIMIT_NPROC (MAX_PROCESSES) binds sandboxed code on this machine, and why (not)."""
    launcher = _launcher()
    return launcher.process_limited, launcher.process_reason


class _Capture:
    """The first `limit` bytes of a stream; the rest is read and dropped so the writer never blocks."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def take(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:room]
        self.truncated |= len(chunk) > room

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _collect(process: subprocess.Popen[bytes], deadline: float, captures: dict[int, _Capture]) -> bool:
    """Read the child's pipes until it has exited and they are closed, or until `deadline`.
    Returns whether the child exited by itself. The group is killed as soon as the leader exits, so
    processes it left behind cannot hold the pipes open."""
    pidfd = os.pidfd_open(process.pid)  # readable once the child exits; it is not reaped until wait()
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            for fd in captures:
                selector.register(fd, selectors.EVENT_READ)
            exited = False
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    if key.fd == pidfd:
                        exited = True
                        selector.unregister(pidfd)
                        _kill_group(process.pid)
                        continue
                    chunk = os.read(key.fd, _READ_CHUNK)
                    if chunk:
                        captures[key.fd].take(chunk)
                    else:
                        selector.unregister(key.fd)
            return exited
    finally:
        os.close(pidfd)


def _remove_tree(path: str) -> None:
    """shutil.rmtree after giving back the owner permissions the code may have taken from its directories."""
    os.chmod(path, 0o700)
    for directory, subdirectories, _ in os.walk(path):  # top-down: fixed before os.walk lists them
        for name in subdirectories:
            subdirectory = os.path.join(directory, name)
            if not os.path.islink(subdirectory):
                os.chmod(subdirectory, 0o700)
    shutil.rmtree(path)


def _failure(returncode: int, timed_out: bool, timeout: float, max_memory_bytes: int, stderr: str) -> str | None:
    if timed_out:
        return f"timed out after {timeout:g} s"
    if returncode == 0:
        return None
    if returncode == _MEMORY_EXIT_STATUS:
        return f"memory limit of {max_memory_bytes} bytes exceeded"
    if returncode < 0:
        return f"killed by signal {-returncode} ({signal.strsignal(-returncode)})"
    last_line = stderr.rstrip().rpartition("\n")[2]
    return last_line or f"exited with status {returncode}"


def execute_code(code: str, timeout: float = DEFAULT_TIMEOUT_S, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> ExecutionResult:
    """Run `code` as a program in the sandbox and report how it went.

    `timeout`: wall-clock seconds for the whole run, interpreter start included (the CPU-time limit is a
    second above it). `max_memory_bytes`: the address-space limit (>= MIN_MEMORY_BYTES).
    `max_output_bytes`: how much of stdout and of stderr (each) is kept.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    try:
        source = code.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"code is not encodable as UTF-8: {error}") from None
    timeout = check_number("timeout", timeout)
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    max_memory_bytes = check_int("max_memory_bytes", max_memory_bytes, MIN_MEMORY_BYTES)
    max_output_bytes = check_int("max_output_bytes", max_output_bytes, 1)
    launcher = _launcher()
    limits = (max_memory_bytes, math.ceil(timeout) + 1, MAX_FILE_BYTES, MAX_OPEN_FILES, MAX_PROCESSES)
    sandbox = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        program = os.path.join(sandbox, PROGRAM_NAME)
        with open(program, "wb") as file:
            file.write(source)
        argv = [*launcher.prefix, sys.executable, "-I", "-X", "utf8", "-c", _CHILD_MAIN, *map(str, limits),
                str(_MEMORY_EXIT_STATUS), program]
        deadline = time.monotonic() + timeout
        process = subprocess.Popen(argv, cwd=sandbox, env=_child_environment(sandbox), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert process.stdout is not None and process.stderr is not None  # both are PIPE
        stdout, stderr = _Capture(max_output_bytes), _Capture(max_output_bytes)
        try:
            exited = _collect(process, deadline, {process.stdout.fileno(): stdout, process.stderr.fileno(): stderr})
        finally:
            _kill_group(process.pid)  # before wait(): the unreaped leader keeps the group id from being reused
            returncode = process.wait()
            process.stdout.close()
            process.stderr.close()
    finally:
        _remove_tree(sandbox)
    timed_out = not exited
    stderr_text = stderr.text()
    return ExecutionResult(
        success=returncode == 0 and not timed_out,
        stdout=stdout.text(),
        stderr=stderr_text,
        timed_out=timed_out,
        memory_exceeded=returncode == _MEMORY_EXIT_STATUS,
        error=_failure(returncode, timed_out, timeout, max_memory_bytes, stderr_text),
        network_isolated=launcher.network_isolated,
        output_truncated=stdout.truncated or stderr.truncated,
    )
