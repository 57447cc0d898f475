"""The tokenizer-evaluation job: `nanochat-tok-eval` / `python -m nanochat_rs.tok_eval` (bytes per token of
ours beside tiktoken's GPT-2 and GPT-4 tokenizers, recorded in the report card)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from cli_helpers import one_line_error, run_main
from nanochat_rs import report, tok_eval
from nanochat_rs.tokenizer import DEFAULT_PATTERN, SPECIAL_TOKENS, Tokenizer

BYTES = [bytes([i]) for i in range(256)]
# Hand counts below: ours merges a+b then ab+c; the baseline only a+b. The default pattern splits
# "abc abc" into "abc" and " abc".
#   text      bytes  ours                    baseline
#   "abcab"     5    abc|ab          = 2     ab|c|ab            = 3
#   "abc abc"   7    abc| |abc       = 3     ab|c| |ab|c        = 5
#   "abcab abc" 9    abc|ab| |abc    = 4     ab|c|ab| |ab|c     = 6
VAL_DOCS = ["abcab", "abc abc"]


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer([*BYTES, b"ab", b"abc"])


def tiny_baseline() -> tiktoken.Encoding:
    return tiktoken.Encoding(name="tiny", pat_str=DEFAULT_PATTERN, mergeable_ranks={**{b: i for i, b in
                             enumerate(BYTES)}, b"ab": 256}, special_tokens={})


def write_shards(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": ["training text, never evaluated"]}), directory / "shard_00000.parquet")
    pq.write_table(pa.table({"text": VAL_DOCS}), directory / "shard_00001.parquet")
    return directory / "shard_00001.parquet"


@pytest.fixture
def base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken with an empty cache and every download refused by a dead proxy."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # nothing loaded earlier in this process


def test_bytes_per_token_matches_a_hand_count(tmp_path: Path) -> None:
    val_shard = write_shards(tmp_path / "data")
    result = tok_eval.evaluate_compression(tiny_tokenizer(), val_shard, {"tiny": "abcab abc"},
                                           {"baseline": tiny_baseline()}, max_docs=None)
    assert result["bytes_per_token"] == {
        tok_eval.VAL_TEXT: {"ours": pytest.approx(12 / 5), "baseline": pytest.approx(12 / 8)},
        "tiny": {"ours": pytest.approx(9 / 4), "baseline": pytest.approx(9 / 6)},
    }
    assert result["vocab_size"] == {"ours": 258 + len(SPECIAL_TOKENS), "baseline": 257}
    first_doc_only = tok_eval.evaluate_compression(tiny_tokenizer(), val_shard, {}, {}, max_docs=1)
    assert first_doc_only["bytes_per_token"] == {tok_eval.VAL_TEXT: {"ours": pytest.approx(5 / 2)}}


def test_the_table_shows_each_baseline_and_how_many_fewer_tokens_ours_needs(tmp_path: Path) -> None:
    result = tok_eval.evaluate_compression(tiny_tokenizer(), write_shards(tmp_path / "data"), {"tiny": "abcab abc"},
                                           {"baseline": tiny_baseline()}, max_docs=None)
    rows = [line.split() for line in tok_eval.format_table(result).splitlines()]
    assert rows[0] == ["text", "ours", "baseline", "vs", "baseline"]
    assert rows[1] == [tok_eval.VAL_TEXT, "2.40", "1.50", "+37.5%"]  # 5 tokens instead of 8
    assert rows[2] == ["tiny", "2.25", "1.50", "+33.3%"]  # 4 instead of 6
    assert rows[3] == ["vocab", "size", f"{258 + len(SPECIAL_TOKENS)}", "257"]


def test_the_package_ships_genre_samples_of_a_few_hundred_words() -> None:
    genres = tok_eval.load_genres()
    assert {"news", "python", "math", "german", "chat"} <= set(genres)
    assert all(200 <= len(text.split()) <= 1000 for text in genres.values())
    assert not genres["german"].isascii()


def test_offline_the_baselines_are_skipped_with_a_one_line_note(base_dir: Path, tmp_path: Path, offline: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    loaded, skipped = tok_eval.load_baselines(["gpt2"])
    assert loaded == {} and list(skipped) == ["gpt2"]

    tiny_tokenizer().save(base_dir / "tokenizer")
    write_shards(tmp_path / "data")
    code, out, err = run_main(tok_eval.main, ["--data-dir", str(tmp_path / "data")], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "gpt2, cl100k_base" in notes[0] and "TIKTOKEN_CACHE_DIR" in notes[0]
    assert any(line.split() == [tok_eval.VAL_TEXT, "2.40"] for line in out.splitlines())
    section = report.read_sections()[tok_eval.REPORT_STAGE]
    assert section.data["bytes_per_token"][tok_eval.VAL_TEXT] == {"ours": pytest.approx(12 / 5)}
    assert section.data["skipped_baselines"] == ["cl100k_base", "gpt2"]


def test_a_missing_tokenizer_is_one_line_that_says_how_to_train_one(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "nanochat_rs.tok_eval", "--tokenizer-dir", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    assert "nanochat-tok-train" in one_line_error(result.stderr) and "Traceback" not in result.stderr


def test_a_damaged_tokenizer_is_one_line_naming_its_file(base_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tiny_tokenizer().save(base_dir / "tokenizer")
    (directory / "tokenizer.json").write_text("{ not json")
    code, _, err = run_main(tok_eval.main, ["--baselines"], capsys)
    assert code == 1 and "tokenizer.json" in one_line_error(err)


@pytest.mark.parametrize(("argv", "flag"), [(["--max-docs", "0"], "--max-docs"),
                                            (["--baselines", "no-such-encoding"], "--baselines")])
def test_bad_options_are_usage_errors(base_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                      flag: str) -> None:
    code, _, err = run_main(tok_eval.main, argv, capsys)
    assert code == 2 and flag in one_line_error(err)
