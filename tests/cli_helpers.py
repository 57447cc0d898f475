"""Running a job's `main(argv)` in-process, as the CLI tests of several jobs do."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def run_main(main: Callable[[list[str]], None], argv: list[str],
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main(argv)`."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The one line a job prints for an error (asserted to be one line starting with 'error: ')."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
