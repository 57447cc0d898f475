"""Spec for dataset.py: shard listing, the embedded corpus, and safe downloads.

Downloads run against a real HTTP server on 127.0.0.1 started by the tests, whose misbehaviour
(failures, truncation, ignoring Range, slowness) is scripted per test.
"""

from __future__ import annotations

import io
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nanochat_rs import dataset
from nanochat_rs.dataset import (
    SHARD_PATTERN,
    DownloadError,
    download_shard,
    download_shards,
    embedded_corpus_dir,
    is_valid_parquet,
    list_parquet_files,
    shard_filename,
)

FAST = dict(backoff_s=0.01, timeout_s=5.0)


def parquet_bytes(texts: list[str]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buffer)
    return buffer.getvalue()


@dataclass
class Script:
    """What the test server serves and how it misbehaves; it records every request it sees."""

    files: dict[str, bytes] = field(default_factory=dict)
    fail_first: int = 0          # answer the first N requests with 503
    truncate_first: int = 0      # then send only half the body (full Content-Length) N times
    honor_range: bool = True
    delay_s: float = 0.0
    drip_first: int = 0          # answer the first N requests one byte every DRIP_S, for DRIP_BYTES bytes
    dripped: queue.Queue[int] = field(default_factory=queue.Queue)  # bytes each drip sent before it ended
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)  # set by the fixture: end every drip


DRIP_S = 0.3
DRIP_BYTES = 20  # a drip ends (as a truncated transfer) after 6 s, so a client without a deadline finishes too


class Handler(BaseHTTPRequestHandler):
    script: Script  # set per server

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        script = self.server.script  # type: ignore[attr-defined]
        with script.lock:
            script.requests.append((self.path, self.headers.get("Range")))
            fail = script.fail_first > 0
            script.fail_first -= fail
            truncate = not fail and script.truncate_first > 0
            script.truncate_first -= truncate
            drip = not fail and not truncate and script.drip_first > 0
            script.drip_first -= drip
        if script.delay_s:
            threading.Event().wait(script.delay_s)
        if fail:
            self.send_error(503, "try again later")
            return
        body = script.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404, "no such shard")
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and script.honor_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416, "range not satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if drip:
            self.drip(script, payload)
            return
        self.wfile.write(payload[: len(payload) // 2] if truncate else payload)
        self.wfile.flush()
        self.close_connection = True

    def drip(self, script: Script, payload: bytes) -> None:
        sent = 0
        for byte in payload[:DRIP_BYTES]:
            if script.stop.wait(DRIP_S):
                break
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up
                break
            sent += 1
        script.dripped.put(sent)
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.script = script  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/data", script
    finally:
        script.stop.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def shard0() -> bytes:
    return parquet_bytes([f"document number {i} " * 50 for i in range(200)])


def gets(script: Script) -> list[tuple[str, str | None]]:
    return list(script.requests)


# ---- naming and listing ------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**7))
def test_shard_filename_round_trips_through_the_listing_pattern(index: int) -> None:
    match = SHARD_PATTERN.match(shard_filename(index))
    assert match is not None and int(match.group(1)) == index


@pytest.mark.parametrize("bad", [-1, 1.0, "3", True])
def test_shard_filename_rejects_non_indices(bad: object) -> None:
    with pytest.raises(ValueError, match="shard index"):
        shard_filename(bad)  # type: ignore[arg-type]


def test_listing_is_numeric_order_and_skips_temporaries(tmp_path: Path) -> None:
    for index in (10, 2, 100000, 0):
        (tmp_path / shard_filename(index)).write_bytes(b"x")
    for junk in ("shard_00003.parquet.partial", "shard_00003.parquet.lock", "notes.parquet", "shard_7.parquet"):
        (tmp_path / junk).write_bytes(b"x")
    names = [p.name for p in list_parquet_files(tmp_path)]
    assert names == ["shard_00000.parquet", "shard_00002.parquet", "shard_00010.parquet", "shard_100000.parquet"]


def test_explicit_empty_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no shard_NNNNN.parquet"):
        list_parquet_files(tmp_path)


def test_configured_dir_is_used_when_it_has_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / shard_filename(0)).write_bytes(b"x")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    assert list_parquet_files() == [tmp_path / shard_filename(0)]


def test_default_data_dir_lives_under_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert dataset.default_data_dir() == tmp_path / "base_data"


def test_falls_back_to_embedded_corpus_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "empty"))
    files = list_parquet_files()
    assert files == sorted(embedded_corpus_dir().glob("shard_*.parquet"))
    assert "embedded corpus" in capsys.readouterr().out


