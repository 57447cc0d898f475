"""Pretraining data on disk: a directory of parquet shards, and how to download them safely.

A dataset is a directory of `shard_NNNNN.parquet` files with a `text` column; the last shard (in index
order) is the validation split. The directory comes from `NANOCHAT_DATA_DIR` (default
`base_dir()/"base_data"`); when it holds no shards, the small corpus embedded in the package is used so
that everything runs offline out of the box.

Downloads (`download_shard`, `download_shards`, or `python -m nanochat_rs.dataset -n 8`) fetch from
`NANOCHAT_DATA_URL` (a mirror) or the public nanochat shards, and are:

- atomic: bytes go to `<shard>.partial` in the destination directory, which is fsynced and renamed with
  `os.replace` only once complete and validated, so a shard that exists is always whole;
- resumable: an interrupted `.partial` is continued with an HTTP `Range` request (and restarted from
  scratch when the server ignores `Range`);
- retried with exponential backoff on transient failures (connection errors, timeouts, 408/429/5xx,
  and transfers too slow to finish: see `download_shard`'s deadline);
- safe under torchrun: a per-shard file lock makes concurrent ranks download each shard exactly once;
- validated before the rename: the parquet footer must parse, the schema must hold a `text` string
  column and every row group must decode (page checksums are verified where the file has them).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from nanochat_rs import cli
from nanochat_rs.common import base_dir, print0
from nanochat_rs.errors import DownloadError

DEFAULT_DATA_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
"""Public nanochat pretraining shards (FineWeb-Edu, pre-shuffled); `NANOCHAT_DATA_URL` overrides it."""

MAX_SHARD_INDEX = 1822
"""Highest shard index of the default dataset (a mirror may hold fewer; nothing enforces this)."""

SHARD_PATTERN = re.compile(r"^shard_(\d{5,})\.parquet$")
PARQUET_MAGIC = b"PAR1"
_PARTIAL_SUFFIX = ".partial"
_LOCK_SUFFIX = ".lock"
_CHUNK_BYTES = 1 << 20
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 60.0
_FALLBACK_NOTED: set[Path] = set()
T = TypeVar("T")


class TransientDownloadError(Exception):
    """Internal: a failure worth retrying (the `.partial` file keeps what was received)."""


# ---- locations ---------------------------------------------------------------------------------


def shard_filename(index: int) -> str:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"shard index must be a non-negative int, got {index!r}")
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> Path:
    """The configured dataset directory: `NANOCHAT_DATA_DIR`, default `base_dir()/"base_data"`."""
    configured = os.environ.get("NANOCHAT_DATA_DIR")
    return Path(configured) if configured else base_dir() / "base_data"


def data_url() -> str:
    """Base URL that shards are downloaded from: `NANOCHAT_DATA_URL` (mirrors) or the public default."""
    return (os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_DATA_URL).rstrip("/")


def embedded_corpus_dir() -> Path:
    """The small corpus shipped inside the package (built by scripts/make_embedded_corpus.py)."""
    return Path(__file__).resolve().parent / "data" / "corpus"


def _shards_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := SHARD_PATTERN.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def list_parquet_files(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Shards in index order; the last one is the validation split.

    With `data_dir=None` the configured directory is used, falling back (with a printed note) to the
    embedded corpus when it holds no shards. An explicitly given directory must contain shards.
    Temporary `.partial` downloads are never listed.
    """
    if data_dir is not None:
        directory = Path(data_dir)
        shards = _shards_in(directory)
        if not shards:
            raise FileNotFoundError(f"no shard_NNNNN.parquet files in {directory}; download some with "
                                    "`nanochat-data -n 8` or point --data-dir elsewhere")
        return shards
    configured = default_data_dir()
    shards = _shards_in(configured)
    if shards:
        return shards
    embedded = _shards_in(embedded_corpus_dir())
    if not embedded:
        raise FileNotFoundError(f"no shards in {configured} and the embedded corpus is missing from "
                                f"{embedded_corpus_dir()}: the installation is incomplete, reinstall nanochat_rs")
    if configured not in _FALLBACK_NOTED:  # once per process: loaders list files on every (re)start
        _FALLBACK_NOTED.add(configured)
        print0(f"Note: no shards in {configured}; using the embedded corpus ({len(embedded)} shards). "
               "Download real data with `nanochat-data -n 8`.")
    return embedded


