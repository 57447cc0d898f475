"""Spec for core_eval.py: the CORE metric over a bundle in the DCLM format.

Every test builds its own bundle in tmp_path. Accuracies are checked against a "successor" model whose
losses are known by construction: with a byte-level tokenizer each ASCII character is one token, and
after byte x the model gives byte x + 1 the logit 10 and every other token 0. Predicting the next
letter of the alphabet then costs ~0.01 nats and anything else ~10, so the choice whose scored span has
the fewest non-successor steps wins, and a language-modelling item is right exactly when its
continuation continues the alphabet. A random tiny GPT checks the batched scorer against the
one-item-at-a-time reference. Downloads run against an HTTP server on 127.0.0.1 started by the test.

Run as a script, this file is one rank of the two-process test (see `test_two_ranks_split_the_items`).
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from nanochat_rs import core_eval
from nanochat_rs.core_eval import (
    BUNDLE_URL_ENV,
    CoreTask,
    centered_accuracy,
    core_metric,
    ensure_eval_bundle,
    eval_bundle_dir,
    evaluate_core,
    evaluate_task,
    evaluate_task_reference,
    fewshot_indices,
    load_bundle,
    parse_yaml_subset,
    render_prompts,
    score_task,
    score_task_reference,
)
from nanochat_rs.errors import DownloadError
from nanochat_rs.gpt import GPTConfig
from nanochat_rs.kv_cache import KVCache
from nanochat_rs.tokenizer import Tokenizer

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # model_helpers, also when this file runs as a rank script
from model_helpers import random_gpt  # noqa: E402

SURE_LOGIT = 10.0
FAST = dict(backoff_s=0.0, timeout_s=5.0)


def byte_tokenizer() -> Tokenizer:
    """No merges: every byte is its own token, so token positions are character positions."""
    return Tokenizer([bytes([b]) for b in range(256)])


class SuccessorModel(nn.Module):
    """Logits depend only on the current token: byte x predicts byte x + 1. Records every input batch.

    It has the interface the batched scorer uses (GPT's `kv_cache` and `logits_at`, and a `config` that
    shapes a one-layer KVCache); attending to nothing, it only advances the cache."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        table = torch.zeros(vocab_size, vocab_size)
        for x in range(255):
            table[x, x + 1] = SURE_LOGIT
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(n_layer=1, n_kv_head=1, head_dim=2, n_embd=2)  # no sequence_len: no crop
        self.inputs: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor, kv_cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(ids.clone())
        if kv_cache is not None:
            kv_cache.advance(ids.size(1))
        logits = self.table[ids]
        return logits if logits_at is None else logits[logits_at]


# ---- bundles ----------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    label: str
    task_type: str
    items: list[dict[str, Any]]
    baseline: float
    num_fewshot: int = 0
    delimiter: str | None = " "


