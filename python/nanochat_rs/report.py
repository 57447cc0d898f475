"""The run's report card: every job stage records a section, `nanochat-report` renders them as report.md.

    nanochat-report reset                    # a new run: drop the old sections, record the environment
    nanochat-report [generate]               # write $NANOCHAT_BASE_DIR/report/report.md from the sections
    nanochat-report --hourly-cost 24         # ... with a cost estimate (or NANOCHAT_HOURLY_COST=24)

A job records its stage with `append_section(stage, data)`: one JSON file per stage,
`$NANOCHAT_BASE_DIR/report/<stage>.json` = {"stage", "timestamp", "data"}, replaced atomically (a stage
run twice keeps its latest run). Only rank 0 writes under torchrun. Everything in `data` appears in the
report under its stage; the summary table reads these keys (missing stages, keys and None show as "-"):

    stage           keys the summary reads
    tokenizer       wall_time_s
    tokenizer-eval  wall_time_s                                (nanochat-tok-eval records it itself)
    base-train      final_val_bpb, tokens_trained, wall_time_s  (the summary pretraining returns)
    base-eval       core, val_bpb, wall_time_s                 (val_bpb replaces base-train's final_val_bpb)
    sft             final_val_bpb, accuracy, tokens_trained, wall_time_s  (the summary fine-tuning returns)
    chat-eval       accuracy, chatcore, wall_time_s            (its accuracies replace sft's, task by task)

Values are numbers; `accuracy` maps task names (as in `nanochat_rs.tasks.registry`) to fractions in [0, 1].
The table has a BASE column (base-train, base-eval) and an SFT column (sft, chat-eval); its rows are val bpb,
CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, ChatCORE, then any other task with an accuracy (the
synthetic ones: arithmetic, letter-count, ...), tokens trained and wall time. Below it: the total wall time
of all stages and, given an hourly price, the cost estimate.

`common` (which imports torch) is imported inside the functions that need it, and torch only for the
environment header, so that `--help` stays fast: the report itself is plain JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from nanochat_rs import __version__, cli
from nanochat_rs.util import atomic_write, check_number, read_json, remove_stale_temp_files

__all__ = ["HEADER_STAGE", "HOURLY_COST_ENV", "REPORT_FILE", "STAGES", "Section", "append_section", "environment",
           "generate", "hourly_cost_from_env", "main", "read_sections", "render", "report_dir", "reset",
           "summary_table"]

STAGES = ("tokenizer", "tokenizer-eval", "base-train", "base-eval", "sft", "chat-eval")
"""The stages of a run in the order the report shows them; other stage names follow, alphabetically."""

HEADER_STAGE = "header"  # written by reset(): the environment of the run
REPORT_FILE = "report.md"
HOURLY_COST_ENV = "NANOCHAT_HOURLY_COST"
SECTION_SUFFIX = ".json"
_STAGE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")  # it names a file: no paths, no surprises

HEADLINE_TASKS = {"arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge", "mmlu": "MMLU", "gsm8k": "GSM8K",
                  "humaneval": "HumanEval"}
"""Task name -> its row in the summary table, in the table's order."""

BASE_STAGES = ("base-train", "base-eval")
SFT_STAGES = ("sft", "chat-eval")


@dataclass(frozen=True)
class Section:
    path: Path
    stage: str
    timestamp: str
    data: dict[str, Any]


