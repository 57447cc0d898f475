"""Hub tasks (GSM8K, MMLU, ARC, SmolTalk, HumanEval) loaded from parquet exports over HTTP.

A ThreadingHTTPServer on 127.0.0.1 plays the Hub: it answers the parquet-export listing and serves
small parquet files written here in each dataset's real column layout, and records every request.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nanochat_rs.conversation import render_conversation
from nanochat_rs.errors import DownloadError
from nanochat_rs.tasks import ARC, GSM8K, MMLU, HumanEval, SmolTalk
from nanochat_rs.tasks.hub import download_split, split_dir
from nanochat_rs.tokenizer import Tokenizer

LISTING_PREFIX = "/api/datasets/"


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


@dataclass
class FakeHub:
    """What the server serves (path -> body) and the paths it was asked for."""

    url: str = ""
    bodies: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, repo: str, config: str, split: str, files: list[list[dict[str, Any]]]) -> None:
        """Serve `files` (each a list of rows) as the parquet export of (repo, config, split)."""
        urls = []
        for number, rows in enumerate(files):
            path = f"/files/{repo}/{config}/{split}/{number}.parquet"
            self.bodies[path] = parquet_bytes(rows)
            urls.append(self.url + path)
        self.bodies[f"{LISTING_PREFIX}{repo}/parquet/{config}/{split}"] = json.dumps(urls).encode()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        with hub.lock:
            hub.requests.append(self.path)
        body = hub.bodies.get(self.path)
        if body is None:
            self.send_error(404, "not found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake = FakeHub(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.hub = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """HF_ENDPOINT at a port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return endpoint


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    corpus = ["Natalia sold 48/2 = 24 clips in May. Multiple Choice question: what is 2+2? #### 72",
              "def add(a, b):\n    return a + b\nhello, how are you today? I am fine."]
    return Tokenizer.train(corpus * 20, vocab_size=256 + 9 + 50)


NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                "friends in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
              "altogether in April and May.\n#### 72",
}
PRICE = {"question": "What do 3 boxes of 400 cost at $1 each?", "answer": "3*400 = <<3*400=1200>>1200\n#### 1,200"}
NATALIA_PARTS = [
    {"type": "text", "text": "Natalia sold 48/2 = "},
    {"type": "python", "text": "48/2"},
    {"type": "python_output", "text": "24"},
    {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
    {"type": "python", "text": "48+24"},
    {"type": "python_output", "text": "72"},
    {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
]


def by_question(task: Any) -> dict[str, Any]:
    """The task's conversations keyed by their first user message (rows come in a shuffled order)."""
    return {conversation[0]["content"]: conversation for conversation in task}


def test_gsm8k_annotations_become_calculator_calls(hub: FakeHub, tmp_path: Path) -> None:
    hub.publish("openai/gsm8k", "main", "train", [[NATALIA], [PRICE]])  # two files, read as one split
    task = GSM8K("train")
    assert len(task) == 2
    natalia = by_question(task)[NATALIA["question"]]
    assert natalia == [{"role": "user", "content": NATALIA["question"]},
                       {"role": "assistant", "content": NATALIA_PARTS}]
    assert sorted(p.name for p in split_dir("openai/gsm8k", "main", "train").iterdir()) == [
        ".lock", "0.parquet", "1.parquet", "listing.json"]
    assert split_dir("openai/gsm8k", "main", "train") == tmp_path / "task_data" / "openai__gsm8k" / "main" / "train"


def test_gsm8k_evaluate_compares_the_last_number(hub: FakeHub) -> None:
    hub.publish("openai/gsm8k", "main", "test", [[NATALIA, PRICE]])
    task = GSM8K("test")
    natalia, price = by_question(task)[NATALIA["question"]], by_question(task)[PRICE["question"]]
    assert task.evaluate(natalia, "48/2 = 24, 48 + 24 = 72. The answer is 72.")
    assert not task.evaluate(natalia, "72 clips? No: 73")
    assert not task.evaluate(natalia, "I do not know")
    assert task.evaluate(price, "It costs $1200")  # commas are not part of the number
    assert task.evaluate(price, "#### 1,200")
    assert not task.evaluate(price, "1,201")
    with pytest.raises(TypeError, match="completion must be a str"):
        task.evaluate(price, 1200)  # type: ignore[arg-type]


def test_a_second_load_makes_no_request(hub: FakeHub) -> None:
    hub.publish("openai/gsm8k", "main", "train", [[NATALIA], [PRICE]])
    GSM8K("train")
    assert len(hub.requests) == 3  # the listing and two files
    assert len(GSM8K("train")) == 2
    assert len(hub.requests) == 3


def test_an_interrupted_download_fetches_only_what_is_missing(hub: FakeHub) -> None:
    hub.publish("openai/gsm8k", "main", "train", [[NATALIA], [PRICE]])
    download_split("openai/gsm8k", "main", "train")
    (split_dir("openai/gsm8k", "main", "train") / "1.parquet").unlink()
    hub.requests.clear()
    assert len(GSM8K("train")) == 2
    assert hub.requests == ["/files/openai/gsm8k/main/train/1.parquet"]


def test_offline_without_local_files_is_one_clear_error(offline: str) -> None:
    directory = split_dir("openai/gsm8k", "main", "train")
    with pytest.raises(DownloadError) as error:
        download_split("openai/gsm8k", "main", "train", max_attempts=2, backoff_s=0.0)
    message = str(error.value)
    assert "HF_ENDPOINT" in message and offline in message and str(directory) in message


def test_files_placed_by_hand_are_used_offline(offline: str) -> None:
    directory = split_dir("openai/gsm8k", "main", "test")
    directory.mkdir(parents=True)
    (directory / "train-0.parquet").write_bytes(parquet_bytes([NATALIA, PRICE]))
    task = GSM8K("test")
    assert by_question(task)[NATALIA["question"]][1]["content"] == NATALIA_PARTS


def test_a_listing_of_bad_names_is_refused(hub: FakeHub) -> None:
    hub.bodies[f"{LISTING_PREFIX}openai/gsm8k/parquet/main/train"] = json.dumps([hub.url + "/files/x/.."]).encode()
    with pytest.raises(DownloadError, match="not distinct"):
        GSM8K("train")


def test_unknown_splits_list_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"\('train', 'test'\), got 'validation'"):
        GSM8K("validation")
    with pytest.raises(ValueError, match=r"\('all', 'auxiliary_train'\), got 'high_school'"):
        MMLU("high_school", "test")
    with pytest.raises(ValueError, match=r"\('train',\), got 'test'"):
        MMLU("auxiliary_train", "test")


def test_malformed_rows_are_named(hub: FakeHub) -> None:
    hub.publish("openai/gsm8k", "main", "train", [[{"question": "q", "answer": "no final line"}]])
    with pytest.raises(ValueError, match=r"openai/gsm8k main/train row 0 is malformed: .*####"):
        GSM8K("train")[0]
    hub.publish("openai/gsm8k", "main", "test", [[{"question": "q", "answer": "<<2+2>>4\n#### 4"}]])
    with pytest.raises(ValueError, match=r"row 0 is malformed: annotation <<2\+2>>"):
        GSM8K("test")[0]
    hub.publish("cais/mmlu", "all", "test", [[MMLU_ROW, {**MMLU_ROW, "answer": 4}]])
    with pytest.raises(ValueError, match=r"cais/mmlu all/test row 1 is malformed: answer"):
        [MMLU("all", "test")[i] for i in range(2)]


def test_a_file_without_the_columns_is_named(hub: FakeHub) -> None:
    hub.publish("openai/gsm8k", "main", "train", [[{"question": "q", "solution": "s"}]])
    with pytest.raises(ValueError, match=r"0\.parquet lacks the column\(s\) \['answer'\]"):
        GSM8K("train")


MMLU_ROW = {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"],
            "answer": 1}
MMLU_PROMPT = ("Multiple Choice question: What is 2 + 2?\n- 3=A\n- 4=B\n- 5=C\n- 22=D\n\n"
               "Respond only with the letter of the correct answer.")


def test_mmlu_renders_the_choices_and_answers_a_letter(hub: FakeHub) -> None:
    hub.publish("cais/mmlu", "all", "validation", [[MMLU_ROW]])
    task = MMLU("all", "validation")
    assert task.eval_type == "categorical" and task.letters == ("A", "B", "C", "D")
    assert task[0] == [{"role": "user", "content": MMLU_PROMPT}, {"role": "assistant", "content": "B"}]
    assert task.evaluate(task[0], "B") and task.evaluate(task[0], " B\n")
    assert not task.evaluate(task[0], "A") and not task.evaluate(task[0], "4")


def test_mmlu_auxiliary_train_rows_are_unwrapped(hub: FakeHub) -> None:
    hub.publish("cais/mmlu", "auxiliary_train", "train", [[{"train": MMLU_ROW}]])
    assert MMLU("auxiliary_train", "train")[0][0]["content"] == MMLU_PROMPT


def supervised_tokens(tok: Tokenizer, conversation: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids whose mask is 1, ids whose mask is 0) of the rendered conversation."""
    ids, mask = render_conversation(tok, conversation)
    return [i for i, m in zip(ids, mask, strict=True) if m], [i for i, m in zip(ids, mask, strict=True) if not m]


def test_rendering_supervises_tool_calls_but_not_their_outputs(hub: FakeHub, tok: Tokenizer) -> None:
    hub.publish("openai/gsm8k", "main", "train", [[NATALIA]])
    hub.publish("cais/mmlu", "all", "test", [[MMLU_ROW]])
    supervised, context = supervised_tokens(tok, GSM8K("train")[0])
    special = tok.encode_special
    assert supervised.count(special("<|python_start|>")) == 2 and special("<|output_start|>") not in supervised
    assert context.count(special("<|output_start|>")) == 2 and special("<|python_start|>") not in context
    supervised, _ = supervised_tokens(tok, MMLU("all", "test")[0])
    assert supervised == tok.encode("B") + [special("<|assistant_end|>")]


ARC_DIGITS = {"question": "Which is a mammal?", "answerKey": "3",
              "choices": {"text": ["trout", "eagle", "whale"], "label": ["1", "2", "3"]}}
ARC_LETTERS = {"question": "Which gas do plants take in?", "answerKey": "E",
               "choices": {"text": ["O2", "N2", "He", "Ar", "CO2"], "label": ["A", "B", "C", "D", "E"]}}


def by_question_in_prompt(task: Any, word: str) -> Any:
    return next(conversation for conversation in task if word in conversation[0]["content"])


def test_arc_relabels_choices_as_letters(hub: FakeHub, tok: Tokenizer) -> None:
    hub.publish("allenai/ai2_arc", "ARC-Challenge", "test", [[ARC_DIGITS, ARC_LETTERS]])
    task = ARC("ARC-Challenge", "test")
    assert task.eval_type == "categorical"
    mammal, gas = by_question_in_prompt(task, "mammal"), by_question_in_prompt(task, "gas")
    assert mammal == [{"role": "user", "content": "Multiple Choice question: Which is a mammal?\n- trout=A\n"
                       "- eagle=B\n- whale=C\n\nRespond only with the letter of the correct answer."},
                      {"role": "assistant", "content": "C"}]
    assert gas[0]["content"].endswith("- CO2=E\n\nRespond only with the letter of the correct answer.")
    assert task.evaluate(mammal, "C") and not task.evaluate(mammal, "3") and task.evaluate(gas, "E")
    assert supervised_tokens(tok, mammal)[0] == [*tok.encode("C"), tok.encode_special("<|assistant_end|>")]
    with pytest.raises(ValueError, match=r"got 'ARC'"):
        ARC("ARC", "test")


def test_arc_rows_with_an_unknown_answer_key_are_named(hub: FakeHub) -> None:
    hub.publish("allenai/ai2_arc", "ARC-Easy", "train", [[{**ARC_DIGITS, "answerKey": "D"}]])
    with pytest.raises(ValueError, match=r"ARC-Easy/train row 0 is malformed: answerKey 'D'"):
        ARC("ARC-Easy", "train")[0]


SMOL = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
    {"messages": [{"role": "user", "content": "no reply"}]},
    {"messages": [{"role": "assistant", "content": "starts wrong"}, {"role": "user", "content": "hm"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
]


def test_smoltalk_keeps_conversations_and_skips_malformed_ones(hub: FakeHub, tok: Tokenizer) -> None:
    hub.publish("HuggingFaceTB/smol-smoltalk", "default", "train", [SMOL[:3], SMOL[3:]])
    task = SmolTalk("train")
    assert task.skipped == 3 and len(task) == 2
    assert sorted(map(str, task)) == sorted(str(row["messages"]) for row in SMOL[:2])
    assert [conversation[0]["role"] for conversation in SmolTalk("train")] == [c[0]["role"] for c in task]
    for conversation in task:
        supervised, _ = supervised_tokens(tok, conversation)
        replies = [m["content"] for m in conversation if m["role"] == "assistant"]
        end = tok.encode_special("<|assistant_end|>")
        assert supervised == [t for reply in replies for t in [*tok.encode(reply), end]]


HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add a and b.\"\"\"\n",
             "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
             "entry_point": "add"}


def test_humaneval_judges_completions_by_running_the_tests_in_the_sandbox(hub: FakeHub, tok: Tokenizer) -> None:
    hub.publish("openai/openai_humaneval", "openai_humaneval", "test", [[HUMANEVAL]])
    task = HumanEval()
    assert task[0] == [{"role": "user", "content": HUMANEVAL["prompt"]},
                       {"role": "assistant", "content": HUMANEVAL["prompt"] + "\n" + HUMANEVAL["canonical_solution"]}]
    supervised, _ = supervised_tokens(tok, task[0])
    assert supervised == tok.encode(task[0][1]["content"]) + [tok.encode_special("<|assistant_end|>")]
    right = {
        "the reference reply": task[0][1]["content"],
        "the whole function": "def add(a, b):\n    return a + b\n",
        "only the body, as HumanEval continues the prompt": HUMANEVAL["canonical_solution"],
        "fenced code among prose": "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nThe sum.",
    }
    wrong = {
        "a wrong function": "def add(a, b):\n    return a - b\n",
        "prose only": "Just add them.",
        "exiting before the tests run": "import sys\nsys.exit(0)\n",
        "wrong code in the first fence": "```python\ndef add(a, b):\n    return a * b\n```\n```python\ndef add(a, b):\n"
                                         "    return a + b\n```",
    }
    assert {name: task.evaluate(task[0], reply) for name, reply in right.items()} == dict.fromkeys(right, True)
    assert {name: task.evaluate(task[0], reply) for name, reply in wrong.items()} == dict.fromkeys(wrong, False)
    with pytest.raises(ValueError, match="does not start with the prompt"):
        task.evaluate([{"role": "user", "content": "def sub(a, b):"}], "def sub(a, b):\n    return a - b")
    with pytest.raises(TypeError, match="completion must be a str"):
        task.evaluate(task[0], None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\('test',\), got 'train'"):
        HumanEval("train")