def write_bundle(root: Path, specs: list[TaskSpec]) -> Path:
    """A bundle in the DCLM layout: core.yaml, eval_data/<label>/items.jsonl, eval_meta_data.csv."""
    lines = ["# tasks of this test", "icl_tasks:"]
    for spec in specs:
        lines += [f"- label: {spec.label}", f"  dataset_uri: {spec.label}/items.jsonl",
                  f"  num_fewshot: [{spec.num_fewshot}]", f"  icl_task_type: {spec.task_type}"]
        if spec.delimiter is not None:
            lines.append(f"  continuation_delimiter: {json.dumps(spec.delimiter)}  # between context and answer")
        data = root / "eval_data" / spec.label / "items.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(item) + "\n" for item in spec.items), encoding="utf-8")
    (root / "core.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ["Eval Task,Task Category,Random baseline"] + [f"{s.label},test,{s.baseline}" for s in specs]
    (root / "eval_meta_data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


# Hand-counted with the successor model ("bad" = a step that is not to the next letter; the lowest
# fraction of bad steps over the scored span wins).
HAND_MC = TaskSpec("mc", "multiple_choice", baseline=25.0, items=[
    # after the common prefix "<bos>q ": "abc" has 1 bad step of 3, "xzy" 3 of 3 -> 0, right
    {"query": "q", "choices": ["abc", "xzy"], "gold": 0},
    # the prefix now covers "mn": "o" follows n, "q" does not -> 0, but gold is 1: wrong
    {"query": "q", "choices": ["mno", "mnq"], "gold": 1},
    # "hij" 1/3, "hik" 2/3, "ab" 1/2 -> 0, right
    {"query": "q", "choices": ["hij", "hik", "ab"], "gold": 0},
])
HAND_SCHEMA = TaskSpec("schema", "schema", baseline=50.0, delimiter="", items=[
    # common suffix "cd": "ab|cd" has b->c, c->d (0 bad); "xy|cd" y->c bad -> 0, right
    {"context_options": ["ab", "xy"], "continuation": "cd", "gold": 0},
    # "pq|tu": q->t bad; "rs|tu": s->t good -> 1, but gold is 0: wrong
    {"context_options": ["pq", "rs"], "continuation": "tu", "gold": 0},
])
HAND_LM = TaskSpec("lm", "language_modeling", baseline=0.0, delimiter="", items=[
    {"context": "abc", "continuation": "def"},  # c->d->e->f: right
    {"context": "abc", "continuation": "dxf"},  # d->x: wrong
    {"context": "  abc \n", "continuation": "de"},  # the context is stripped first: right
])
HAND_ACCURACY = {"mc": 2 / 3, "schema": 1 / 2, "lm": 2 / 3}


@pytest.fixture
def hand_bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle", [HAND_MC, HAND_SCHEMA, HAND_LM])


def task_of(spec: TaskSpec, items: list[dict[str, Any]] | None = None) -> CoreTask:
    """A CoreTask in file order (no shuffle), for tests that look at particular items."""
    return CoreTask(spec.label, spec.task_type, spec.num_fewshot, spec.delimiter or "", spec.baseline,
                    tuple(items if items is not None else spec.items))


# ---- the metric ---------------------------------------------------------------------------------


def test_accuracies_match_the_hand_counted_ones(hand_bundle: Path) -> None:
    tokenizer = byte_tokenizer()
    model = SuccessorModel(tokenizer.vocab_size)
    result = evaluate_core(model, tokenizer, bundle_dir=hand_bundle, log=None)
    assert result.accuracy == HAND_ACCURACY
    assert result.centered == pytest.approx({"mc": (2 / 3 - 0.25) / 0.75, "schema": 0.0, "lm": 2 / 3})
    assert result.core == pytest.approx(((2 / 3 - 0.25) / 0.75 + 0.0 + 2 / 3) / 3)
    for task in load_bundle(hand_bundle):
        assert evaluate_task_reference(model, tokenizer, task) == HAND_ACCURACY[task.label]


def test_centered_accuracy_maps_chance_to_zero_and_perfect_to_one() -> None:
    assert centered_accuracy(0.25, 25.0) == 0.0
    assert centered_accuracy(1.0, 25.0) == 1.0
    assert centered_accuracy(0.5, 25.0) == pytest.approx(1 / 3)
    assert centered_accuracy(0.1, 25.0) == pytest.approx(-0.2)  # below chance is negative
    assert centered_accuracy(0.7, 0.0) == 0.7
    assert core_metric({"a": 0.5, "b": 0.0, "c": -0.2}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="percentage"):
        centered_accuracy(0.5, 100.0)
    with pytest.raises(ValueError, match="at least one"):
        core_metric({})


def test_an_empty_scored_span_never_wins() -> None:
    # "ab" is the common prefix itself, so choice 0 scores no tokens (a NaN mean loss): choice 1 wins
    spec = TaskSpec("mc", "multiple_choice", baseline=50.0, delimiter="",
                    items=[{"query": "q", "choices": ["ab", "abc"], "gold": 1}])
    tokenizer = byte_tokenizer()
    model = SuccessorModel(tokenizer.vocab_size)
    assert score_task(model, tokenizer, task_of(spec)) == {0: True}
    assert score_task_reference(model, tokenizer, task_of(spec)) == {0: True}


# ---- prompts and few-shot ---------------------------------------------------------------------


def test_fewshot_draw_is_nanochats_seeded_sample_without_the_item() -> None:
    for num_items in (2, 5, 40):
        for idx in range(num_items):
            for shots in (0, 1, 3, 10):
                drawn = fewshot_indices(num_items, idx, shots)
                others = [i for i in range(num_items) if i != idx]
                count = min(shots, num_items - 1)
                expected = random.Random(1234 + idx).sample(others, count) if count else []
                assert drawn == expected
                assert idx not in drawn and len(set(drawn)) == count
                assert fewshot_indices(num_items, idx, shots) == drawn  # seeded: the same every time


def test_prompts_render_examples_then_the_item() -> None:
    mc = task_of(TaskSpec("mc", "multiple_choice", baseline=25.0, num_fewshot=2, delimiter=" -> ", items=[
        {"query": "Q0", "choices": ["a0", "b0"], "gold": 1},
        {"query": "Q1", "choices": ["a1", "b1"], "gold": 0},
        {"query": "Q2", "choices": ["a2", "b2"], "gold": 0},
    ]))
    one, two = (mc.items[i] for i in fewshot_indices(3, 0, 2))
    shots = f"{one['query']} -> {one['choices'][one['gold']]}\n\n{two['query']} -> {two['choices'][two['gold']]}\n\n"
    assert sorted([one["query"], two["query"]]) == ["Q1", "Q2"]
    assert render_prompts(mc, 0) == [shots + "Q0 -> a0", shots + "Q0 -> b0"]

    schema = task_of(TaskSpec("schema", "schema", baseline=50.0, num_fewshot=1, items=[
        {"context_options": ["He", "She"], "continuation": "ran.", "gold": 1},
        {"context_options": ["It", "They"], "continuation": "sat.", "gold": 0},
    ]))
    assert render_prompts(schema, 0) == ["It sat.\n\nHe ran.", "It sat.\n\nShe ran."]

    lm = task_of(TaskSpec("lm", "language_modeling", baseline=0.0, num_fewshot=1, items=[
        {"context": " The sky is ", "continuation": "blue"},
        {"context": "Grass is\n", "continuation": "green"},
    ]))
    # contexts are stripped; the prompt without the continuation loses its trailing delimiter too
    assert render_prompts(lm, 0) == ["Grass is green\n\nThe sky is", "Grass is green\n\nThe sky is blue"]


def test_items_come_in_nanochats_shuffled_order_and_max_per_task_takes_a_prefix(tmp_path: Path) -> None:
    items = [{"context": f"c{i}", "continuation": f"x{i}"} for i in range(20)]
    bundle = write_bundle(tmp_path, [TaskSpec("lm", "language_modeling", baseline=0.0, items=items)])
    shuffled = list(items)
    random.Random(1337).shuffle(shuffled)
    assert list(load_bundle(bundle)[0].items) == shuffled
    assert list(load_bundle(bundle, max_per_task=3)[0].items) == shuffled[:3]


# ---- batching and cropping ----------------------------------------------------------------------


def random_words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5))) for _ in range(count))


