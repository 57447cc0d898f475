"""Spec for util.py: atomic file replacement and integer argument checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from nanochat_rs.util import atomic_write, check_int


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    target.write_text("old")
    atomic_write(target, lambda f: f.write("new content"), mode="w")
    assert target.read_text() == "new content"
    atomic_write(target, lambda f: f.write(b"\x00\x01"))
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def explode(f: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_written_files_get_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "shared.json", lambda f: f.write("{}"), mode="w")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644


def test_check_int() -> None:
    assert check_int("n", 3, 1) == 3
    assert check_int("n", np.int64(0), 0) == 0
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int("n", 0, 1)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad, 0)