def report_dir() -> Path:
    """`$NANOCHAT_BASE_DIR/report`, created when missing."""
    from nanochat_rs.common import base_dir

    directory = base_dir() / "report"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _to_json(value: object) -> object:
    """Values json cannot store as they are: paths, and numpy / torch scalars (they have `.item()`)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a report section: pass numbers, strings, "
                    "lists and dicts")


def _write_section(stage: str, data: Mapping[str, Any]) -> Path:
    if not isinstance(data, Mapping):
        raise TypeError(f"report section data must be a mapping, got {type(data).__name__}")
    text = json.dumps({"stage": stage, "timestamp": _now(), "data": dict(data)}, indent=2, default=_to_json)
    path = report_dir() / f"{stage}{SECTION_SUFFIX}"
    atomic_write(path, lambda f: f.write(text + "\n"), mode="w")
    return path


def append_section(stage: str, data: Mapping[str, Any]) -> Path | None:
    """Record `stage`'s config, metrics and timings (see the module docstring for the keys the summary
    reads); replaces an earlier section of the same stage. Returns the file, or None on ranks other than 0."""
    from nanochat_rs.common import get_dist_info

    if not isinstance(stage, str):
        raise TypeError(f"report stage must be a str, got {type(stage).__name__}")
    if not _STAGE_NAME.fullmatch(stage) or stage == HEADER_STAGE:
        raise ValueError(f"report stage must be lowercase letters, digits and '-' (e.g. {', '.join(STAGES)}) "
                         f"and not {HEADER_STAGE!r}, got {stage!r}")
    if get_dist_info().rank != 0:
        return None
    return _write_section(stage, data)


def _git_state(directory: Path) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the checkout holding `directory`; (None, None) outside one."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):  # no git on this machine, or a stuck file system
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if changes is None else bool(changes)


def environment() -> dict[str, Any]:
    """What the run ran on: code version, machine, accelerator and library versions."""
    import torch

    commit, dirty = _git_state(Path(__file__).resolve().parent)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"nanochat_rs": __version__, "git_commit": commit, "git_dirty": dirty,
            "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpu_count": gpus, "torch": torch.__version__}


def reset() -> Path:
    """Start a new run's report: remove the sections and report.md of the last one, record the environment."""
    directory = report_dir()
    remove_stale_temp_files(directory)  # reset starts a run: no job is writing sections now
    for path in directory.glob(f"*{SECTION_SUFFIX}"):
        path.unlink()
    (directory / REPORT_FILE).unlink(missing_ok=True)
    return _write_section(HEADER_STAGE, environment())


# ---- reading -----------------------------------------------------------------------------------


def _read_section(path: Path) -> Section:
    content = read_json(path, "report section")
    if (not isinstance(content, dict) or content.get("stage") != path.stem
            or not isinstance(content.get("timestamp"), str) or not isinstance(content.get("data"), dict)):
        raise ValueError(f"{path} is not a report section: expected a JSON object with \"stage\": "
                         f"\"{path.stem}\", a \"timestamp\" string and a \"data\" object")
    return Section(path, path.stem, content["timestamp"], content["data"])


