"""One error policy for every command-line job (`nanochat-<job>` / `python -m nanochat_rs.<job>`).

A job's `main()` parses its arguments and calls `run_job(work)`. Problems with the user's input or
machine end in one line on stderr that says what to do, never a traceback from deep inside:

    exit 2  usage errors: a bad flag value (argparse itself also exits 2), `UsageError`
    exit 1  failures: bad or missing files, an unavailable device, a failed download, a full disk
    exit 130 Ctrl-C (the shell's code for SIGINT), without a traceback

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

__all__ = ["DEVICE_TYPES", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "UsageError", "add_device_arg", "fail",
           "restore_sigint", "run_job", "usage_checked"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
DEVICE_TYPES = ("cuda", "cpu", "mps")

T = TypeVar("T")


class UsageError(ValueError):
    """The command line asks for something impossible (exit code 2)."""


def usage_checked(check: Callable[[], T]) -> T:
    """`check()`, its ValueError a UsageError: jobs validate options this way before any slow work, so an
    impossible combination of flags exits 2 with one line."""
    try:
        return check()
    except ValueError as e:
        raise UsageError(str(e)) from None


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-type", choices=DEVICE_TYPES, default=None, help="default: autodetect")


def restore_sigint() -> None:
    """Make Ctrl-C raise KeyboardInterrupt even when the job was started with SIGINT ignored.

    A shell starts background jobs (`cmd &`) with SIGINT ignored and Python then installs no handler,
    so the job could not be interrupted by a signal it is later sent on purpose.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_job(work: Callable[[], T]) -> T:
    """Run a job's body under the error policy of this module."""
    from nanochat_rs.errors import PROJECT_ERRORS  # the project's own error types, one list

    restore_sigint()
    try:
        return work()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except UsageError as e:
        fail(str(e), EXIT_USAGE)
    except PROJECT_ERRORS as e:
        fail(_one_line(e))


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, OSError) and error.strerror:
        # "[Errno 28] No space left on device: '/x'" -> the part a user reads, with the path
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return text or type(error).__name__
