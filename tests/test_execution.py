"""The code sandbox: what a program run by `execute_code` gets back, and what it cannot do to the machine.

Runs are real subprocesses, so every test here exercises this machine's kernel: whether the network is
cut off and whether the process limit binds are read from `network_isolation()` / `process_limit()`
and asserted either way. Programs that must be stopped get short timeouts; bounds on how long a run
may take are generous multiples of them.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nanochat_rs import execution
from nanochat_rs.execution import (
    CHILD_PATH,
    MAX_FILE_BYTES,
    MAX_OPEN_FILES,
    MAX_PROCESSES,
    MIN_MEMORY_BYTES,
    execute_code,
    network_isolation,
    process_limit,
)

PROMPTLY_S = 15.0  # a run that must not hang returns well within this, even on a loaded machine
# A fresh copy of the posix module has the original functions back: how code gets past the guard,
# to show that the kernel-level limits and the process-group kill hold on their own.
PAST_THE_GUARD = "import sys\ndel sys.modules['posix']\nimport posix\n"


def live_members(process_group: int) -> list[int]:
    """Processes of `process_group` that have not exited (zombies have)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _parent, group = (entry / "stat").read_text().rpartition(")")[2].split()[:3]
            except OSError:  # exited while we looked
                continue
            if int(group) == process_group and state != "Z":
                members.append(int(entry.name))
    return members


def wait_until_gone(process_group: int) -> list[int]:
    """The members still alive after SIGKILL had time to land (none, if the sandbox killed them)."""
    deadline = time.monotonic() + PROMPTLY_S
    while (alive := live_members(process_group)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_a_program_that_runs_to_its_end_succeeds_with_its_output() -> None:
    result = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warning', file=sys.stderr)")
    assert result.success and result.error is None
    assert (result.stdout, result.stderr) == ("hello 42\n", "warning\n")
    assert not (result.timed_out or result.memory_exceeded or result.output_truncated)


def test_an_exception_fails_with_its_traceback_in_stderr() -> None:
    result = execute_code("def divide(a, b):\n    return a / b\n\nprint('before')\ndivide(1, 0)\nprint('after')")
    assert not result.success and not result.timed_out
    assert result.stdout == "before\n"
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "in divide" in result.stderr and result.error == "ZeroDivisionError: division by zero"


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "exit()", "import os\nos._exit(0)"])
def test_a_program_that_exits_before_its_end_has_not_succeeded(code: str) -> None:
    result = execute_code(code + "\nprint('reached the end')")
    assert not result.success and "reached the end" not in result.stdout


def test_stdin_is_closed() -> None:
    result = execute_code("input()")
    assert not result.success and result.error == "EOFError: EOF when reading a line"


def test_the_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import json, os\nprint(json.dumps(dict(os.environ)))\nprint(os.getcwd())")
    assert result.success
    assert "NANOCHAT_TEST_SECRET" not in result.stdout and "hunter2" not in result.stdout
    environment, sandbox = json.loads(result.stdout.splitlines()[0]), result.stdout.splitlines()[1]
    assert environment["PATH"] == CHILD_PATH and environment["HOME"] == sandbox
    assert set(environment) <= {"PATH", "HOME", "TMPDIR", "TMP", "LANG"}


def test_the_program_runs_under_rlimits() -> None:
    memory = 96 * 2**20
    result = execute_code("print(open('/proc/self/limits').read())", timeout=7.5, max_memory_bytes=memory)
    assert result.success
    soft_limits = {line[:26].strip(): line[26:47].strip() for line in result.stdout.splitlines()[1:] if line}
    assert soft_limits["Max address space"] == str(memory)
    assert soft_limits["Max cpu time"] == "9"  # the timeout rounded up, plus a second
    assert soft_limits["Max file size"] == str(MAX_FILE_BYTES)
    assert soft_limits["Max open files"] == str(MAX_OPEN_FILES)
    assert soft_limits["Max processes"] == str(MAX_PROCESSES)
    assert soft_limits["Max core file size"] == "0"


def test_an_infinite_loop_times_out() -> None:
    started = time.monotonic()
    result = execute_code("while True:\n    pass", timeout=0.5)
    assert time.monotonic() - started < PROMPTLY_S
    assert result.timed_out and not result.success and not result.memory_exceeded
    assert result.error == "timed out after 0.5 s"