def read_sections(directory: Path | None = None) -> dict[str, Section]:
    """The recorded sections by stage: the header first, then `STAGES` in order, then others by name.
    ValueError naming the file for one that is not a section."""
    directory = directory or report_dir()
    order = {stage: rank for rank, stage in enumerate((HEADER_STAGE, *STAGES))}
    paths = sorted(directory.glob(f"*{SECTION_SUFFIX}"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    return {section.stage: section for section in map(_read_section, paths)}


# ---- rendering ---------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(section: Section | None, key: str) -> float | None:
    if section is None:
        return None
    value = section.data.get(key)
    if value is not None and not _is_number(value):
        raise ValueError(f"{section.path}: {key!r} must be a number, got {value!r}")
    return value


def _accuracy(section: Section | None) -> dict[str, float]:
    """The section's task accuracies; tasks recorded as None (not measured) are left out."""
    if section is None:
        return {}
    accuracy = section.data.get("accuracy") or {}
    if not isinstance(accuracy, dict) or not all(v is None or _is_number(v) for v in accuracy.values()):
        raise ValueError(f"{section.path}: 'accuracy' must map task names to numbers, got {accuracy!r}")
    return {task: value for task, value in accuracy.items() if value is not None}


def _total(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def summary_table(sections: Mapping[str, Section]) -> list[tuple[str, str, str]]:
    """(row, BASE, SFT) cells of the summary; see the module docstring for where each comes from."""
    base_train, base_eval, sft, chat_eval = (sections.get(s) for s in (*BASE_STAGES, *SFT_STAGES))
    base_bpb = _number(base_eval, "val_bpb")
    base_bpb = _number(base_train, "final_val_bpb") if base_bpb is None else base_bpb
    sft_accuracy = {**_accuracy(sft), **_accuracy(chat_eval)}
    rows = [("val bpb", _metric(base_bpb), _metric(_number(sft, "final_val_bpb"))),
            ("CORE", _metric(_number(base_eval, "core")), "-")]
    rows += [(label, "-", _metric(sft_accuracy.get(task))) for task, label in HEADLINE_TASKS.items()]
    rows.append(("ChatCORE", "-", _metric(_number(chat_eval, "chatcore"))))
    rows += [(task, "-", _metric(sft_accuracy[task])) for task in sorted(sft_accuracy) if task not in HEADLINE_TASKS]
    rows.append(("tokens trained", _count(_number(base_train, "tokens_trained")),
                 _count(_number(sft, "tokens_trained"))))
    rows.append(("wall time", *(_duration(_total([_number(sections.get(s), "wall_time_s") for s in stages]))
                                for stages in (BASE_STAGES, SFT_STAGES))))
    return rows


def _markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]


def _value_lines(data: Mapping[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}- {key}:")
            lines += _value_lines(value, indent + "  ")
        elif isinstance(value, float):
            lines.append(f"{indent}- {key}: {value:.6g}")
        elif isinstance(value, int) and not isinstance(value, bool):
            lines.append(f"{indent}- {key}: {value:,}")
        elif value is None:
            lines.append(f"{indent}- {key}: -")
        else:
            lines.append(f"{indent}- {key}: {value if isinstance(value, str) else json.dumps(value)}")
    return lines


def render(sections: Mapping[str, Section], hourly_cost: float | None = None) -> str:
    """The report card in markdown: environment, summary table, total wall time and cost, then every stage."""
    out = ["# nanochat_rs report card", "", f"Generated: {_now()}", "", "## Environment", ""]
    header = sections.get(HEADER_STAGE)
    if header is None:
        out.append("No environment recorded: run `nanochat-report reset` when a run starts.")
    else:
        out += [f"Run started: {header.timestamp}", "", *_value_lines(header.data)]
    out += ["", "## Summary", "", *_markdown_table(("Metric", "BASE", "SFT"), summary_table(sections)), ""]
    total_s = _total([_number(s, "wall_time_s") for stage, s in sections.items() if stage != HEADER_STAGE])
    out.append(f"Total wall time: {_duration(total_s)} (the stages' wall_time_s added up)")
    if hourly_cost is not None and total_s is not None:
        hours = total_s / 3600
        out.append(f"Estimated cost: ${hours * hourly_cost:,.2f} ({hours:.2f} h at ${hourly_cost:,.2f}/h)")
    for stage, section in sections.items():
        if stage != HEADER_STAGE:
            out += ["", f"## {stage}", "", f"timestamp: {section.timestamp}", "", *_value_lines(section.data)]
    return "\n".join(out) + "\n"


def hourly_cost_from_env() -> float | None:
    """The price per hour in NANOCHAT_HOURLY_COST; None when unset."""
    text = os.environ.get(HOURLY_COST_ENV)
    if not text:
        return None
    try:
        return check_number(HOURLY_COST_ENV, float(text), minimum=0.0)
    except ValueError:
        raise ValueError(f"{HOURLY_COST_ENV}={text!r} is not a price per hour (a number >= 0)") from None


def generate(hourly_cost: float | None = None) -> Path:
    """Write report.md beside the sections (atomically) and return its path."""
    directory = report_dir()
    text = render(read_sections(directory), hourly_cost)
    path = directory / REPORT_FILE
    atomic_write(path, lambda f: f.write(text), mode="w")
    return path


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("generate", "reset"), default="generate",
                        help="generate report.md (default), or reset for a new run")
    parser.add_argument("--hourly-cost", type=float, default=None,
                        help=f"price of the machine per hour, for the cost estimate (default: ${HOURLY_COST_ENV}, "
                             "else no estimate)")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "reset":
        print(f"new report: environment recorded in {reset()}")
        return
    if args.hourly_cost is None:
        hourly_cost = hourly_cost_from_env()
    else:
        hourly_cost = cli.usage_checked(lambda: check_number("--hourly-cost", args.hourly_cost, minimum=0.0))
    print(f"report written to {generate(hourly_cost)}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.run_job(lambda: _run(args))


if __name__ == "__main__":
    main()