def test_a_missing_embedded_corpus_is_an_install_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(dataset, "embedded_corpus_dir", lambda: tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="reinstall nanochat_rs") as info:
        list_parquet_files()
    assert "scripts/" not in str(info.value)  # wheels ship no scripts


def test_embedded_corpus_is_small_valid_text_with_a_val_shard() -> None:
    files = sorted(embedded_corpus_dir().glob("shard_*.parquet"))
    assert len(files) >= 2, "need at least one train shard plus the validation shard"
    assert sum(f.stat().st_size for f in files) <= 8 * 2**20
    train_texts = set()
    for f in files:
        assert is_valid_parquet(f)
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.field("text").type == pa.string()
        assert pf.metadata.num_row_groups >= 2, "row groups are what the loader strides across ranks"
        texts = pf.read(columns=["text"]).column("text").to_pylist()
        assert texts and all(isinstance(t, str) and t.strip() for t in texts)
        if f != files[-1]:
            train_texts.update(texts)
    val_texts = pq.read_table(files[-1]).column("text").to_pylist()
    assert not train_texts.intersection(val_texts), "validation documents must not appear in training shards"


def test_data_url_env_overrides_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    assert dataset.data_url() == dataset.DEFAULT_DATA_URL
    assert "karpathy/fineweb-edu-100b-shuffle/resolve/main" in dataset.DEFAULT_DATA_URL
    monkeypatch.setenv("NANOCHAT_DATA_URL", "https://mirror.example/shards/")
    assert dataset.data_url() == "https://mirror.example/shards"


@pytest.mark.parametrize("content, valid", [
    (b"PAR1" + b"\0" * 8 + b"PAR1", True),
    (b"PAR1PAR1", False),  # too short to hold a footer
    (b"<html>PAR1" + b"\0" * 8 + b"PAR1", False),
    (b"PAR1" + b"\0" * 8 + b"PAR2", False),
])
def test_parquet_validation_checks_magic_at_both_ends(tmp_path: Path, content: bytes, valid: bool) -> None:
    path = tmp_path / "f.parquet"
    path.write_bytes(content)
    assert is_valid_parquet(path) is valid


# ---- downloads --------------------------------------------------------------------------------


