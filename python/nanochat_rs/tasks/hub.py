"""Hugging Face Hub datasets without the `datasets` package: one split's parquet export, downloaded once.

The Hub converts every dataset to parquet; `GET {endpoint}/api/datasets/{repo}/parquet/{config}/{split}`
answers a JSON list of the split's file URLs. The endpoint is `HF_ENDPOINT` (the variable users of
mirrors already set), default https://huggingface.co.

A split lives in `split_dir(repo, config, split)` = `$NANOCHAT_BASE_DIR/task_data/{repo, "/" -> "__"}/
{config}/{split}/`. Downloads reuse dataset.py's transfer (HTTP Range resume, a deadline against
trickling servers) and add retries, a lock per directory (torchrun ranks download once) and an atomic
rename once a file decodes. The listing is saved as `listing.json` before any file, so:

- a directory with `listing.json` is complete when every file it names is there (an interrupted
  download is finished on the next load);
- a directory without one but with `*.parquet` files holds files placed by hand: they are used as
  they are, with no network access at all.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from nanochat_rs.common import base_dir
from nanochat_rs.dataset import (
    RETRYABLE_HTTP,
    TransientDownloadError,
    check_download_args,
    download_file,
    with_retries,
)
from nanochat_rs.errors import DownloadError
from nanochat_rs.tasks.base import Task
from nanochat_rs.util import atomic_write

DEFAULT_ENDPOINT = "https://huggingface.co"
LISTING = "listing.json"
PROBE_TIMEOUT_S = 3.0  # `hub_reachable`: long enough for a slow link, short next to a download's retries
SHUFFLE_SEED = 42  # a fixed order, so `stop=N` subsets of sorted splits (MMLU is sorted by subject) are mixed
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_endpoint() -> str:
    """The Hub's base URL: `HF_ENDPOINT` (mirrors) or the public default."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `hub_endpoint()` answers HTTP at all within `timeout_s` (any status: a server is there).

    For callers that would rather leave Hub tasks out than wait out a download's retries offline."""
    request = urllib.request.Request(hub_endpoint(), method="HEAD", headers={"User-Agent": "nanochat_rs"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:  # an error status still comes from a reachable server
        return True
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):  # ValueError: a malformed URL
        return False


def _check_name(what: str, value: object) -> str:
    # The names become directories: no separators, no "..", nothing a shell would mangle.
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} is not a valid name (letters, digits, '.', '_', '-')")
    return value


def split_dir(repo: str, config: str, split: str) -> Path:
    """Where the parquet files of (repo, config, split) are kept, or can be placed by hand."""
    if not isinstance(repo, str):
        raise TypeError(f"repo must be a str, got {type(repo).__name__}")
    owner, _, name = repo.partition("/")
    _check_name("repo owner", owner)
    _check_name("repo name", name)
    return base_dir() / "task_data" / f"{owner}__{name}" / _check_name("config", config) / _check_name("split", split)


def is_downloaded(repo: str, config: str, split: str) -> bool:
    """Whether (repo, config, split) is on disk complete, so loading it needs no network access."""
    directory = split_dir(repo, config, split)
    return directory.is_dir() and _local_files(directory) is not None


def _natural_key(path: Path) -> list[Any]:
    # "2.parquet" before "10.parquet": the export numbers its files and rows follow that order.
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", path.name)]


def _local_files(directory: Path) -> list[Path] | None:
    """The split's files when the directory holds all of them, else None."""
    listing = directory / LISTING
    if listing.is_file():
        paths = [directory / name for name in _names(json.loads(listing.read_text()), str(listing))]
        return paths if all(p.is_file() for p in paths) else None
    placed = sorted((p for p in directory.glob("*.parquet") if p.is_file()), key=_natural_key)
    return placed or None


def _names(urls: object, source: str) -> list[str]:
    """The local file name of each URL of a listing (its last path segment), checked."""
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise DownloadError(f"{source}: expected a non-empty JSON list of parquet file URLs, got {urls!r:.200}")
    names = [urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] for url in urls]
    if len(set(names)) != len(names) or not all(_NAME.match(n) and n.endswith(".parquet") for n in names):
        raise DownloadError(f"{source}: the file names of the listing are not distinct *.parquet names: {names}")
    return names


def _offline_hint(directory: Path) -> str:
    return (f"Set HF_ENDPOINT (now {hub_endpoint()}) to a reachable mirror, or place the split's parquet "
            f"files in {directory} by hand: they are then used without any network access.")


