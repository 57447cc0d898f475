"""Small helpers several modules share; deliberately free of torch so the tokenizer and packer stay light."""

from __future__ import annotations

import operator
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "check_int"]


def check_int(name: str, value: object, minimum: int) -> int:
    """`value` as an int >= minimum (numpy integers accepted); TypeError for non-ints and bools."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def atomic_write(path: Path, write: Callable[[IO[Any]], object], mode: str = "wb") -> None:
    """Write a file so that readers see either the old content or the whole new one, never a torn file:
    a temp file in the same directory, fsynced, then renamed over `path`."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
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