def test_download_writes_the_shard_atomically(tmp_path: Path, server: tuple[str, Script], shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    path = download_shard(0, data_dir=tmp_path, base_url=url, **FAST)
    assert path == tmp_path / shard_filename(0)
    assert path.read_bytes() == shard0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    assert pq.read_table(path).num_rows == 200


def test_existing_valid_shard_is_not_downloaded_again(tmp_path: Path, server: tuple[str, Script],
                                                      shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    download_shard(0, data_dir=tmp_path, base_url=url, **FAST)
    download_shard(0, data_dir=tmp_path, base_url=url, **FAST)
    assert len(gets(script)) == 1


def test_env_url_is_used_without_base_url(tmp_path: Path, server: tuple[str, Script], shard0: bytes,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url, script = server
    script.files[shard_filename(3)] = shard0
    monkeypatch.setenv("NANOCHAT_DATA_URL", url)
    assert download_shard(3, data_dir=tmp_path, **FAST).read_bytes() == shard0
    assert gets(script)[0][0] == f"/data/{shard_filename(3)}"


def test_transient_failures_are_retried(tmp_path: Path, server: tuple[str, Script], shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    script.fail_first = 3
    path = download_shard(0, data_dir=tmp_path, base_url=url, max_attempts=5, **FAST)
    assert path.read_bytes() == shard0
    assert len(gets(script)) == 4


def test_gives_up_after_max_attempts(tmp_path: Path, server: tuple[str, Script], shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    script.fail_first = 10
    with pytest.raises(DownloadError, match="after 3 attempts.*HTTP 503"):
        download_shard(0, data_dir=tmp_path, base_url=url, max_attempts=3, **FAST)
    assert len(gets(script)) == 3
    assert not (tmp_path / shard_filename(0)).exists()


def test_truncated_transfer_resumes_with_range(tmp_path: Path, server: tuple[str, Script], shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    script.truncate_first = 1
    path = download_shard(0, data_dir=tmp_path, base_url=url, **FAST)
    assert path.read_bytes() == shard0
    requests = gets(script)
    assert len(requests) == 2
    assert requests[0][1] is None
    assert requests[1][1] == f"bytes={len(shard0) // 2}-"


def test_restarts_from_scratch_when_server_ignores_range(tmp_path: Path, server: tuple[str, Script],
                                                         shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    script.truncate_first = 1
    script.honor_range = False
    path = download_shard(0, data_dir=tmp_path, base_url=url, **FAST)
    assert path.read_bytes() == shard0
    assert gets(script)[1][1] is not None  # we asked to resume, got a 200 with the whole file


def test_leftover_partial_from_a_killed_run_is_continued(tmp_path: Path, server: tuple[str, Script],
                                                         shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    (tmp_path / (shard_filename(0) + ".partial")).write_bytes(shard0[:1000])
    path = download_shard(0, data_dir=tmp_path, base_url=url, **FAST)
    assert path.read_bytes() == shard0
    assert gets(script) == [(f"/data/{shard_filename(0)}", "bytes=1000-")]


def test_complete_leftover_partial_is_just_renamed(tmp_path: Path, server: tuple[str, Script],
                                                   shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    (tmp_path / (shard_filename(0) + ".partial")).write_bytes(shard0)  # died right before the rename
    assert download_shard(0, data_dir=tmp_path, base_url=url, **FAST).read_bytes() == shard0
    assert len(gets(script)) == 1


def test_overlong_leftover_partial_restarts(tmp_path: Path, server: tuple[str, Script], shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    (tmp_path / (shard_filename(0) + ".partial")).write_bytes(b"x" * (len(shard0) + 10))
    assert download_shard(0, data_dir=tmp_path, base_url=url, **FAST).read_bytes() == shard0
    assert [r[1] for r in gets(script)] == [f"bytes={len(shard0) + 10}-", None]


def test_concurrent_downloads_fetch_once(tmp_path: Path, server: tuple[str, Script], shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    script.delay_s = 0.3  # keeps the first download in flight while the second caller arrives
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(download_shard(0, data_dir=tmp_path, base_url=url, **FAST))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(results) == 3 and all(p.read_bytes() == shard0 for p in results)
    assert len(gets(script)) == 1


def test_download_shards_fetches_a_range_in_parallel(tmp_path: Path, server: tuple[str, Script]) -> None:
    url, script = server
    contents = {shard_filename(i): parquet_bytes([f"shard {i} text"] * 10) for i in range(4)}
    script.files.update(contents)
    paths = download_shards(4, workers=3, data_dir=tmp_path, base_url=url, **FAST)
    assert [p.name for p in paths] == [shard_filename(i) for i in range(4)]
    assert all(p.read_bytes() == contents[p.name] for p in paths)
    assert list_parquet_files(tmp_path) == paths


def test_a_dripping_server_is_abandoned_and_the_download_resumed(tmp_path: Path, server: tuple[str, Script],
                                                                 shard0: bytes) -> None:
    """Each byte arrives well within the socket timeout, so only a deadline on the whole attempt
    (here 1 s plus 1 s per 100 kB received) stops waiting for the rest."""
    url, script = server
    script.files[shard_filename(0)] = shard0
    script.drip_first = 1
    path = download_shard(0, data_dir=tmp_path, base_url=url, deadline_base_s=1.0, min_bytes_per_s=100e3, **FAST)
    assert path.read_bytes() == shard0
    assert script.dripped.get(timeout=30) < DRIP_BYTES  # the client left mid-drip
    requests = gets(script)
    assert len(requests) == 2 and requests[1][1] is not None  # the retry continued where the drip ended


def test_a_server_too_slow_on_every_attempt_is_a_download_error(tmp_path: Path, server: tuple[str, Script],
                                                               shard0: bytes) -> None:
    url, script = server
    script.files[shard_filename(0)] = shard0
    script.drip_first = 2
    with pytest.raises(DownloadError, match=r"after 2 attempts.*too slow: \d+ bytes in \d+ s"):
        download_shard(0, data_dir=tmp_path, base_url=url, max_attempts=2, deadline_base_s=1.0, **FAST)
    assert not (tmp_path / shard_filename(0)).exists()


def checksummed_parquet(texts: list[str]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buffer, write_page_checksum=True)
    return buffer.getvalue()


def corrupt(shard: bytes, where: str) -> bytes:
    """`shard` damaged between its PAR1 magic markers, which stay intact."""
    data = bytearray(shard)
    if where == "page":  # one flipped byte halfway through the pages of the first column chunk
        column = pq.ParquetFile(io.BytesIO(shard)).metadata.row_group(0).column(0)
        first_page = column.dictionary_page_offset or column.data_page_offset
        data[first_page + column.total_compressed_size // 2] ^= 0xFF
    else:  # the footer (metadata) overwritten
        footer_len = int.from_bytes(shard[-8:-4], "little")
        data[-8 - footer_len:-8] = b"\xff" * footer_len
    return bytes(data)


@pytest.mark.parametrize("damage", ["page", "footer", "no text column"])
def test_a_shard_with_a_damaged_body_is_not_installed(tmp_path: Path, server: tuple[str, Script],
                                                      damage: str) -> None:
    url, script = server
    shard = checksummed_parquet([f"document {i} " * 40 for i in range(100)])
    if damage == "no text column":
        buffer = io.BytesIO()
        pq.write_table(pa.table({"body": ["a", "b"]}), buffer)
        served = buffer.getvalue()
    else:
        served = corrupt(shard, damage)
    assert served[:4] == served[-4:] == b"PAR1"  # the magic bytes alone would pass it
    script.files[shard_filename(0)] = served
    with pytest.raises(DownloadError, match="after 2 attempts.*not a readable parquet shard"):
        download_shard(0, data_dir=tmp_path, base_url=url, max_attempts=2, **FAST)
    assert len(gets(script)) == 2  # a damaged transfer may be a transient fault: downloaded again
    assert not (tmp_path / shard_filename(0)).exists()
    assert not (tmp_path / (shard_filename(0) + ".partial")).exists()  # the next try starts afresh


def test_main_reports_errors_in_one_line(tmp_path: Path, server: tuple[str, Script],
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server  # serves no shards: 404
    monkeypatch.setenv("NANOCHAT_DATA_URL", url)
    for argv, code, message in ((["-n", "1"], 1, "HTTP 404"), (["-n", "-1"], 2, "--num-shards must be >= 0"),
                                (["-w", "0"], 2, "--workers must be >= 1")):
        with pytest.raises(SystemExit) as info:
            dataset.main([*argv, "--data-dir", str(tmp_path)])
        assert info.value.code == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_shard_is_not_retried(tmp_path: Path, server: tuple[str, Script]) -> None:
    url, script = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_shard(7, data_dir=tmp_path, base_url=url, max_attempts=4, **FAST)
    assert len(gets(script)) == 1


def test_non_parquet_response_is_rejected(tmp_path: Path, server: tuple[str, Script]) -> None:
    url, script = server
    script.files[shard_filename(0)] = b"<html>captive portal login</html>" * 10
    with pytest.raises(DownloadError, match="not a readable parquet shard .missing PAR1"):
        download_shard(0, data_dir=tmp_path, base_url=url, max_attempts=2, **FAST)
    assert list(tmp_path.glob("shard_*.parquet")) == []


def test_offline_gives_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was just free: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        download_shard(0, data_dir=tmp_path, base_url=f"http://127.0.0.1:{port}", max_attempts=2, **FAST)
    message = str(info.value)
    assert "NANOCHAT_DATA_URL" in message and "after 2 attempts" in message
    # No chained urllib/socket traceback: the message alone explains the failure.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        download_shard(0, data_dir=tmp_path, max_attempts=0)
    with pytest.raises(ValueError, match="workers"):
        download_shards(2, workers=0, data_dir=tmp_path)
    for bad in ([0, 2.5], ["1"], True):
        with pytest.raises(ValueError, match="shard index|got a bool"):
            download_shards(bad, data_dir=tmp_path, base_url="http://127.0.0.1:9", max_attempts=1)  # type: ignore[arg-type]