def random_tasks(seed: int = 0, num_items: int = 8) -> list[CoreTask]:
    rng = random.Random(seed)
    mc = [{"query": random_words(rng, rng.randint(2, 12)),
           "choices": [random_words(rng, rng.randint(1, 4)) for _ in range(rng.randint(2, 4))], "gold": 0}
          for _ in range(num_items)]
    schema = [{"context_options": [random_words(rng, rng.randint(1, 6)) for _ in range(2)],
               "continuation": random_words(rng, rng.randint(1, 3)), "gold": rng.randint(0, 1)}
              for _ in range(num_items)]
    lm = [{"context": random_words(rng, rng.randint(1, 8)), "continuation": random.choice(["a", "ab", "b c"])}
          for _ in range(num_items)]
    for item in mc:
        item["gold"] = rng.randrange(len(item["choices"]))
    return [CoreTask("mc", "multiple_choice", 2, " ", 25.0, tuple(mc)),
            CoreTask("schema", "schema", 1, " ", 50.0, tuple(schema)),
            CoreTask("lm", "language_modeling", 0, "", 0.0, tuple(lm))]


def test_batched_scoring_equals_one_item_at_a_time_on_a_random_gpt() -> None:
    tokenizer = byte_tokenizer()
    model = random_gpt(GPTConfig(sequence_len=96, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                                 n_embd=32))
    model.train()  # scoring must switch to eval mode and back
    outcomes = set()
    for task in random_tasks():
        # 64 < the longest few-shot prompts: cropping is exercised too
        reference = score_task_reference(model, tokenizer, task, max_seq_len=64)
        for batch_tokens in (40, 100_000):  # many small batches (a long sequence alone), one batch
            assert score_task(model, tokenizer, task, max_seq_len=64, batch_tokens=batch_tokens) == reference
        outcomes |= set(reference.values())
    assert outcomes == {True, False}  # the comparison saw both verdicts
    assert model.training