# ---- validation --------------------------------------------------------------------------------


def is_valid_parquet(path: str | os.PathLike[str]) -> bool:
    """Cheap structural check: parquet files start and end with `PAR1` (and hold at least a footer)."""
    try:
        size = os.path.getsize(path)
        if size < 12:
            return False
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
    except OSError:
        return False
    return head == PARQUET_MAGIC and tail == PARQUET_MAGIC


TEXT_COLUMN = "text"


def _is_string_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):  # e.g. written with use_dictionary: still strings to every reader
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def check_text_column(shard: str | os.PathLike[str], schema: pa.Schema) -> None:
    """ValueError unless the shard's schema has the `text` column of strings every reader needs."""
    if TEXT_COLUMN not in schema.names:
        raise ValueError(f"{shard} has no {TEXT_COLUMN!r} column (columns: "
                         + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")")
    kind = schema.field(TEXT_COLUMN).type
    if not _is_string_type(kind):
        raise ValueError(f"{shard}: the {TEXT_COLUMN!r} column must hold strings, got type {kind}")


def shard_problem(path: str | os.PathLike[str], require_text: bool = True) -> str | None:
    """Why `path` is not a usable shard, or None when it is: the footer parses, the schema has a
    `text` string column (unless `require_text` is False) and every row group decodes, with page
    checksums verified where present.

    Decoding reads the whole file (about a second for a 100 MB shard, small next to downloading it):
    damage between intact PAR1 markers shows up nowhere else.
    """
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as parquet:
            if require_text:
                check_text_column(path, parquet.schema_arrow)
            columns = [TEXT_COLUMN] if require_text else None
            for group in range(parquet.num_row_groups):  # one at a time: memory stays one row group
                parquet.read_row_group(group, columns=columns)
    except ValueError as e:
        return str(e)
    except (OSError, pa.ArrowException) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- one HTTP transfer ----------------------------------------------------------------------------


def _content_range_start(header: str | None) -> int | None:
    # "bytes 100-999/1000" -> 100
    m = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", header or "")
    return int(m.group(1)) if m else None


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": "nanochat_rs"})
    if offset > 0:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)