def test_a_memory_bomb_fails_without_harming_the_parent() -> None:
    parent_limit = resource.getrlimit(resource.RLIMIT_AS)
    hoarder = "hoard = []\nwhile True:\n    hoard.append(bytearray(2**20))"
    result = execute_code(hoarder, max_memory_bytes=MIN_MEMORY_BYTES)
    assert not result.success and not result.timed_out
    assert result.memory_exceeded and "MemoryError" in result.stderr
    assert result.error == f"memory limit of {MIN_MEMORY_BYTES} bytes exceeded"
    assert resource.getrlimit(resource.RLIMIT_AS) == parent_limit  # the limit was set in the child only


def test_a_fork_bomb_is_refused_before_it_forks() -> None:
    result = execute_code("import os\nwhile True:\n    os.fork()", timeout=2)
    assert not result.success and not result.timed_out
    assert result.error == "PermissionError: os.fork is disabled in the code sandbox"
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=PROMPTLY_S).returncode == 0  # we still can


@pytest.mark.skipif(not process_limit()[0], reason=f"RLIMIT_NPROC does not bind here: {process_limit()[1]}")
def test_a_fork_bomb_past_the_guard_stops_at_the_process_limit_and_dies_with_the_run() -> None:
    bomb = PAST_THE_GUARD + "import os\nprint(os.getpgrp(), flush=True)\nwhile True:\n" \
                            "    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    result = execute_code(bomb, timeout=1.5)
    assert time.monotonic() - started < PROMPTLY_S
    assert result.timed_out and not result.success
    assert wait_until_gone(int(result.stdout.split()[0])) == []
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=PROMPTLY_S).returncode == 0


def test_processes_the_program_leaves_behind_are_killed_when_it_ends() -> None:
    code = PAST_THE_GUARD + "import os, time\nprint(os.getpgrp(), flush=True)\nif posix.fork() == 0:\n" \
                            "    time.sleep(60)\n"
    started = time.monotonic()
    result = execute_code(code, timeout=30)
    assert time.monotonic() - started < PROMPTLY_S  # the sleeping child holds stdout: it was not waited for
    assert result.success
    assert wait_until_gone(int(result.stdout.split()[0])) == []