def test_a_shared_context_runs_once_and_each_choice_continues_from_its_kv_cache() -> None:
    # After the 402 shared tokens "<bos>q...q ", "abc" has 1 bad step of 3 (the space -> a), "mno" too and
    # "xzy" 3: item 0 is right, item 1 wrong (the tie goes to the first choice, mno is gold).
    spec = TaskSpec("mc", "multiple_choice", baseline=25.0, items=[
        {"query": "q" * 400, "choices": ["abc", "xzy", "abd", "mno"], "gold": 0},
        {"query": "r" * 400, "choices": ["abc", "xzy", "abd", "mno"], "gold": 3},
    ])
    tokenizer = byte_tokenizer()
    model = SuccessorModel(tokenizer.vocab_size)
    assert score_task(model, tokenizer, task_of(spec)) == {0: True, 1: False}
    # the 401 tokens before the first scored output run once per item; the 8 choices go on from there
    assert [tuple(ids.shape) for ids in model.inputs] == [(2, 401), (8, 4)]
    assert score_task_reference(model, tokenizer, task_of(spec)) == {0: True, 1: False}


def test_shared_beginnings_are_scored_as_one_item_at_a_time_on_a_random_gpt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few-shot multiple-choice and schema items run the beginning their sequences share once, from a KV cache
    copied out to every sequence, and are judged exactly as the reference judges them."""
    monkeypatch.setattr(core_eval, "FORWARD_COST_TOKENS", 16)  # forwards priced low: every beginning is shared
    tokenizer = byte_tokenizer()
    model = random_gpt(GPTConfig(sequence_len=512, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                                 n_embd=32))
    cached: list[bool] = []
    model.register_forward_hook(lambda _module, _args, kwargs, _out: cached.append(kwargs.get("kv_cache") is not None),
                                with_kwargs=True)
    outcomes = set()
    for task in random_tasks(seed=1, num_items=12)[:2]:  # multiple choice (2-shot) and schema (1-shot)
        reference = score_task_reference(model, tokenizer, task)
        for batch_tokens in (1_000, 100_000):  # a few items per batch, as the planner likes
            cached.clear()
            assert score_task(model, tokenizer, task, batch_tokens=batch_tokens) == reference
            assert any(cached)  # the shared path was taken
        outcomes |= set(reference.values())
    assert outcomes == {True, False}


def test_long_prompts_lose_tokens_on_the_left_and_keep_their_span(tmp_path: Path) -> None:
    # The step into the continuation is z->c->d... only if the span is found where it now is; one token
    # early it would start with the bad step z->c and the item would be wrong.
    items = [{"context": "y" * 40 + "zc", "continuation": "def"}, {"context": "abc", "continuation": "dxf"}]
    task = CoreTask("lm", "language_modeling", 0, "", 0.0, tuple(items))
    tokenizer = byte_tokenizer()
    for score in (score_task, score_task_reference):
        model = SuccessorModel(tokenizer.vocab_size)
        assert score(model, tokenizer, task, max_seq_len=16) == {0: True, 1: False}
        assert max(ids.shape[1] for ids in model.inputs) <= 16
    seen = SuccessorModel(tokenizer.vocab_size)
    score_task_reference(seen, tokenizer, task, max_seq_len=16)
    full = tokenizer.encode("y" * 40 + "zcdef", prepend=tokenizer.bos_token_id)
    assert seen.inputs[0][0].tolist() == full[-16:]  # the last 16 tokens: BOS and the start are gone


def test_a_span_longer_than_the_context_is_a_clear_error() -> None:
    task = CoreTask("lm", "language_modeling", 0, "", 0.0, ({"context": "ab", "continuation": "cdefgh"},))
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="'lm' item 0: its 6 scored tokens .* do not fit the model context of 6"):
        score_task(SuccessorModel(tokenizer.vocab_size), tokenizer, task, max_seq_len=6)


def test_the_context_defaults_to_the_models_sequence_len() -> None:
    tokenizer = byte_tokenizer()
    model = random_gpt(GPTConfig(sequence_len=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                                 n_embd=32))
    calls: list[int] = []
    model.register_forward_hook(lambda _module, args, _out: calls.append(args[0].shape[1]))
    task = CoreTask("lm", "language_modeling", 0, " ", 0.0, ({"context": "word " * 20, "continuation": "x"},))
    score_task(model, tokenizer, task)
    assert calls == [16]


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_tokens=0), "batch_tokens"),
    (dict(max_seq_len=1), "max_seq_len"),
])
def test_bad_arguments_are_value_errors(kwargs: dict[str, Any], message: str) -> None:
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match=message):
        score_task(SuccessorModel(tokenizer.vocab_size), tokenizer, task_of(HAND_LM), **kwargs)


def test_max_per_task_must_be_positive(hand_bundle: Path) -> None:
    with pytest.raises(ValueError, match="max_per_task"):
        load_bundle(hand_bundle, max_per_task=0)


# ---- bad bundles --------------------------------------------------------------------------------


def edit(path: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        target = root / path
        text = target.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {target}"
        target.write_text(text.replace(old, new, 1), encoding="utf-8")
    return apply


def delete(path: str) -> Callable[[Path], None]:
    return lambda root: (root / path).unlink()


@pytest.mark.parametrize("damage, message", [
    (delete("core.yaml"), "core.yaml is missing"),
    (delete("eval_meta_data.csv"), "eval_meta_data.csv is missing"),
    (delete("eval_data/schema/items.jsonl"), "items.jsonl is missing"),
    (edit("core.yaml", "icl_tasks:", "tasks:"), "'icl_tasks'"),
    (edit("core.yaml", "  dataset_uri: mc/items.jsonl\n", ""), r"icl_tasks\[0\]: missing key\(s\) \['dataset_uri'\]"),
    (edit("core.yaml", "icl_task_type: schema", "icl_task_type: generation"), "unknown icl_task_type 'generation'"),
    (edit("core.yaml", "num_fewshot: [0]", "num_fewshot: [-1]"), "num_fewshot"),
    (edit("core.yaml", "mc/items.jsonl", "../../outside.jsonl"), "outside eval_data"),
    (edit("core.yaml", "- label: lm", "- label: mc"), "labels repeat"),
    (edit("core.yaml", "icl_tasks:", "icl_tasks: &anchor"), "core.yaml line 2: values starting with '&'"),
    (edit("eval_meta_data.csv", "schema,test,50.0\n", ""), "no row for task 'schema'"),
    (edit("eval_meta_data.csv", "schema,test,50.0", "schema,test,fifty"), "'fifty' is not a number"),
    (edit("eval_meta_data.csv", "Random baseline", "Baseline"), "no column"),
    (edit("eval_meta_data.csv", "lm,test,0.0", "lm,test,100"), r"percentage in \[0, 100\)"),
    (edit("eval_data/mc/items.jsonl", '"choices": ["abc", "xzy"]', '"choices": ["abc"]'),
     "items.jsonl line 1: 'choices' must offer at least 2 options, got 1"),
    (edit("eval_data/mc/items.jsonl", '"gold": 0}', '"gold": 2}'), "'gold' must be an index into the 2 options"),
    (edit("eval_data/mc/items.jsonl", '"query": "q", ', ""), "a multiple_choice item needs 'query'"),
    (edit("eval_data/schema/items.jsonl", '"continuation": "cd"', '"continuation": null'),
     "'continuation' must be a string"),
    (edit("eval_data/lm/items.jsonl", '"continuation": "def"', '"continuation": ""'), "'continuation' is empty"),
    (edit("eval_data/lm/items.jsonl", '{"context": "abc", "continuation": "dxf"}', "{not json"),
     "items.jsonl line 2: not JSON"),
])
def test_a_bad_bundle_is_one_clear_value_error(hand_bundle: Path, damage: Callable[[Path], None],
                                               message: str) -> None:
    damage(hand_bundle)
    with pytest.raises(ValueError, match=message) as raised:
        load_bundle(hand_bundle)
    assert raised.value.args[0].startswith("bad CORE eval bundle") or "core.yaml line" in raised.value.args[0]


# ---- the YAML reader ----------------------------------------------------------------------------

DCLM_STYLE_YAML = """\
---
# comment lines and trailing comments are ignored
icl_tasks:
-
  label: jeopardy
  dataset_uri: world_knowledge/jeopardy_all.jsonl # the whole set
  num_fewshot: [10, 5]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: " # this separates questions from answers
  has_categories: true
