"""Spec for common.py's configuration from the environment: NANOCHAT_DTYPE and NANOCHAT_BASE_DIR.

A bad value must be reported where it is used, in one line that names the variable, never as a
crash of `import nanochat_rs.<anything>`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nanochat_rs import common
from nanochat_rs.common import base_dir, compute_dtype


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, check=False)


def test_a_bogus_dtype_fails_at_use_not_at_import() -> None:
    result = python("import nanochat_rs.gpt, nanochat_rs.engine, nanochat_rs.audio\n"
                    "print('imported', flush=True)\n"
                    "from nanochat_rs.common import compute_init\n"
                    "compute_init('cpu')", NANOCHAT_DTYPE="bogus")
    assert result.stdout == "imported\n", result.stderr
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == ("ValueError: NANOCHAT_DTYPE='bogus' is not one of "
                         "['bf16', 'bfloat16', 'float16', 'float32', 'fp16', 'fp32']")


def test_a_valid_dtype_override_is_what_every_module_sees() -> None:
    result = python("from nanochat_rs import common, kv_cache\n"
                    "from nanochat_rs.audio import Projector\n"
                    "import torch\n"
                    "cache = kv_cache.KVCache(1, 1, 2, 2, 1, 'cpu')\n"
                    "out = Projector(2, 4, stack=1)(torch.ones(1, 1, 2))\n"
                    "print(common.COMPUTE_DTYPE, common.compute_dtype(), cache.dtype, out.dtype)",
                    NANOCHAT_DTYPE=" FP16 ")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch.float16"] * 4


def test_compute_dtype_follows_the_module_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compute_dtype() == common.COMPUTE_DTYPE
    monkeypatch.setattr(common, "COMPUTE_DTYPE", torch.float16)  # how tests pick another dtype
    assert compute_dtype() == torch.float16


def test_base_dir_is_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "a" / "b"))
    assert base_dir() == tmp_path / "a" / "b" and base_dir().is_dir()


@pytest.mark.parametrize("where", ["the file", "below the file"])
def test_a_base_dir_that_cannot_be_a_directory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 where: str) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    configured = a_file if where == "the file" else a_file / "nanochat"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(configured))
    with pytest.raises(OSError, match=f"NANOCHAT_BASE_DIR={configured} is not a usable directory") as info:
        base_dir()
    assert "\n" not in str(info.value)
    assert info.value.filename is None  # so cli.run_job prints this message, not just strerror: filename
