"""CORE: the DCLM in-context-learning ensemble (arXiv 2406.11794) that nanochat reports for base models.

The bundle is a directory:

- `core.yaml`: key `icl_tasks`, a list of tasks with `label`, `icl_task_type` (multiple_choice, schema
  or language_modeling), `dataset_uri` (relative to `eval_data/`), `num_fewshot` (an int, or a list of
  which the first is used) and `continuation_delimiter` (default " ");
- `eval_data/**.jsonl`: one item per line. multiple_choice: `query`, `choices`, `gold`; schema:
  `context_options`, `continuation`, `gold`; language_modeling: `context`, `continuation`;
- `eval_meta_data.csv`: a row per task (`Eval Task` = label) with its `Random baseline` in percent.

Semantics follow nanochat's core_eval exactly: each task's items are shuffled once (seed 1337, so
`max_per_task` takes a mixed subset); item `idx` gets `num_fewshot` other items as examples, drawn with
`random.Random(1234 + idx)`; every prompt starts with BOS. A multiple-choice item renders one prompt per
choice and scores the tokens after the choices' common prefix; a schema item renders one per context
option and scores their common suffix; both pick the choice with the lowest mean loss over its span. A
language-modelling item is correct when the greedy argmax reproduces its continuation exactly. Prompts
longer than the model context lose tokens on the left. Per-task accuracy is centered against the random
baseline b (percent): (acc - b/100) / (1 - b/100); CORE is the mean centered accuracy.

Unlike nanochat, which runs one item per forward, `evaluate_task` packs the sequences of many items into
right-padded batches (the model is causal, so padding never changes a real position) and computes logits
only at the scored positions (`GPT.forward(logits_at=...)`). An item's sequences that begin alike (a
multiple-choice context, a schema item's few-shot examples) run that beginning once: a batch's items are
prefilled into a KV cache, whose rows are then copied out to each sequence, and the sequences continue from
there. `evaluate_task_reference` is the one-item-per-forward loop of the same math (full logits), kept as
the oracle and the benchmark baseline. Under torchrun rank r scores the items with `idx % world_size == r`
and the counts are all-reduced.

The bundle is downloaded once from `NANOCHAT_EVAL_BUNDLE_URL` (default: nanochat's public zip) into
`$NANOCHAT_BASE_DIR/eval_bundle/` with dataset.py's resumable transfer, under a file lock, and unpacked
atomically; a directory already there (e.g. unpacked by hand) is used as it is.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from filelock import FileLock

from nanochat_rs.common import base_dir, is_ddp_initialized, print0
from nanochat_rs.dataset import check_download_args, download_file
from nanochat_rs.errors import DownloadError
from nanochat_rs.kv_cache import KVCache
from nanochat_rs.tokenizer import Tokenizer

__all__ = [
    "BUNDLE_URL_ENV", "DEFAULT_BATCH_TOKENS", "DEFAULT_BUNDLE_URL", "TASK_TYPES", "CoreResult", "CoreTask",
    "centered_accuracy", "core_metric", "ensure_eval_bundle", "eval_bundle_dir", "eval_bundle_url",
    "evaluate_core", "evaluate_task", "evaluate_task_reference", "fewshot_indices", "load_bundle",
    "parse_yaml_subset", "render_prompts", "score_task", "score_task_reference",
]

BUNDLE_URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"
DEFAULT_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CONFIG_FILE = "core.yaml"
DATA_DIR = "eval_data"
META_FILE = "eval_meta_data.csv"
META_TASK_COLUMN = "Eval Task"
META_BASELINE_COLUMN = "Random baseline"
MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"
TASK_TYPES = (MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING)
DEFAULT_DELIMITER = " "
SHUFFLE_SEED = 1337  # nanochat's: items in this order, so a max_per_task subset is a mixed one
FEWSHOT_SEED = 1234  # item idx draws its examples with random.Random(FEWSHOT_SEED + idx)
FEWSHOT_SEPARATOR = "\n\n"  # ends every rendered few-shot example
DEFAULT_BATCH_TOKENS = 8192
"""Positions per batch, padding and KV-cached prefixes included (rows x longest row): bounds the activations and
the KV cache a batch holds."""
FORWARD_COST_TOKENS = 1024
"""What the batch planner charges one forward beyond its tokens, in tokens of work: it decides when sharing a
prefix pays for its extra forward and when a smaller batch pays for the padding it saves. Sized for a GPU, whose
kernel launches cost about this much; a CPU's forward costs less when it has its cores to itself (the plan
then pads a little more than it must) and far more when its threads wait on other processes."""

# What each task type's items must hold: (key, kind); "text" is a str (numbers are rendered as text,
# as nanochat's templates would), "texts" a list of at least two texts, "index" an int into that list.
_ITEM_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    MULTIPLE_CHOICE: (("query", "text"), ("choices", "texts"), ("gold", "index")),
    SCHEMA: (("context_options", "texts"), ("continuation", "text"), ("gold", "index")),
    LANGUAGE_MODELING: (("context", "text"), ("continuation", "text")),
}
_STAGING_PREFIX = ".eval_bundle-unpack-"


# ---- a reader for the YAML that core.yaml uses ---------------------------------------------------
# PyYAML is not a dependency. core.yaml needs block mappings and sequences (including "- key: v" items,
# a lone "-" and sequences at their key's indentation), [flow, sequences] of scalars, plain/quoted
# scalars and comments. Anything else (anchors, tags, block scalars, flow mappings, multi-line scalars)
# is a ValueError naming the line, never a silent misreading.


class _YamlLine(NamedTuple):
    number: int
    indent: int
    text: str


_YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f",
                 "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0",
                 "L": "\u2028", "P": "\u2029"}
_YAML_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_YAML_INT = re.compile(r"^[-+]?[0-9]+$")
_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_YAML_SPECIAL = {"null": None, "Null": None, "NULL": None, "~": None, "true": True, "True": True,
                 "TRUE": True, "false": False, "False": False, "FALSE": False}
_YAML_UNSUPPORTED_START = "{|>&*!%@`"


def _yaml_error(source: str, line: int, why: str) -> ValueError:
    return ValueError(f"{source} line {line}: {why} (only the YAML subset of a DCLM core.yaml is read: block "
                      "mappings and sequences, [flow, sequences] of scalars, plain or quoted scalars, comments)")


def _yaml_quoted(text: str, source: str, line: int) -> tuple[str, str]:
    """The quoted scalar that `text` starts with, and what follows its closing quote."""
    quote, out, i = text[0], [], 1
    while i < len(text):
        char = text[i]
        if quote == "'" and char == "'":
            if text[i + 1:i + 2] == "'":
                out.append("'")
                i += 2
                continue
            return "".join(out), text[i + 1:]
        if quote == '"' and char == '"':
            return "".join(out), text[i + 1:]
        if quote == '"' and char == "\\":
            code = text[i + 1:i + 2]
            if code in _YAML_ESCAPES:
                out.append(_YAML_ESCAPES[code])
                i += 2
                continue
            digits = _YAML_HEX_DIGITS.get(code, 0)
            hex_text = text[i + 2:i + 2 + digits]
            if not digits or len(hex_text) != digits or not all(c in "0123456789abcdefABCDEF" for c in hex_text):
                raise _yaml_error(source, line, f"unknown escape {text[i:i + 2 + digits]!r} in a quoted string")
            out.append(chr(int(hex_text, 16)))
            i += 2 + digits
            continue
        out.append(char)
        i += 1
    raise _yaml_error(source, line, "a quoted string is not closed on its line")


def _yaml_plain(text: str) -> Any:
    if text in _YAML_SPECIAL:
        return _YAML_SPECIAL[text]
    if _YAML_INT.match(text):
        return int(text)
    if _YAML_FLOAT.match(text):
        return float(text)
    return text


def _yaml_trailing(rest: str, source: str, line: int) -> None:
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise _yaml_error(source, line, f"unexpected text {rest!r} after a value")


def _yaml_flow_sequence(text: str, source: str, line: int) -> list[Any]:
    items: list[Any] = []
    rest = text[1:].lstrip()
    if rest.startswith("]"):
        _yaml_trailing(rest[1:], source, line)
        return items
    while True:
        if not rest:
            raise _yaml_error(source, line, "a [flow sequence] is not closed on its line")
        if rest[0] in "\"'":
            value, rest = _yaml_quoted(rest, source, line)
        elif rest[0] in "[" + _YAML_UNSUPPORTED_START:
            raise _yaml_error(source, line, "nested collections inside [ ] are not supported")
        else:
            end = min((rest.find(c) for c in ",]" if c in rest), default=len(rest))
            value, rest = _yaml_plain(rest[:end].strip()), rest[end:]
        items.append(value)
        rest = rest.lstrip()
        if not rest:
            raise _yaml_error(source, line, "a [flow sequence] is not closed on its line")
        if rest.startswith(","):
            rest = rest[1:].lstrip()
        elif rest.startswith("]"):
            _yaml_trailing(rest[1:], source, line)
            return items
        else:
            raise _yaml_error(source, line, "expected ',' or ']' in a [flow sequence]")


def _yaml_value(text: str, source: str, line: int) -> Any:
    """One inline value: a quoted or plain scalar, or a [flow sequence], with an optional comment."""
    if text[0] in "\"'":
        value, rest = _yaml_quoted(text, source, line)
        _yaml_trailing(rest, source, line)
        return value
    if text[0] == "[":
        return _yaml_flow_sequence(text, source, line)
    if text[0] in _YAML_UNSUPPORTED_START:
        raise _yaml_error(source, line, f"values starting with {text[0]!r} are not supported")
    comment = re.search(r"\s#", text)
    return _yaml_plain((text[:comment.start()] if comment else text).strip())


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _yaml_key(line: _YamlLine, source: str) -> tuple[str, str]:
    """(key, inline value text, possibly empty) of a `key: value` line."""
    match = re.match(r"^([^\s#'\"\[\]{}&*!|>%@`][^#]*?)\s*:(?:\s+(.*))?$", line.text)
    if match is None:
        raise _yaml_error(source, line.number, f"expected 'key: value', got {line.text!r}")
    value = (match.group(2) or "").strip()
    return match.group(1), "" if value.startswith("#") else value


def _yaml_node(lines: list[_YamlLine], i: int, source: str) -> tuple[Any, int]:
    if _is_item(lines[i].text):
        return _yaml_sequence(lines, i, source)
    return _yaml_mapping(lines, i, source)


def _yaml_nested(lines: list[_YamlLine], i: int, indent: int, source: str) -> tuple[Any, int]:
    """The block under the line before `i` (indented deeper than `indent`), or None when there is none."""
    if i < len(lines) and lines[i].indent > indent:
        return _yaml_node(lines, i, source)
    return None, i


def _yaml_sequence(lines: list[_YamlLine], i: int, source: str) -> tuple[list[Any], int]:
    indent, items = lines[i].indent, []
    while i < len(lines) and lines[i].indent == indent and _is_item(lines[i].text):
        line = lines[i]
        rest = line.text[1:].lstrip(" ")
        if not rest:
            value, i = _yaml_nested(lines, i + 1, indent, source)
        elif _is_item(rest) or _yaml_starts_mapping(rest):
            # "- key: v" opens a mapping (or "- - v" a sequence) whose column is where `rest` starts
            lines[i] = _YamlLine(line.number, indent + len(line.text) - len(rest), rest)
            value, i = _yaml_node(lines, i, source)
        else:
            value, i = _yaml_value(rest, source, line.number), i + 1
        items.append(value)
    return items, i


def _yaml_starts_mapping(text: str) -> bool:
    return text[0] not in "\"'[" and re.match(r"^[^#]*?:(\s|$)", text) is not None


def _yaml_mapping(lines: list[_YamlLine], i: int, source: str) -> tuple[dict[str, Any], int]:
    indent, mapping = lines[i].indent, {}
    while i < len(lines) and lines[i].indent == indent and not _is_item(lines[i].text):
        line = lines[i]
        key, text = _yaml_key(line, source)
        if key in mapping:
            raise _yaml_error(source, line.number, f"duplicate key {key!r}")
        if text:
            mapping[key], i = _yaml_value(text, source, line.number), i + 1
        elif i + 1 < len(lines) and lines[i + 1].indent == indent and _is_item(lines[i + 1].text):
            mapping[key], i = _yaml_sequence(lines, i + 1, source)  # a sequence at its key's indentation
        else:
            mapping[key], i = _yaml_nested(lines, i + 1, indent, source)
    return mapping, i


def parse_yaml_subset(text: str, source: str = "<yaml>") -> Any:
    """The document in `text`, for the YAML subset a DCLM `core.yaml` uses (see the section comment);
    a ValueError naming `source` and the line for anything outside it. An empty document is None."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#") or raw.rstrip() in ("---", "..."):
            continue
        body = raw.lstrip(" ")
        if body.startswith("\t"):
            raise _yaml_error(source, number, "tabs are not allowed in YAML indentation")
        lines.append(_YamlLine(number, len(raw) - len(body), body.rstrip()))
    if not lines:
        return None
    value, i = _yaml_node(lines, 0, source)
    if i < len(lines):
        raise _yaml_error(source, lines[i].number, f"unexpected indentation or structure at {lines[i].text!r}")
    return value


