#!/usr/bin/env bash
# Smoke-test a built wheel as a user would get it: install it into a fresh venv outside the source
# tree, then, from a directory outside the tree, run the console entry points on a tiny job:
# train a tokenizer on the embedded corpus, pack a batch, take one training step, one fine-tuning step,
# answer one prompt, serve the chat model over HTTP (then Ctrl-C), evaluate the tokenizer and write the
# report card.
#
#   .ci/smoke_wheel.sh target/wheels/nanochat_rs-*.whl
#
# NANOCHAT_SMOKE_VENV=DIR reuses an existing venv (the wheel is reinstalled into it, dependencies
# kept) instead of creating a fresh one: for re-running the smoke by hand without re-downloading torch.
set -euo pipefail

if [[ $# -ne 1 || ! -f "$1" ]]; then
    echo "usage: $0 WHEEL" >&2
    exit 2
fi
wheel="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
repo="$(cd "$(dirname "$0")/.." && pwd)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="${NANOCHAT_SMOKE_VENV:-$work/venv}"
case "$venv/" in "$repo"/*) echo "error: the smoke venv must live outside $repo" >&2; exit 2 ;; esac

if [[ -z "${NANOCHAT_SMOKE_VENV:-}" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
start=$SECONDS
"$venv/bin/pip" install --quiet --force-reinstall --no-deps "$wheel"
"$venv/bin/pip" install --quiet "$wheel[serve]"   # its dependencies and the serve extra's, from its metadata
echo "installed $(basename "$wheel") with its dependencies into $venv in $((SECONDS - start)) s"

# Nothing below may see the source tree: run from an empty directory, with a clean environment.
mkdir -p "$work/cwd" "$work/base"
cd "$work/cwd"
unset PYTHONPATH VIRTUAL_ENV
export NANOCHAT_BASE_DIR="$work/base"
export PATH="$venv/bin:$PATH"

python - "$repo" <<'EOF'
import sys
from pathlib import Path

import nanochat_rs
import nanochat_rs._native as native

repo = Path(sys.argv[1]).resolve()
for f in (nanochat_rs.__file__, native.__file__):
    assert repo not in Path(f).resolve().parents, f"{f} was imported from the source tree"
assert nanochat_rs.__version__ not in ("", "0+unknown"), nanochat_rs.__version__
print(f"nanochat_rs {nanochat_rs.__version__} from {Path(nanochat_rs.__file__).parent}")
EOF

jobs=(nanochat-tok-train nanochat-train nanochat-sft nanochat-chat nanochat-eval nanochat-serve nanochat-data
      nanochat-convert nanochat-tok-eval nanochat-report)
for job in "${jobs[@]}"; do
    "$job" --help > /dev/null || { echo "error: $job --help failed" >&2; exit 1; }
done
echo "entry points answer --help: ${jobs[*]}"

echo "== smoke: nanochat-tok-train (tiny vocab, embedded corpus) =="
nanochat-tok-train --vocab-size 512 --max-chars 2000000
test -d "$NANOCHAT_BASE_DIR/tokenizer"

echo "== smoke: pack a batch =="
python - <<'EOF'
import numpy as np
import pyarrow.parquet as pq
from nanochat_rs.dataset import embedded_corpus_dir
from nanochat_rs.packer import BestFitPacker
from nanochat_rs.tokenizer import Tokenizer, tokenizer_dir

tok = Tokenizer.load(tokenizer_dir())
shard = sorted(embedded_corpus_dir().glob("shard_*.parquet"))[0]
texts = pq.read_table(shard, columns=["text"]).column("text").slice(0, 64)
tokens, offsets = tok.encode_arrow(texts, prepend="<|bos|>")
B, T = 4, 128
packer = BestFitPacker(sequence_len=T, buffer_size=16, bos_token_id=tok.bos_token_id)
packer.push(tokens, offsets)
packer.finish()
inputs, targets = np.empty((B, T), np.int64), np.empty((B, T), np.int64)
assert packer.pack_into(inputs, targets), packer.stats
assert (inputs[:, 0] == tok.bos_token_id).all() and (inputs[:, 1:] == targets[:, :-1]).all()
print(f"packed a {B}x{T} batch from {len(offsets) - 1} documents: {packer.stats}")
EOF

echo "== smoke: nanochat-train (one step of a depth-1 model) =="
# --no-compile: torch.compile of even this model costs ~3 min on 2 cores, and this smoke is about packaging.
nanochat-train --preset cpu --depth 1 --num-iterations 1 --device-batch-size 1 --total-batch-size 256 \
    --sequence-len 256 --eval-every 0 --eval-tokens 256 --sample-every 0 --no-compile
if [[ -z "$(find "$NANOCHAT_BASE_DIR/base_checkpoints" -name model.pt)" ]]; then
    echo "error: nanochat-train wrote no checkpoint" >&2
    exit 1
fi

echo "== smoke: nanochat-sft (one step on embedded conversations) =="
nanochat-sft --tasks arithmetic,identity --max-examples 8 --num-iterations 1 --eval-every 0 --eval-tokens 256 \
    --eval-examples 1 --no-compile
if [[ -z "$(find "$NANOCHAT_BASE_DIR/chat_checkpoints" -name model.pt)" ]]; then
    echo "error: nanochat-sft wrote no checkpoint" >&2
    exit 1
fi

echo "== smoke: nanochat-chat (one prompt, the chat model) =="
nanochat-chat -p "What is 2+2?" --max-tokens 8 --temperature 0

echo "== smoke: nanochat-serve (the chat model over HTTP, then Ctrl-C) =="
# Started in the background, where a non-interactive shell ignores SIGINT: the job must still stop on it.
nanochat-serve --port 0 > "$work/serve.out" 2> "$work/serve.err" &
serve_pid=$!
if ! python - "$work/serve.out" <<'EOF'
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

deadline = time.monotonic() + 300
announced = None
while announced is None and time.monotonic() < deadline:  # the first line names the URL
    announced = re.match(r"serving \S+ on (http://\S+) ", Path(sys.argv[1]).read_text())
    time.sleep(0.2)
assert announced, "nanochat-serve printed no URL"
url = announced.group(1)
while True:  # the port is bound before the model loads
    try:
        health = json.load(urllib.request.urlopen(f"{url}/health", timeout=10))
        break
    except OSError:
        assert time.monotonic() < deadline, "nanochat-serve never answered /health"
        time.sleep(0.2)
page = urllib.request.urlopen(f"{url}/", timeout=10).read().decode()
assert "<html" in page.lower(), "the chat page is missing from the wheel"
body = {"model": health["model"], "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8,
        "temperature": 0}
request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(request, timeout=120))
assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1, reply
print(f"{url}: /health {health['status']}, / {len(page)} bytes, reply {reply['choices'][0]['message']['content']!r}")
EOF
then
    kill "$serve_pid"
    cat "$work/serve.err" >&2
    echo "error: nanochat-serve smoke failed" >&2
    exit 1
fi
kill -INT "$serve_pid"
serve_rc=0
wait "$serve_pid" || serve_rc=$?
if [[ $serve_rc -ne 130 ]]; then
    cat "$work/serve.err" >&2
    echo "error: nanochat-serve exited $serve_rc on Ctrl-C (expected 130)" >&2
    exit 1
fi

echo "== smoke: nanochat-eval (embedded tasks, offline) =="
nanochat-eval --source chat --tasks arithmetic,identity --max-per-task 2 --max-tokens 16

echo "== smoke: nanochat-tok-eval, nanochat-report =="
nanochat-tok-eval --baselines
nanochat-report
test -f "$NANOCHAT_BASE_DIR/report/report.md"

echo "wheel smoke passed"