- label: 'it''s a: test'
  dataset_uri: "a b.jsonl"
  num_fewshot:
  - 0
  - 1
  icl_task_type: multiple_choice
  continuation_delimiter: ''
  extra: ~
  weight: -1.5
  url: http://host:80/path#frag
  empty:
  list: ["x, y", 'z', 3]
other:
  nested:
    deep: value with spaces
  items:
    - a
    - - b
      - c
"""


def test_yaml_reader_agrees_with_pyyaml_on_the_core_yaml_subset() -> None:
    yaml = pytest.importorskip("yaml")
    ours = parse_yaml_subset(DCLM_STYLE_YAML)
    assert ours == yaml.safe_load(DCLM_STYLE_YAML)
    assert ours["icl_tasks"][0]["continuation_delimiter"] == "\nAnswer: "


def test_yaml_reader_reads_the_subset_without_pyyaml() -> None:
    parsed = parse_yaml_subset(DCLM_STYLE_YAML)
    assert parsed["icl_tasks"][1] == {
        "label": "it's a: test", "dataset_uri": "a b.jsonl", "num_fewshot": [0, 1],
        "icl_task_type": "multiple_choice", "continuation_delimiter": "", "extra": None, "weight": -1.5,
        "url": "http://host:80/path#frag", "empty": None, "list": ["x, y", "z", 3]}
    assert parsed["other"] == {"nested": {"deep": "value with spaces"}, "items": ["a", ["b", "c"]]}
    assert parse_yaml_subset("# nothing\n") is None


@pytest.mark.parametrize("text, line, message", [
    ("a: |\n  block\n", 1, "values starting with '|'"),
    ("a: {b: 1}\n", 1, "values starting with '{'"),
    ("a: *ref\n", 1, "values starting with '\\*'"),
    ("a: [[1], 2]\n", 1, "nested collections"),
    ("a: [1, 2\n", 1, "not closed"),
    ("a: 'open\n", 1, "not closed"),
    ('a: "bad \\q escape"\n', 1, "unknown escape"),
    ("a: 'x' y\n", 1, "unexpected text"),
    ("a: 1\n  b: 2\n", 2, "unexpected indentation"),
    ("a: 1\na: 2\n", 2, "duplicate key 'a'"),
    ("a:\n\t- 1\n", 2, "tabs"),
    ("just words\n", 1, "expected 'key: value'"),
])
def test_yaml_outside_the_subset_is_a_value_error_naming_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"core.yaml line {line}: .*{message}"):
        parse_yaml_subset(text, "core.yaml")


# ---- download ---------------------------------------------------------------------------------


@dataclass
class Script:
    """What the test server serves and how it misbehaves; it records every request (path, Range)."""

    body: bytes = b""
    truncate_first: int = 0  # send only half the body (with the full Content-Length) this many times
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        script: Script = self.server.script  # type: ignore[attr-defined]
        with script.lock:
            script.requests.append((self.path, self.headers.get("Range")))
            truncate = script.truncate_first > 0
            script.truncate_first -= truncate
        if self.path != "/eval_bundle.zip":
            self.send_error(404, "not found")
            return
        start = 0
        if range_header := self.headers.get("Range"):
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(script.body) - 1}/{len(script.body)}")
        else:
            self.send_response(200)
        payload = script.body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[:len(payload) // 2] if truncate else payload)
        self.close_connection = True


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Script]:
    """A server for the bundle zip; NANOCHAT_BASE_DIR and NANOCHAT_EVAL_BUNDLE_URL point at tmp_path and it."""
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.script = script  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv(BUNDLE_URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/eval_bundle.zip")
    try:
        yield script
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def zipped(bundle: Path, top: str = "eval_bundle") -> bytes:
    """The bundle as nanochat's zip holds it: everything under one top-level folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                archive.write(path, f"{top}/{path.relative_to(bundle)}")
    return buffer.getvalue()