def _transfer(url: str, partial: Path, timeout: float, deadline_base_s: float, min_bytes_per_s: float,
              hint: str, problem: Callable[[Path], str | None]) -> None:
    """Append the rest of `url` to `partial`, resuming from its current size when possible.

    Raises TransientDownloadError for anything worth retrying; a non-retryable HTTP status raises DownloadError.
    The body must arrive by `deadline_base_s + received / min_bytes_per_s` seconds after the request
    started: the socket `timeout` alone never fires for a server that sends a byte now and then.
    """
    started = time.monotonic()
    offset = partial.stat().st_size if partial.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset > 0:
            if problem(partial) is None:
                return  # a previous run received every byte but died before the rename
            # Our partial is longer than the file (or the file changed): start over.
            partial.unlink(missing_ok=True)
            raise TransientDownloadError(f"HTTP 416 resuming at byte {offset}; restarting from scratch") from None
        if e.code in RETRYABLE_HTTP:
            raise TransientDownloadError(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (not retryable). {hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise TransientDownloadError(f"{type(reason).__name__}: {reason}") from None

    with response:
        if offset > 0 and response.status == 206:
            if _content_range_start(response.headers.get("Content-Range")) != offset:
                partial.unlink(missing_ok=True)
                raise TransientDownloadError(f"server answered Range {offset}- with Content-Range "
                                      f"{response.headers.get('Content-Range')!r}; restarting from scratch")
            mode = "ab"
        else:
            # 200 for a ranged request means the server ignored Range: the body is the whole file.
            mode, offset = "wb", 0
        expected = response.headers.get("Content-Length")
        expected_len = int(expected) if expected and expected.isdigit() else None
        received = 0
        try:
            with open(partial, mode) as f:
                # read1: whatever one recv returns, so the deadline is checked as bytes trickle in
                # (read(n) would block until n bytes arrived)
                while chunk := response.read1(_CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    elapsed = time.monotonic() - started
                    if elapsed > deadline_base_s + received / min_bytes_per_s:
                        raise TransientDownloadError(f"too slow: {received} bytes in {elapsed:.0f} s, below "
                                              f"{min_bytes_per_s:.0f} bytes/s (resuming from byte {offset + received})")
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:
            raise TransientDownloadError(f"connection lost after {offset + received} bytes: "
                                  f"{type(e).__name__}: {e}") from None
        if expected_len is not None and received < expected_len:
            raise TransientDownloadError(f"truncated: received {received} of {expected_len} bytes "
                                  f"(resuming from byte {offset + received})")


# ---- download ---------------------------------------------------------------------------------


def parquet_problem(path: Path, require_text: bool = True) -> str | None:
    """What is wrong with a downloaded parquet file (None: nothing)."""
    return "missing PAR1 magic bytes" if not is_valid_parquet(path) else shard_problem(path, require_text)


def _finalize(partial: Path, dest: Path, problem_of: Callable[[Path], str | None]) -> str | None:
    """Move a complete, valid `partial` into place and return None, or delete a bad one (so the retry
    starts fresh) and return what is wrong with it."""
    problem = problem_of(partial)
    if problem is not None:
        partial.unlink(missing_ok=True)
        return problem
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, dest)
    _fsync_dir(dest.parent)
    return None


def with_retries(what: str, attempt_once: Callable[[], T], *, max_attempts: int, backoff_s: float, hint: str) -> T:
    """`attempt_once()` until it returns, retrying on TransientDownloadError with exponential backoff
    (`backoff_s * 2**attempt`, at most 60 s); then a DownloadError saying what failed, the last error
    and `hint` (what the user can do about it)."""
    last_error = "no attempt made"
    for attempt in range(max_attempts):
        if attempt > 0:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        try:
            return attempt_once()
        except TransientDownloadError as e:
            last_error = str(e)
    raise DownloadError(f"could not {what} after {max_attempts} attempts; last error: {last_error}. {hint}")


def check_download_args(max_attempts: int, backoff_s: float, timeout_s: float, deadline_base_s: float = 1.0,
                        min_bytes_per_s: float = 1.0) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if backoff_s < 0 or timeout_s <= 0 or deadline_base_s <= 0 or min_bytes_per_s <= 0:
        raise ValueError(f"need backoff_s >= 0 and timeout_s, deadline_base_s, min_bytes_per_s > 0, got "
                         f"{backoff_s}, {timeout_s}, {deadline_base_s}, {min_bytes_per_s}")


def download_file(url: str, dest: Path, *, hint: str, require_text: bool = True,
                  check: Callable[[Path], str | None] | None = None, kind: str = "parquet file",
                  max_attempts: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0,
                  deadline_base_s: float = 60.0, min_bytes_per_s: float = 100e3) -> Path:
    """Download the file at `url` to `dest`: resumable (a `.partial` beside it), retried, verified and
    renamed into place atomically. Verified by `check` (what is wrong with the file, None: nothing; a
    `kind` of file), by default as a parquet file (`parquet_problem`, with a text column when
    `require_text`). The caller holds the lock that keeps
    other processes off `dest`; `hint` ends the DownloadError of a download that keeps failing.

    `timeout_s` bounds each wait for the server (connecting, each read). An attempt also ends, as a
    retryable failure that keeps its bytes, once it has run `deadline_base_s + received /
    min_bytes_per_s` seconds: with the defaults a 100 MB shard gets about 17 minutes, a server that
    sends a byte now and then about a minute.
    """
    check_download_args(max_attempts, backoff_s, timeout_s, deadline_base_s, min_bytes_per_s)
    partial = dest.with_name(dest.name + _PARTIAL_SUFFIX)

    problem_of = check or (lambda path: parquet_problem(path, require_text))

    def attempt() -> Path:
        _transfer(url, partial, timeout_s, deadline_base_s, min_bytes_per_s, hint, problem_of)
        problem = _finalize(partial, dest, problem_of)
        if problem is not None:
            shown = "parquet shard" if check is None and require_text else kind
            raise TransientDownloadError(f"the downloaded file is not a readable {shown} ({problem})")
        return dest

    return with_retries(f"download {url}", attempt, max_attempts=max_attempts, backoff_s=backoff_s, hint=hint)


def download_shard(index: int, *, data_dir: str | os.PathLike[str] | None = None,
                   base_url: str | None = None, max_attempts: int = 5, backoff_s: float = 1.0,
                   timeout_s: float = 60.0, deadline_base_s: float = 60.0, min_bytes_per_s: float = 100e3,
                   lock_timeout_s: float = -1) -> Path:
    """Download shard `index` into the data dir (unless it is already there) and return its path.

    Concurrent callers (threads, processes, torchrun ranks sharing a filesystem) serialise on a lock
    file, so the shard is fetched once. Attempts, retries and deadlines: see `download_file`.
    """
    check_download_args(max_attempts, backoff_s, timeout_s, deadline_base_s, min_bytes_per_s)
    name = shard_filename(index)
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / name
    if dest.is_file() and is_valid_parquet(dest):
        return dest
    url = f"{(base_url or data_url()).rstrip('/')}/{name}"
    hint = ("Is the shard index right? If this machine is offline or behind a firewall, set NANOCHAT_DATA_URL "
            f"to a reachable mirror, or copy shard files into {directory} (set NANOCHAT_DATA_DIR to use "
            "another directory).")
    with FileLock(str(directory / (name + _LOCK_SUFFIX)), timeout=lock_timeout_s):
        if dest.is_file() and is_valid_parquet(dest):  # another rank finished while we waited
            return dest
        return download_file(url, dest, hint=hint, max_attempts=max_attempts, backoff_s=backoff_s,
                             timeout_s=timeout_s, deadline_base_s=deadline_base_s, min_bytes_per_s=min_bytes_per_s)


def download_shards(indices: int | Iterable[int], *, workers: int = 4, **kwargs: object) -> list[Path]:
    """Download several shards in parallel; `indices` is a count n (shards 0..n-1) or explicit indices.

    Keyword arguments go to `download_shard`. Returns the paths in the order of `indices`.
    """
    if isinstance(indices, bool):
        raise ValueError("indices must be a number of shards or an iterable of shard indices, got a bool")
    if isinstance(indices, int):
        if indices < 0:
            raise ValueError(f"number of shards must be >= 0, got {indices}")
        wanted = list(range(indices))
    else:
        wanted = list(indices)
        for index in wanted:  # all checked before any download starts; int() would turn 2.5 into 2
            shard_filename(index)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=min(workers, max(1, len(wanted)))) as pool:
        return list(pool.map(lambda i: download_shard(i, **kwargs), wanted))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nanochat-data",
                                     description="Download pretraining shards (last one = validation).")
    parser.add_argument("-n", "--num-shards", type=int, default=8,
                        help=f"download shards 0..n-1 (the full dataset has {MAX_SHARD_INDEX + 1})")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--data-dir", default=None, help="destination (default: NANOCHAT_DATA_DIR)")
    args = parser.parse_args(argv)

    def download() -> None:
        if args.num_shards < 0:
            raise cli.UsageError(f"--num-shards must be >= 0, got {args.num_shards}")
        if args.workers < 1:
            raise cli.UsageError(f"--workers must be >= 1, got {args.workers}")
        paths = download_shards(args.num_shards, workers=args.workers, data_dir=args.data_dir)
        print(f"{len(paths)} shards ready in {paths[0].parent if paths else args.data_dir}")

    cli.run_job(download)


if __name__ == "__main__":
    main()
