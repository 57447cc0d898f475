"""The tokenizer-training job: `nanochat-tok-train` / `python -m nanochat_rs.tok_train`, and the
load-or-train path that jobs use when no tokenizer exists yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nanochat_rs import tok_train
from nanochat_rs.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parents[1]
SMALL_VOCAB = 256 + len(SPECIAL_TOKENS) + 30


def write_shards(directory: Path, columns: list[pa.Array]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, column in enumerate(columns):
        pq.write_table(pa.table({"text": column}), directory / f"shard_{i:05d}.parquet")
    return directory


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        tok_train.main(argv)
    return int(exit_info.value.code or 0), capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *, codes: tuple[int, ...] = (1, 2)) -> str:
    assert code in codes
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "scripts/" not in err
    return lines[0]


@pytest.mark.parametrize("make_dir", [lambda p: p / "missing", lambda p: (p / "empty").mkdir() or p / "empty"])
def test_missing_or_empty_data_dir_is_one_line(tmp_path: Path, capsys, make_dir) -> None:
    code, err = run_main(["--data-dir", str(make_dir(tmp_path)), "--output-dir", str(tmp_path / "tok")], capsys)
    assert "shard_NNNNN.parquet" in assert_one_line_error(code, err)


def test_a_text_column_of_non_strings_is_one_line(tmp_path: Path, capsys) -> None:
    data = write_shards(tmp_path / "data", [pa.array([1, 2, 3]), pa.array([4, 5])])
    code, err = run_main(["--data-dir", str(data), "--output-dir", str(tmp_path / "tok")], capsys)
    line = assert_one_line_error(code, err)
    assert "shard_00000.parquet" in line and "int64" in line
    with pytest.raises(ValueError, match="must hold strings"):
        next(tok_train.iter_text_columns(sorted(data.iterdir())))


def test_bad_flag_values_are_usage_errors(tmp_path: Path, capsys) -> None:
    code, err = run_main(["--vocab-size", "10", "--output-dir", str(tmp_path / "tok")], capsys)
    assert "--vocab-size" in assert_one_line_error(code, err, codes=(2,))
    code, err = run_main(["--doc-cap", "0", "--output-dir", str(tmp_path / "tok")], capsys)
    assert "--doc-cap" in assert_one_line_error(code, err, codes=(2,))


def test_the_job_runs_as_a_module_and_saves_a_loadable_tokenizer(tmp_path: Path) -> None:
    docs = ["the quick brown fox jumps over the lazy dog"] * 40
    data = write_shards(tmp_path / "data", [pa.array(docs), pa.array(docs[:5])])
    out = tmp_path / "tok"
    result = subprocess.run([sys.executable, "-m", "nanochat_rs.tok_train", "--data-dir", str(data),
                             "--output-dir", str(out), "--vocab-size", str(SMALL_VOCAB)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"saved to:     {out}" in result.stdout
    assert Tokenizer.load(out).vocab_size == SMALL_VOCAB


def test_the_script_is_a_wrapper_of_the_module() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "tok_train.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "nanochat-tok-train" in result.stdout


def test_load_or_train_trains_once_on_the_embedded_corpus(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "tok"
    trained = tok_train.load_or_train_tokenizer(directory, vocab_size=SMALL_VOCAB)
    assert trained.vocab_size == SMALL_VOCAB and "embedded corpus" in capsys.readouterr().out
    loaded = tok_train.load_or_train_tokenizer(directory, vocab_size=SMALL_VOCAB + 1)  # exists: not retrained
    assert loaded.mergeable_ranks() == trained.mergeable_ranks() and capsys.readouterr().out == ""