def leftovers(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.name != "eval_bundle.lock")


def test_the_bundle_is_downloaded_once_unpacked_and_evaluated(hand_bundle: Path, server: Script,
                                                              tmp_path: Path) -> None:
    server.body = zipped(hand_bundle)
    tokenizer = byte_tokenizer()
    result = evaluate_core(SuccessorModel(tokenizer.vocab_size), tokenizer, log=None)  # no bundle_dir: download
    assert result.accuracy == HAND_ACCURACY
    assert eval_bundle_dir() == tmp_path / "base" / "eval_bundle"
    assert (eval_bundle_dir() / "core.yaml").read_bytes() == (hand_bundle / "core.yaml").read_bytes()
    assert leftovers(tmp_path / "base") == ["eval_bundle"]  # no zip, partial or staging folder left
    assert ensure_eval_bundle(**FAST) == eval_bundle_dir()
    assert len(server.requests) == 1  # the second call found the bundle


def test_an_interrupted_download_resumes_with_range(hand_bundle: Path, server: Script) -> None:
    server.body = zipped(hand_bundle)
    server.truncate_first = 1
    ensure_eval_bundle(**FAST)
    assert [r for _, r in server.requests] == [None, f"bytes={len(server.body) // 2}-"]
    assert len(load_bundle(eval_bundle_dir())) == 3


