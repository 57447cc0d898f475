"""Small helpers several modules share; deliberately free of torch so the tokenizer and packer stay light.

Validation policy for the whole package (one home): a wrong *type* raises TypeError, a wrong *value*
ValueError; `check_int` and `check_number` implement it, with the offending name in the message.
"""

from __future__ import annotations

import json
import math
import operator
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "check_int", "check_number", "read_json", "remove_stale_temp_files"]


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum] (numpy integers accepted); TypeError for non-ints and bools."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {number}")
    return number


def check_number(name: str, value: object, minimum: float = -math.inf, maximum: float = math.inf) -> float:
    """`value` as a finite float in [minimum, maximum]; TypeError for non-numbers and bools,
    ValueError for NaN, infinities and values out of range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(operator.index(value))  # type: ignore[arg-type]  # numpy integers
        except TypeError:
            if type(value).__module__ != "numpy" or not hasattr(value, "__float__"):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
            value = float(value)  # type: ignore[arg-type]  # numpy floats
    number = float(value)
    if not math.isfinite(number) or not minimum <= number <= maximum:
        raise ValueError(f"{name} must be a finite number in [{minimum}, {maximum}], got {value!r}")
    return number


def read_json(path: Path, what: str, error: type[ValueError] = ValueError) -> Any:
    """The JSON in `path`; a damaged file (bad JSON or bad UTF-8) is `error("corrupt <what> <path>: ...")`.
    A missing file stays a FileNotFoundError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"corrupt {what} {path}: {e}") from None


_TEMP_SUFFIX = ".tmp"


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files `atomic_write` leaves behind when its process is killed mid-write.

    Only call it where no other process is writing into `directory` at the same time.
    """
    removed = []
    for path in directory.glob(f".*{_TEMP_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: Path, write: Callable[[IO[Any]], object], mode: str = "wb") -> None:
    """Write a file so that readers see either the old content or the whole new one, never a torn file:
    a temp file in the same directory, fsynced, then renamed over `path`."""
    tmp = _temp_name(path)
    # os.open with 0o666 keeps the usual umask-derived permissions (mkstemp would make it 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