# ---- the bundle ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreTask:
    """One task, ready to evaluate: its items in evaluation order (few-shot indices refer to it)."""

    label: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent
    items: tuple[dict[str, Any], ...]


def _bundle_error(where: object, why: str) -> ValueError:
    return ValueError(f"bad CORE eval bundle: {where}: {why}")


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise _bundle_error(path.parent, f"{what} {path.name} is missing")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _bundle_error(path, f"not UTF-8 ({e})") from None


def _read_baselines(path: Path) -> dict[str, float]:
    rows = csv.DictReader(io.StringIO(_read_text(path, "the baselines table"), newline=""))
    missing = [c for c in (META_TASK_COLUMN, META_BASELINE_COLUMN) if c not in (rows.fieldnames or [])]
    if missing:
        raise _bundle_error(path, f"no column(s) {missing} (columns: {rows.fieldnames})")
    baselines = {}
    for row in rows:
        label, text = row[META_TASK_COLUMN], row[META_BASELINE_COLUMN]
        try:
            baseline = float(text)
        except (TypeError, ValueError):
            raise _bundle_error(path, f"row {label!r}: {META_BASELINE_COLUMN} {text!r} is not a number") from None
        if not 0 <= baseline < 100:
            raise _bundle_error(path, f"row {label!r}: {META_BASELINE_COLUMN} must be a percentage in [0, 100), "
                                      f"got {baseline}")
        baselines[label] = baseline
    return baselines


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _check_item(item: object, task_type: str, where: str) -> dict[str, Any]:
    """The item with its texts as str, or a ValueError saying which field is wrong."""
    if not isinstance(item, dict):
        raise _bundle_error(where, f"an item must be a JSON object, got {type(item).__name__}")
    checked = dict(item)
    for key, kind in _ITEM_FIELDS[task_type]:
        if key not in item:
            raise _bundle_error(where, f"a {task_type} item needs {key!r} (it has {sorted(item)})")
        value = item[key]
        if kind == "text":
            checked[key] = _as_text(value)
            if checked[key] is None:
                raise _bundle_error(where, f"{key!r} must be a string, got {type(value).__name__}")
        elif kind == "texts":
            texts = [_as_text(v) for v in value] if isinstance(value, list) else [None]
            if None in texts:
                raise _bundle_error(where, f"{key!r} must be a list of strings, got {value!r:.200}")
            if len(texts) < 2:
                raise _bundle_error(where, f"{key!r} must offer at least 2 options, got {len(texts)}")
            checked[key] = texts
        else:
            options = len(next(checked[k] for k, kind in _ITEM_FIELDS[task_type] if kind == "texts"))
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < options:
                raise _bundle_error(where, f"{key!r} must be an index into the {options} options, got {value!r}")
    if task_type == LANGUAGE_MODELING and not checked["continuation"]:
        raise _bundle_error(where, "'continuation' is empty: there is nothing to predict")
    return checked