def test_a_failed_download_leaves_no_bundle_and_keeps_its_partial(hand_bundle: Path, server: Script,
                                                                  tmp_path: Path) -> None:
    server.body = zipped(hand_bundle)
    server.truncate_first = 2
    with pytest.raises(DownloadError, match="after 2 attempts"):
        ensure_eval_bundle(max_attempts=2, **FAST)
    assert leftovers(tmp_path / "base") == ["eval_bundle.zip.partial"]  # kept to be resumed
    ensure_eval_bundle(**FAST)  # the next run finishes it
    assert server.requests[-1][1] is not None
    assert leftovers(tmp_path / "base") == ["eval_bundle"]


def test_a_damaged_archive_is_never_unpacked(hand_bundle: Path, server: Script, tmp_path: Path) -> None:
    good = zipped(hand_bundle)
    server.body = good[:100] + bytes(b ^ 0xFF for b in good[100:200]) + good[200:]  # CRC mismatch inside
    with pytest.raises(DownloadError, match="not a readable zip archive"):
        ensure_eval_bundle(max_attempts=2, **FAST)
    assert leftovers(tmp_path / "base") == []
    assert len(server.requests) == 2  # retried from scratch each time


def test_an_archive_without_core_yaml_is_a_download_error(hand_bundle: Path, server: Script, tmp_path: Path) -> None:
    (hand_bundle / "core.yaml").unlink()
    server.body = zipped(hand_bundle)
    with pytest.raises(DownloadError, match=f"holds no core.yaml.*{BUNDLE_URL_ENV}"):
        ensure_eval_bundle(**FAST)
    assert leftovers(tmp_path / "base") == []


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_one_error_naming_the_variable_and_the_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(BUNDLE_URL_ENV, f"http://127.0.0.1:{closed_port()}/eval_bundle.zip")
    with pytest.raises(DownloadError) as raised:
        ensure_eval_bundle(max_attempts=2, **FAST)
    message = str(raised.value)
    assert BUNDLE_URL_ENV in message and str(tmp_path / "eval_bundle") in message


