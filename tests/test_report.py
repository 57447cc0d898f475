"""The report card: sections that jobs record with `report.append_section`, and `nanochat-report` /
`python -m nanochat_rs.report` that renders them as report.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error, run_main
from nanochat_rs import report


@pytest.fixture
def report_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv(report.HOURLY_COST_ENV, raising=False)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "base" / "report"


def summary(report_md: Path) -> dict[str, tuple[str, str]]:
    """The summary table of report.md: row -> (BASE, SFT)."""
    lines = report_md.read_text().split("## Summary", 1)[1].strip().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert cells[0] == ["Metric", "BASE", "SFT"]
    return {row[0]: (row[1], row[2]) for row in cells[2:]}


def record_full_run() -> None:
    report.append_section("tokenizer", {"vocab_size": 32768, "wall_time_s": 60.0})
    report.append_section("base-train", {"final_val_bpb": 0.81234, "tokens_trained": 1_000_000, "wall_time_s": 3000.0,
                                         "config": {"depth": 20}})
    report.append_section("base-eval", {"core": 0.2, "val_bpb": 0.8, "wall_time_s": 540.0})
    report.append_section("sft", {"final_val_bpb": 0.5, "tokens_trained": 20_000, "wall_time_s": 600.0,
                                  "accuracy": {"arithmetic": 0.9, "gsm8k": 0.01}})
    report.append_section("chat-eval", {"accuracy": {"arc-easy": 0.4, "gsm8k": 0.05, "letter-count": 0.3},
                                        "chatcore": 0.1, "wall_time_s": 1200.0})


def test_a_section_is_one_json_file_per_stage_read_back_as_recorded(report_dir: Path) -> None:
    path = report.append_section("base-train", {"final_val_bpb": np.float32(0.5), "checkpoint": Path("/ckpt"),
                                                "config": {"depth": 4}})
    assert path == report_dir / "base-train.json"
    content = json.loads(path.read_text())
    assert content["stage"] == "base-train" and content["timestamp"]
    assert content["data"] == {"final_val_bpb": 0.5, "checkpoint": "/ckpt", "config": {"depth": 4}}
    report.append_section("base-train", {"final_val_bpb": 0.25})  # a rerun replaces the section
    assert report.read_sections()["base-train"].data == {"final_val_bpb": 0.25}


def test_a_section_write_that_fails_midway_keeps_the_previous_one(report_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    report.append_section("sft", {"final_val_bpb": 0.5})

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        report.append_section("sft", {"final_val_bpb": 0.4})
    assert sorted(p.name for p in report_dir.iterdir()) == ["sft.json"]
    assert report.read_sections()["sft"].data == {"final_val_bpb": 0.5}


def test_bad_stage_names_and_data_are_refused(report_dir: Path) -> None:
    for stage in ("../escape", "Base Train", "sft\n", "", report.HEADER_STAGE):
        with pytest.raises(ValueError, match="report stage"):
            report.append_section(stage, {})
    with pytest.raises(TypeError, match="cannot store a object"):
        report.append_section("sft", {"model": object()})
    with pytest.raises(TypeError, match="mapping"):
        report.append_section("sft", [1, 2])  # type: ignore[arg-type]


def test_only_rank_zero_records(report_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report.append_section("base-train", {"final_val_bpb": 0.5}) is None
    assert not list(report_dir.glob("*.json"))


def test_the_summary_table_reads_each_stage(report_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record_full_run()
    code, out, err = run_main(report.main, [], capsys)
    assert code == 0, err
    assert f"report written to {report_dir / report.REPORT_FILE}" in out
    assert summary(report_dir / report.REPORT_FILE) == {
        "val bpb": ("0.8000", "0.5000"),  # base-eval's val_bpb wins over base-train's final_val_bpb
        "CORE": ("0.2000", "-"),
        "ARC-Easy": ("-", "0.4000"),
        "ARC-Challenge": ("-", "-"),
        "MMLU": ("-", "-"),
        "GSM8K": ("-", "0.0500"),  # chat-eval's accuracy wins over sft's
        "HumanEval": ("-", "-"),
        "ChatCORE": ("-", "0.1000"),
        "arithmetic": ("-", "0.9000"),
        "letter-count": ("-", "0.3000"),
        "tokens trained": ("1,000,000", "20,000"),
        "wall time": ("59m00s", "30m00s"),
    }
    text = (report_dir / report.REPORT_FILE).read_text()
    assert "Total wall time: 1h30m" in text and "Estimated cost" not in text
    for stage in ("tokenizer", "base-train", "base-eval", "sft", "chat-eval"):
        assert f"\n## {stage}\n" in text
    assert "  - depth: 20" in text  # a stage's config is shown in its section


def test_missing_stages_and_keys_show_as_dashes(report_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report.append_section("base-train", {"final_val_bpb": None, "tokens_trained": 512})
    code, _, err = run_main(report.main, ["generate"], capsys)
    assert code == 0, err
    table = summary(report_dir / report.REPORT_FILE)
    assert table["tokens trained"] == ("512", "-")
    assert all(cells == ("-", "-") for row, cells in table.items() if row != "tokens trained")
    text = (report_dir / report.REPORT_FILE).read_text()
    assert "Total wall time: -" in text and "nanochat-report reset" in text  # no header was recorded


def test_the_cost_is_wall_time_times_the_hourly_price(report_dir: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    report.append_section("base-train", {"wall_time_s": 5400.0})
    run_main(report.main, ["--hourly-cost", "10"], capsys)
    assert "Estimated cost: $15.00 (1.50 h at $10.00/h)" in (report_dir / report.REPORT_FILE).read_text()
    monkeypatch.setenv(report.HOURLY_COST_ENV, "2")
    run_main(report.main, [], capsys)
    assert "Estimated cost: $3.00 (1.50 h at $2.00/h)" in (report_dir / report.REPORT_FILE).read_text()


def test_bad_hourly_prices_are_one_line(report_dir: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_main(report.main, ["--hourly-cost", "-1"], capsys)
    assert code == 2 and "--hourly-cost" in one_line_error(err)
    monkeypatch.setenv(report.HOURLY_COST_ENV, "cheap")
    code, _, err = run_main(report.main, [], capsys)
    assert code == 1 and report.HOURLY_COST_ENV in one_line_error(err)


def test_reset_starts_a_new_report_with_the_environment(report_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record_full_run()
    run_main(report.main, [], capsys)
    code, out, err = run_main(report.main, ["reset"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in report_dir.iterdir()) == ["header.json"]
    header = report.read_sections()[report.HEADER_STAGE]
    assert {"nanochat_rs", "git_commit", "platform", "python", "cpu_count", "gpu", "torch"} <= set(header.data)
    assert header.data["cpu_count"] == os.cpu_count()
    run_main(report.main, [], capsys)
    text = (report_dir / report.REPORT_FILE).read_text()
    assert f"Run started: {header.timestamp}" in text and f"- torch: {header.data['torch']}" in text


@pytest.mark.parametrize("content", ["{ not json", '["a list"]', '{"stage": "sft", "timestamp": "t", "data": 3}',
                                     '{"stage": "sft", "timestamp": "t", "data": {"final_val_bpb": "low"}}',
                                     '{"stage": "sft", "timestamp": "t", "data": {"accuracy": [0.5]}}'])
def test_a_malformed_section_is_one_line_naming_the_file(report_dir: Path, capsys: pytest.CaptureFixture[str],
                                                        content: str) -> None:
    report_dir.mkdir(parents=True)
    (report_dir / "sft.json").write_text(content)
    code, _, err = run_main(report.main, [], capsys)
    assert code == 1 and str(report_dir / "sft.json") in one_line_error(err)