def _fetch_listing(url: str, timeout_s: float) -> object:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "nanochat_rs"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code in RETRYABLE_HTTP:
            raise TransientDownloadError(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (does the dataset have this config and "
                            "split, and is HF_ENDPOINT right?)") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise TransientDownloadError(f"{type(reason).__name__}: {reason}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise DownloadError(f"{url} did not answer JSON: {body[:200]!r}") from None


def download_split(repo: str, config: str, split: str, *, max_attempts: int = 5, backoff_s: float = 1.0,
                   timeout_s: float = 60.0, lock_timeout_s: float = -1) -> list[Path]:
    """The parquet files of (repo, config, split), downloaded unless already in `split_dir`.

    Files already there (a finished download, or files placed by hand) are returned without any
    network access. Otherwise the listing and then each missing file are fetched, each request tried
    up to `max_attempts` times (waits of `backoff_s * 2**attempt`, at most 60 s). Raises DownloadError,
    naming HF_ENDPOINT and the directory, when the Hub cannot be reached or answers nonsense.
    """
    check_download_args(max_attempts, backoff_s, timeout_s)
    directory = split_dir(repo, config, split)
    if directory.is_dir() and (found := _local_files(directory)):
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".lock"), timeout=lock_timeout_s):
        if found := _local_files(directory):  # another rank finished while we waited
            return found
        listing = directory / LISTING
        if listing.is_file():  # an interrupted download: its listing names what is still missing
            urls = json.loads(listing.read_text())
        else:
            url = "/".join([hub_endpoint(), "api/datasets", repo, "parquet", config, split])
            urls = with_retries(f"list the parquet files of {repo} {config}/{split} at {url}",
                                lambda: _fetch_listing(url, timeout_s), max_attempts=max_attempts,
                                backoff_s=backoff_s, hint=_offline_hint(directory))
            _names(urls, url)  # checked before it is saved
            atomic_write(listing, lambda f: f.write(json.dumps(urls)), mode="w")
        paths = []
        for url, name in zip(urls, _names(urls, str(listing)), strict=True):
            dest = directory / name
            if not dest.is_file():
                download_file(url, dest, hint=_offline_hint(directory), require_text=False,
                              max_attempts=max_attempts, backoff_s=backoff_s, timeout_s=timeout_s)
            paths.append(dest)
        return paths


def load_split(repo: str, config: str, split: str, columns: Sequence[str], **download_args: Any) -> pa.Table:
    """The rows of (repo, config, split), files in order, reduced to `columns` (ValueError naming the
    file when one lacks a column). `download_args` go to `download_split`."""
    tables = []
    for path in download_split(repo, config, split, **download_args):
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing} of {repo} {config}/{split} (it has {names})")
        tables.append(pq.read_table(path, columns=list(columns)))
    return pa.concat_tables(tables, promote_options="permissive")


class HubTask(Task):
    """A task over one split of a Hub dataset: rows in a fixed shuffled order (seed 42), read on demand.

    Subclasses set `REPO` and `SPLITS` (config -> its splits) and turn `row(index)` into conversations.
    """

    REPO: str
    SPLITS: Mapping[str, tuple[str, ...]]

    def __init__(self, config: str, split: str, columns: Sequence[str], **slice_args: int) -> None:
        super().__init__(**slice_args)
        if config not in self.SPLITS:
            raise ValueError(f"{type(self).__name__}: config must be one of {tuple(self.SPLITS)}, got {config!r}")
        if split not in self.SPLITS[config]:
            raise ValueError(f"{type(self).__name__}: split of config {config!r} must be one of "
                             f"{self.SPLITS[config]}, got {split!r}")
        self.config, self.split = config, split
        self.table = load_split(self.REPO, config, split, columns)
        self.order = list(range(self.table.num_rows))
        random.Random(SHUFFLE_SEED).shuffle(self.order)

    def num_examples(self) -> int:
        return len(self.order)

    def row(self, index: int) -> dict[str, Any]:
        """Row `index` (in the shuffled order) as a dict of its columns."""
        return self.table.slice(self.order[index], 1).to_pylist()[0]

    def malformed(self, index: int, why: str) -> ValueError:
        """The error for a bad row, naming it by its position in the split's files."""
        return ValueError(f"{self.REPO} {self.config}/{self.split} row {self.order[index]} is malformed: {why}")