def _read_items(path: Path, task_type: str) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(_read_text(path, "the data file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except ValueError as e:
            raise _bundle_error(where, f"not JSON ({e})") from None
        items.append(_check_item(item, task_type, where))
    if not items:
        raise _bundle_error(path, "no items")
    return items


def _first_shot_count(value: object, where: str) -> int:
    count = value[0] if isinstance(value, list) and value else value
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise _bundle_error(where, f"num_fewshot must be a non-negative int or a list starting with one, got {value!r}")
    return count


def _task_from_entry(entry: object, number: int, directory: Path, baselines: Mapping[str, float],
                     max_per_task: int | None) -> CoreTask:
    where = f"{directory / CONFIG_FILE} icl_tasks[{number}]"
    if not isinstance(entry, dict):
        raise _bundle_error(where, f"must be a mapping, got {entry!r:.200}")
    missing = [k for k in ("label", "icl_task_type", "dataset_uri", "num_fewshot") if k not in entry]
    if missing:
        raise _bundle_error(where, f"missing key(s) {missing}")
    label, task_type, uri = entry["label"], entry["icl_task_type"], entry["dataset_uri"]
    delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
    for key, value in (("label", label), ("dataset_uri", uri), ("continuation_delimiter", delimiter)):
        if not isinstance(value, str) or (key != "continuation_delimiter" and not value):
            raise _bundle_error(where, f"{key} must be a non-empty string, got {value!r}")
    if task_type not in TASK_TYPES:
        raise _bundle_error(where, f"unknown icl_task_type {task_type!r} (known: {', '.join(TASK_TYPES)})")
    num_fewshot = _first_shot_count(entry["num_fewshot"], where)
    if label not in baselines:
        raise _bundle_error(directory / META_FILE, f"no row for task {label!r} (its random baseline)")
    data_dir = (directory / DATA_DIR).resolve()
    path = (data_dir / uri).resolve()
    if not path.is_relative_to(data_dir):
        raise _bundle_error(where, f"dataset_uri {uri!r} points outside {DATA_DIR}/")
    items = _read_items(path, task_type)
    random.Random(SHUFFLE_SEED).shuffle(items)
    if max_per_task is not None:
        items = items[:max_per_task]
    return CoreTask(label, task_type, num_fewshot, delimiter, baselines[label], tuple(items))


def load_bundle(directory: str | os.PathLike[str], max_per_task: int | None = None) -> list[CoreTask]:
    """Every task of the bundle in `directory`, checked in full (config, baselines, every item of every
    data file) so a bad bundle fails before any model work, with one ValueError saying what and where.

    Items come in nanochat's evaluation order (shuffled with seed 1337); `max_per_task` keeps the first
    that many of each task (a debug knob: fewer items, noisier numbers).
    """
    if max_per_task is not None and (isinstance(max_per_task, bool) or not isinstance(max_per_task, int)
                                     or max_per_task < 1):
        raise ValueError(f"max_per_task must be a positive int or None, got {max_per_task!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise _bundle_error(directory, "not a directory")
    config_path = directory / CONFIG_FILE
    config = parse_yaml_subset(_read_text(config_path, "the task list"), str(config_path))
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise _bundle_error(config_path, "needs a non-empty list under the key 'icl_tasks'")
    baselines = _read_baselines(directory / META_FILE)
    tasks = [_task_from_entry(entry, n, directory, baselines, max_per_task) for n, entry in enumerate(entries)]
    labels = [task.label for task in tasks]
    if len(set(labels)) != len(labels):
        raise _bundle_error(config_path, f"task labels repeat: {sorted({x for x in labels if labels.count(x) > 1})}")
    return tasks


# ---- download --------------------------------------------------------------------------------------


def eval_bundle_url() -> str:
    """Where the bundle zip comes from: `NANOCHAT_EVAL_BUNDLE_URL` (mirrors) or nanochat's public copy."""
    return os.environ.get(BUNDLE_URL_ENV) or DEFAULT_BUNDLE_URL


def eval_bundle_dir() -> Path:
    """Where the bundle is unpacked, or can be placed by hand: `$NANOCHAT_BASE_DIR/eval_bundle`."""
    return base_dir() / "eval_bundle"


def _archive_problem(path: Path) -> str | None:
    """Why `path` is not a complete zip archive (every member's CRC is checked), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None if damaged is None else f"member {damaged} fails its CRC check"


def _bundle_root(unpacked: Path) -> Path | None:
    """The directory holding core.yaml: the archive's root or its one top-level folder (nanochat's zip
    holds `eval_bundle/`)."""
    for candidate in (unpacked, *sorted(p for p in unpacked.iterdir() if p.is_dir())):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def _unpack(archive: Path, directory: Path, url: str, hint: str) -> None:
    """Unpack into a staging folder beside `directory`, then rename it into place: a bundle directory
    that exists is always complete."""
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)  # zipfile drops absolute paths and '..' from member names
        root = _bundle_root(staging)
        if root is None:
            archive.unlink()
            raise DownloadError(f"the archive from {url} holds no {CONFIG_FILE}: it is not a CORE eval bundle. {hint}")
        os.replace(root, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_eval_bundle(*, max_attempts: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0,
                       deadline_base_s: float = 60.0, min_bytes_per_s: float = 100e3,
                       lock_timeout_s: float = -1) -> Path:
    """`eval_bundle_dir()`, downloaded and unpacked first unless it exists.

    Concurrent callers (torchrun ranks) serialise on a lock file so the zip is fetched once. The zip
    arrives as `eval_bundle.zip.partial` (resumed with HTTP Range after an interruption, retried with
    backoff; deadlines as in `dataset.download_file`), is checked member by member, renamed, unpacked
    into a staging folder that is renamed into place, then deleted. DownloadError, naming
    NANOCHAT_EVAL_BUNDLE_URL and the directory, when it cannot be fetched.
    """
    check_download_args(max_attempts, backoff_s, timeout_s, deadline_base_s, min_bytes_per_s)
    directory = eval_bundle_dir()
    if directory.exists():
        return directory
    url = eval_bundle_url()
    hint = (f"Set {BUNDLE_URL_ENV} (now {url}) to a reachable copy of eval_bundle.zip, or unpack a bundle by hand "
            f"into {directory} ({CONFIG_FILE}, {META_FILE}, {DATA_DIR}/): it is then used without any network access.")
    archive = directory.parent / "eval_bundle.zip"
    with FileLock(str(directory.parent / "eval_bundle.lock"), timeout=lock_timeout_s):
        if directory.exists():  # another rank finished while we waited
            return directory
        for leftover in directory.parent.glob(_STAGING_PREFIX + "*"):  # from a run killed mid-unpack
            shutil.rmtree(leftover, ignore_errors=True)
        if not archive.is_file() or _archive_problem(archive) is not None:
            download_file(url, archive, hint=hint, check=_archive_problem, kind="zip archive",
                          max_attempts=max_attempts, backoff_s=backoff_s, timeout_s=timeout_s,
                          deadline_base_s=deadline_base_s, min_bytes_per_s=min_bytes_per_s)
        _unpack(archive, directory, url, hint)
        archive.unlink()
    return directory


# ---- prompts --------------------------------------------------------------------------------------


def fewshot_indices(num_items: int, idx: int, num_fewshot: int) -> list[int]:
    """The items shown as examples before item `idx`: `num_fewshot` others (fewer when the task has
    fewer), drawn as nanochat does with `random.Random(1234 + idx).sample` over all indices but `idx`.

    Sampling `range(num_items - 1)` and shifting the draws at or above `idx` picks exactly the same
    items (sample's choices depend only on the population's length), without a list per item.
    """
    count = min(num_fewshot, num_items - 1)
    if count <= 0:
        return []
    drawn = random.Random(FEWSHOT_SEED + idx).sample(range(num_items - 1), count)
    return [j + (j >= idx) for j in drawn]


def render_prompts(task: CoreTask, idx: int) -> list[str]:
    """The prompts of item `idx` (what nanochat's templates render): few-shot examples, each ending in a
    blank line, then one prompt per choice (multiple_choice) or context option (schema); for
    language_modeling [prompt without the continuation (stripped), prompt with it]."""
    item, delimiter = task.items[idx], task.continuation_delimiter
    shots = [task.items[i] for i in fewshot_indices(len(task.items), idx, task.num_fewshot)]
    if task.task_type == MULTIPLE_CHOICE:
        prefix = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}{FEWSHOT_SEPARATOR}" for s in shots)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task.task_type == SCHEMA:
        prefix = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}{FEWSHOT_SEPARATOR}"
                         for s in shots)
        return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    prefix = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}{FEWSHOT_SEPARATOR}" for s in shots)
    # stripped: a trailing space would merge into the continuation's first token, and the prompt
    # without the continuation would then not be a token prefix of the prompt with it
    without = f"{prefix}{item['context'].strip()}{delimiter}".strip()
    return [without, f"{prefix}{item['context'].strip()}{delimiter}{item['continuation']}"]


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


class _Scorable(NamedTuple):
    """An item's token sequences and, per sequence, the [start, end) span whose tokens are scored."""

    sequences: list[list[int]]
    spans: list[tuple[int, int]]


def _spans(task_type: str, tokens: list[list[int]]) -> _Scorable:
    if task_type == MULTIPLE_CHOICE:  # the choices follow one shared context: score past their common prefix
        start = _common_prefix_length(tokens)
        return _Scorable(tokens, [(start, len(t)) for t in tokens])
    if task_type == SCHEMA:  # the options precede one shared continuation: score their common suffix
        suffix = _common_prefix_length([t[::-1] for t in tokens])
        return _Scorable(tokens, [(len(t) - suffix, len(t)) for t in tokens])
    without, with_continuation = tokens
    # nanochat asserts `without` is a token prefix of `with`; where a tokenizer merges across the seam
    # the score starts where the two part, which is the same span whenever the assertion holds
    start = _common_prefix_length([without, with_continuation])
    return _Scorable([with_continuation], [(start, len(with_continuation))])


def _crop_left(scorable: _Scorable, max_seq_len: int | None, task: CoreTask, idx: int) -> _Scorable:
    """Drop tokens from the left of sequences longer than `max_seq_len`, shifting their spans."""
    if max_seq_len is None:
        return scorable
    sequences, spans = [], []
    for tokens, (start, end) in zip(scorable.sequences, scorable.spans, strict=True):
        excess = len(tokens) - max_seq_len
        if excess > 0:
            if start - excess < 1:  # the span's first token is predicted from the token before it
                raise ValueError(f"CORE task {task.label!r} item {idx}: its {end - start} scored tokens and the one "
                                 f"before them do not fit the model context of {max_seq_len} tokens")
            tokens, start, end = tokens[excess:], start - excess, end - excess
        sequences.append(tokens)
        spans.append((start, end))
    return _Scorable(sequences, spans)


def _prepare(task: CoreTask, indices: Sequence[int], tokenizer: Tokenizer, max_seq_len: int | None) -> list[_Scorable]:
    """Render, tokenize (one batched encode, BOS first) and crop the items `indices`."""
    prompts = [render_prompts(task, idx) for idx in indices]
    flat = tokenizer.encode([p for item_prompts in prompts for p in item_prompts], prepend=tokenizer.bos_token_id)
    prepared, offset = [], 0
    for idx, item_prompts in zip(indices, prompts, strict=True):
        tokens = flat[offset:offset + len(item_prompts)]
        offset += len(item_prompts)
        prepared.append(_crop_left(_spans(task.task_type, tokens), max_seq_len, task, idx))  # type: ignore[arg-type]
    return prepared


# ---- scoring --------------------------------------------------------------------------------------


def _is_correct(task: CoreTask, idx: int, mean_losses: Sequence[float], matches: Sequence[bool]) -> bool:
    """LM: the greedy continuation matched. MC/schema: the lowest mean loss is the gold choice (ties go to
    the first; an empty span's NaN never wins, where nanochat's pick would depend on the choice order)."""
    if task.task_type == LANGUAGE_MODELING:
        return matches[0]
    scores = [math.inf if math.isnan(loss) else loss for loss in mean_losses]
    return scores.index(min(scores)) == task.items[idx]["gold"]


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise TypeError(f"model ({type(model).__name__}) has no parameters, so its device is unknown")
    return parameter.device


def _resolve_max_seq_len(model: torch.nn.Module, max_seq_len: int | None) -> int | None:
    """`max_seq_len`, or the context the model was built for (`model.config.sequence_len`) when it has one."""
    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "sequence_len", None)
        if max_seq_len is None:
            return None
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2 (BOS and one scored token), got {max_seq_len!r}")
    return max_seq_len


def _local_indices(num_items: int) -> range:
    if not is_ddp_initialized():
        return range(num_items)
    return range(dist.get_rank(), num_items, dist.get_world_size())


def _global_accuracy(num_correct: int, num_items: int, device: torch.device) -> float:
    """This rank's correct count summed over ranks, over all items."""
    if is_ddp_initialized():
        total = torch.tensor(num_correct, dtype=torch.int64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        num_correct = int(total.item())
    return num_correct / num_items


class _Batch(NamedTuple):
    """Items scored together: their first `prefix` tokens run once per item (0: no shared run), then all their
    sequences from there on, one row each."""

    items: list[int]
    prefix: int


def _shared_prefix_length(item: _Scorable) -> int:
    """The leading tokens all of an item's sequences have in common and whose outputs are never scored: they
    can run once, and every sequence continue from their KV cache."""
    first_scored_output = min(start for start, _ in item.spans) - 1
    return max(0, min(_common_prefix_length(item.sequences), first_scored_output))


def _batch_cost(num_items: int, num_rows: int, longest: int, prefix: int) -> tuple[int, int]:
    """(work, prefix) of the cheaper way to score a batch: its rows whole (prefix 0), or its items' common
    `prefix` once per item and then every row from there (one more forward)."""
    whole = FORWARD_COST_TOKENS + num_rows * longest
    if prefix == 0:
        return whole, 0
    shared = 2 * FORWARD_COST_TOKENS + num_items * prefix + num_rows * (longest - prefix)
    return (shared, prefix) if shared < whole else (whole, 0)


def _plan_batches(prepared: Sequence[_Scorable], batch_tokens: int) -> list[_Batch]:
    """Split the items into batches of at most `batch_tokens` positions (rows x longest row; an item larger
    than that goes alone) at the least padded work, `_batch_cost` per batch. The items are sorted by
    shared prefix, then length, so that a batch shares nearly all of each item's prefix; the best split of
    that order into consecutive batches is found by dynamic programming."""
    prefixes = [_shared_prefix_length(item) for item in prepared]
    longest = [max(map(len, item.sequences)) for item in prepared]
    order = sorted(range(len(prepared)), key=lambda i: (prefixes[i], longest[i]), reverse=True)
    best: list[float] = [0.0] + [math.inf] * len(order)  # best[j]: the least work for the first j items of `order`
    plan: list[tuple[int, int]] = [(0, 0)] * (len(order) + 1)  # for best[j]: (where its last batch starts, prefix)
    for end in range(1, len(order) + 1):
        prefix = prefixes[order[end - 1]]  # the batch's smallest: it is sorted in descending order
        num_rows = width = 0
        for start in range(end - 1, -1, -1):
            num_rows += len(prepared[order[start]].sequences)
            width = max(width, longest[order[start]])
            if num_rows * width > batch_tokens and start < end - 1:
                break
            work, batch_prefix = _batch_cost(end - start, num_rows, width, prefix)
            if best[start] + work < best[end]:
                best[end], plan[end] = best[start] + work, (start, batch_prefix)
    batches, end = [], len(order)
    while end > 0:
        start, prefix = plan[end]
        batches.append(_Batch(order[start:end], prefix))
        end = start
    return batches


def _fork_rows(cache: KVCache, sources: torch.Tensor, capacity: int) -> KVCache:
    """A cache whose row r continues `cache`'s row `sources[r]`, with room for `capacity` positions."""
    forked = KVCache(batch_size=len(sources), num_kv_heads=cache.num_kv_heads, max_seq_len=capacity,
                     head_dim=cache.head_dim, num_layers=cache.num_layers, device=cache.device, dtype=cache.dtype,
                     n_embd=cache.n_embd)
    forked.prefill(cache, rows=sources)
    return forked


def _score_batch(model: torch.nn.Module, items: Sequence[_Scorable], prefix: int, pad_id: int,
                 device: torch.device) -> list[tuple[list[float], list[bool]]]:
    """Per item, the mean loss over each sequence's span and whether greedy argmax reproduces it. With a
    `prefix`, the items' first `prefix` tokens run once (they are the same in all of an item's sequences and
    none of their outputs is scored) and every sequence continues from their KV cache. Sequences are
    right-padded (the model is causal: padding never changes a real position) and logits are computed at
    the scored positions only."""
    sequences = [tokens[prefix:] for item in items for tokens in item.sequences]
    spans = [(start - prefix, end - prefix) for item in items for start, end in item.spans]
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    scored = torch.zeros(ids.shape, dtype=torch.bool)
    for row, (tokens, (start, end)) in enumerate(zip(sequences, spans, strict=True)):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        scored[row, start - 1:end - 1] = True  # position t predicts token t + 1
    ids, scored = ids.to(device), scored.to(device)
    cache = None
    if prefix:
        shared = torch.tensor([item.sequences[0][:prefix] for item in items], dtype=torch.long, device=device)
        prefilled = KVCache.for_model(model.config, len(items), prefix, device)
        model(shared, kv_cache=prefilled, logits_at=torch.zeros(shared.shape, dtype=torch.bool, device=device))
        item_of_row = torch.tensor([n for n, item in enumerate(items) for _ in item.sequences], device=device)
        cache = _fork_rows(prefilled, item_of_row, prefix + ids.size(1))
    logits = model(ids, kv_cache=cache, logits_at=scored).float()  # (scored positions, vocab), row-major
    row_index, position_index = scored.nonzero(as_tuple=True)
    targets = ids[row_index, position_index + 1]
    losses = F.cross_entropy(logits, targets, reduction="none")
    misses = (logits.argmax(dim=-1) != targets).to(losses.dtype)
    counts = torch.bincount(row_index, minlength=len(sequences)).to(losses.dtype)
    sums = torch.zeros(len(sequences), dtype=losses.dtype, device=device).index_add_(0, row_index, losses)
    missed = torch.zeros(len(sequences), dtype=losses.dtype, device=device).index_add_(0, row_index, misses)
    means, counts_list, missed_list = (sums / counts).tolist(), counts.tolist(), missed.tolist()  # 0/0: NaN
    results, row = [], 0
    for item in items:
        rows = range(row, row + len(item.sequences))
        results.append(([means[r] for r in rows], [counts_list[r] > 0 and missed_list[r] == 0 for r in rows]))
        row = rows.stop
    return results


def _check_batch_tokens(batch_tokens: int) -> None:
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")


@torch.no_grad()
def score_task(model: torch.nn.Module, tokenizer: Tokenizer, task: CoreTask, *, max_seq_len: int | None = None,
               batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[int, bool]:
    """Whether `model` gets each of this rank's items of `task` right (item index -> correct), scored in
    batches of at most `batch_tokens` positions (see the module docstring).

    `model` is a `GPT`, or anything with its interface: `model(ids, kv_cache=..., logits_at=...)` and a
    `config` that shapes a `KVCache`. Prompts are cropped on the left to `max_seq_len` tokens (default:
    `model.config.sequence_len` when the model has one, else no crop).
    """
    _check_batch_tokens(batch_tokens)
    max_seq_len = _resolve_max_seq_len(model, max_seq_len)
    indices = list(_local_indices(len(task.items)))
    prepared = _prepare(task, indices, tokenizer, max_seq_len)
    device = _model_device(model)
    scores: list[tuple[list[float], list[bool]]] = [([], [])] * len(prepared)
    was_training = model.training
    model.eval()
    try:
        for batch in _plan_batches(prepared, batch_tokens):
            items = [prepared[i] for i in batch.items]
            for i, item_scores in zip(batch.items, _score_batch(model, items, batch.prefix, tokenizer.bos_token_id,
                                                                device), strict=True):
                scores[i] = item_scores
    finally:
        model.train(was_training)
    return {idx: _is_correct(task, idx, *item_scores) for idx, item_scores in zip(indices, scores, strict=True)}


@torch.no_grad()
def score_task_reference(model: torch.nn.Module, tokenizer: Tokenizer, task: CoreTask, *,
                         max_seq_len: int | None = None) -> dict[int, bool]:
    """`score_task` computed as nanochat does: one item per forward (its choices stacked, padded with
    BOS), cross-entropy and argmax at every position, then the span's slice. The oracle for the batched
    path and the benchmark's baseline."""
    max_seq_len = _resolve_max_seq_len(model, max_seq_len)
    device = _model_device(model)
    correct = {}
    was_training = model.training
    model.eval()
    try:
        for idx in _local_indices(len(task.items)):
            (item,) = _prepare(task, [idx], tokenizer, max_seq_len)
            width = max(len(tokens) for tokens in item.sequences)
            ids = torch.full((len(item.sequences), width), tokenizer.bos_token_id, dtype=torch.long)
            for row, tokens in enumerate(item.sequences):
                ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            ids = ids.to(device)
            logits = model(ids).float()
            targets = torch.roll(ids, shifts=-1, dims=1)  # the last column's target is junk and never scored
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(ids)
            predictions = logits.argmax(dim=-1)
            mean_losses = [losses[row, s - 1:e - 1].mean().item() for row, (s, e) in enumerate(item.spans)]
            matches = [e > s and bool((predictions[row, s - 1:e - 1] == ids[row, s:e]).all())
                       for row, (s, e) in enumerate(item.spans)]
            correct[idx] = _is_correct(task, idx, mean_losses, matches)
    finally:
        model.train(was_training)
    return correct


def evaluate_task(model: torch.nn.Module, tokenizer: Tokenizer, task: CoreTask, *, max_seq_len: int | None = None,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS) -> float:
    """Accuracy of `model` on `task` (`score_task`). Under an initialised process group each rank scores
    the items `idx % world_size == rank` and every rank returns the same all-reduced value."""
    correct = score_task(model, tokenizer, task, max_seq_len=max_seq_len, batch_tokens=batch_tokens)
    return _global_accuracy(sum(correct.values()), len(task.items), _model_device(model))


def evaluate_task_reference(model: torch.nn.Module, tokenizer: Tokenizer, task: CoreTask, *,
                            max_seq_len: int | None = None) -> float:
    """`evaluate_task` through `score_task_reference` (one item per forward)."""
    correct = score_task_reference(model, tokenizer, task, max_seq_len=max_seq_len)
    return _global_accuracy(sum(correct.values()), len(task.items), _model_device(model))


# ---- the metric -----------------------------------------------------------------------------------


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that guessing scores 0 and a perfect score 1; `random_baseline` in percent."""
    if not 0 <= random_baseline < 100:
        raise ValueError(f"random_baseline must be a percentage in [0, 100), got {random_baseline}")
    chance = random_baseline / 100
    return (accuracy - chance) / (1 - chance)


def core_metric(centered: Mapping[str, float]) -> float:
    """CORE: the mean centered accuracy over the tasks."""
    if not centered:
        raise ValueError("CORE needs at least one task's centered accuracy")
    return sum(centered.values()) / len(centered)


@dataclass(frozen=True)
class CoreResult:
    accuracy: dict[str, float]  # per task label, in bundle order
    centered: dict[str, float]
    core: float


def evaluate_core(model: torch.nn.Module, tokenizer: Tokenizer, *, bundle_dir: str | os.PathLike[str] | None = None,
                  max_per_task: int | None = None, max_seq_len: int | None = None,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  log: Callable[[str], object] | None = print0) -> CoreResult:
    """CORE of `model` over every task of the bundle in `bundle_dir` (default: `ensure_eval_bundle()`).

    All ranks must call it. `max_per_task`: see `load_bundle`; `max_seq_len`, `batch_tokens`: see
    `evaluate_task`; `log` receives one line per task (default: printed on rank 0).
    """
    _check_batch_tokens(batch_tokens)
    directory = Path(bundle_dir) if bundle_dir is not None else ensure_eval_bundle()
    tasks = load_bundle(directory, max_per_task=max_per_task)
    accuracy, centered = {}, {}
    for task in tasks:
        started = time.perf_counter()
        accuracy[task.label] = evaluate_task(model, tokenizer, task, max_seq_len=max_seq_len,
                                             batch_tokens=batch_tokens)
        centered[task.label] = centered_accuracy(accuracy[task.label], task.random_baseline)
        if log is not None:
            log(f"CORE {task.label} ({task.num_fewshot}-shot {task.task_type}, {len(task.items)} items): accuracy "
                f"{accuracy[task.label]:.4f} | centered {centered[task.label]:.4f} | "
                f"{time.perf_counter() - started:.1f} s")
    return CoreResult(accuracy, centered, core_metric(centered))