@pytest.mark.parametrize("attack", [
    pytest.param("open(VICTIM, 'w').write('overwritten')", id="open-w"),
    pytest.param("open(VICTIM, 'a').write('appended')", id="open-a"),
    pytest.param("import pathlib\npathlib.Path(VICTIM).write_text('overwritten')", id="pathlib-write_text"),
    pytest.param("import os\nos.remove(VICTIM)", id="os.remove"),
    pytest.param("import os\nos.unlink(VICTIM)", id="os.unlink"),
    pytest.param("import os\nos.truncate(VICTIM, 0)", id="os.truncate"),
    pytest.param("import os\nos.chmod(VICTIM, 0)", id="os.chmod"),
    pytest.param("import os\nos.rename(VICTIM, 'stolen.txt')", id="os.rename"),
    pytest.param("import os\nos.symlink(VICTIM, 'link')\nopen('link', 'w').write('x')", id="through-a-symlink"),
    pytest.param("import os\nos.open(os.path.join(os.path.dirname(VICTIM), 'new.txt'), os.O_CREAT | os.O_WRONLY)",
                 id="os.open-create"),
    pytest.param("import os, shutil\nshutil.rmtree(os.path.dirname(VICTIM))", id="shutil.rmtree"),
])
def test_files_outside_the_sandbox_cannot_be_written_or_removed(attack: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    result = execute_code(f"VICTIM = {str(victim)!r}\n{attack}")
    assert not result.success and result.error is not None and result.error.startswith("PermissionError")
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [victim]


def test_files_inside_the_sandbox_can_be_written_and_removed() -> None:
    code = """
import os, pathlib, shutil, tempfile
pathlib.Path('notes.txt').write_text('kept for a moment')
os.rename('notes.txt', 'renamed.txt')
os.remove('renamed.txt')
os.makedirs('a/b')
open('a/b/c.txt', 'w').write('x')
shutil.rmtree('a')
with tempfile.NamedTemporaryFile() as scratch:
    scratch.write(b'scratch')
print(sorted(os.listdir('.')))
"""
    result = execute_code(code)
    assert result.success, result.stderr
    assert result.stdout == f"[{execution.PROGRAM_NAME!r}]\n"


@pytest.mark.parametrize("attack", [
    pytest.param("import os\nos.system('touch ' + MARKER)", id="os.system"),
    pytest.param("import os\nos.popen('touch ' + MARKER)", id="os.popen"),
    pytest.param("import os\nos.execv('/usr/bin/touch', ['touch', MARKER])", id="os.execv"),
    pytest.param("import subprocess\nsubprocess.run(['touch', MARKER])", id="subprocess.run"),
])
def test_shells_and_other_programs_cannot_be_started(attack: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    result = execute_code(f"MARKER = {str(marker)!r}\n{attack}")
    assert not result.success and not marker.exists()
    assert "disabled in the code sandbox" in result.stderr or "import of _posixsubprocess halted" in result.stderr


def test_other_processes_cannot_be_signalled() -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        result = execute_code(f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)")
        assert result.error == "PermissionError: os.kill is disabled in the code sandbox"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_sandbox_directory_is_removed_after_a_run_and_after_a_timeout() -> None:
    locked = "import os\nprint(os.getcwd(), flush=True)\nos.makedirs('a/b')\nopen('a/b/c', 'w').close()\n" \
             "os.chmod('a/b', 0)\nos.chmod('a', 0)\n"
    finished = execute_code(locked)
    timed_out = execute_code(locked + "while True:\n    pass", timeout=1)
    assert finished.success and timed_out.timed_out
    for result in (finished, timed_out):
        sandbox = Path(result.stdout.splitlines()[0])
        assert sandbox.name.startswith("nanochat-sandbox-") and not sandbox.exists()


def test_huge_output_is_cut_at_the_limit() -> None:
    result = execute_code("import sys\nsys.stdout.write('x' * 50_000_000)\nsys.stderr.write('y' * 10)",
                          max_output_bytes=1000)
    assert result.success and result.output_truncated
    assert (result.stdout, result.stderr) == ("x" * 1000, "y" * 10)


def test_endless_output_is_cut_and_stopped_by_the_timeout() -> None:
    started = time.monotonic()
    result = execute_code("while True:\n    print('spam' * 1000)", timeout=1, max_output_bytes=4096)
    assert time.monotonic() - started < PROMPTLY_S
    assert result.timed_out and result.output_truncated and len(result.stdout) == 4096


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def connect_to(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\nprint('connected')"


def test_the_network_is_unreachable_where_isolation_is_available(listening_port: int) -> None:
    available, reason = network_isolation()
    result = execute_code(connect_to(listening_port))
    assert result.network_isolated is available
    if available:
        assert not result.success and "connected" not in result.stdout
        assert result.error is not None and result.error.startswith("OSError")
    else:
        assert "NOT blocked" in reason
        assert result.success and result.stdout == "connected\n"  # reported, not hidden


@pytest.fixture
def without_util_linux(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The sandbox as it is where neither unshare nor setpriv exists (probed afresh, then forgotten)."""
    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    execution._launcher.cache_clear()
    yield
    execution._launcher.cache_clear()


def test_without_isolation_the_network_is_reported_reachable(listening_port: int, without_util_linux: None) -> None:
    available, reason = network_isolation()
    assert not available and "NOT blocked" in reason and "unshare" in reason
    result = execute_code(connect_to(listening_port))
    assert not result.network_isolated and result.success and result.stdout == "connected\n"
    assert process_limit()[0] is (os.geteuid() != 0)  # root without setpriv: the kernel ignores RLIMIT_NPROC


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"code": b"print(1)"}, TypeError, "code must be a str, got bytes"),
    ({"code": "print('\udc80')"}, ValueError, "code is not encodable as UTF-8"),
    ({"timeout": 0}, ValueError, "timeout must be > 0"),
    ({"timeout": -1.0}, ValueError, "timeout must be > 0"),
    ({"timeout": float("nan")}, ValueError, "timeout must be a finite number"),
    ({"timeout": float("inf")}, ValueError, "timeout must be a finite number"),
    ({"timeout": "5"}, TypeError, "timeout must be a number, got str"),
    ({"max_memory_bytes": MIN_MEMORY_BYTES - 1}, ValueError, f"max_memory_bytes must be >= {MIN_MEMORY_BYTES}"),
    ({"max_memory_bytes": 2.0**30}, TypeError, "max_memory_bytes must be an int, got float"),
    ({"max_output_bytes": 0}, ValueError, "max_output_bytes must be >= 1"),
    ({"max_output_bytes": True}, TypeError, "max_output_bytes must be an int, got bool"),
])
def test_bad_arguments_raise_one_clear_error(arguments: dict[str, object], error: type[Exception],
                                             message: str) -> None:
    with pytest.raises(error, match=message):
        execute_code(**{"code": "print(1)", **arguments})  # type: ignore[arg-type]