def test_a_bundle_placed_by_hand_is_used_without_network(hand_bundle: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv(BUNDLE_URL_ENV, f"http://127.0.0.1:{closed_port()}/eval_bundle.zip")
    write_bundle(tmp_path / "base" / "eval_bundle", [HAND_LM])
    assert ensure_eval_bundle(max_attempts=1, **FAST) == tmp_path / "base" / "eval_bundle"


def test_the_default_url_is_nanochats_and_the_variable_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUNDLE_URL_ENV, raising=False)
    assert core_eval.eval_bundle_url() == "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
    monkeypatch.setenv(BUNDLE_URL_ENV, "http://mirror.example/b.zip")
    assert core_eval.eval_bundle_url() == "http://mirror.example/b.zip"


# ---- two ranks ---------------------------------------------------------------------------------


def rank_main(bundle: str, out_dir: str) -> None:
    """One rank of `test_two_ranks_split_the_items`: its items and the all-reduced accuracies."""
    dist.init_process_group("gloo")
    try:
        tokenizer = byte_tokenizer()
        model = SuccessorModel(tokenizer.vocab_size)
        report = {task.label: {"items": sorted(score_task(model, tokenizer, task)),
                               "accuracy": evaluate_task(model, tokenizer, task)} for task in load_bundle(bundle)}
        Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_items_and_agree_on_the_accuracy(hand_bundle: Path, tmp_path: Path) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(closed_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    package_root = str(Path(core_eval.__file__).resolve().parents[1])  # the nanochat_rs this process uses
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    ranks = [subprocess.Popen([sys.executable, __file__, str(hand_bundle), str(tmp_path)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for label, accuracy in HAND_ACCURACY.items():
        num_items = len(load_bundle(hand_bundle)[list(HAND_ACCURACY).index(label)].items)
        assert reports[0][label]["items"] == list(range(0, num_items, 2))
        assert reports[1][label]["items"] == list(range(1, num_items, 2))
        assert reports[0][label]["accuracy"] == reports[1][label]["accuracy"] == accuracy


if __name__ == "__main__":
    rank_main(*sys.argv[1:3])
