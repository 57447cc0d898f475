"""The HTTP server, through the real `openai` client (and httpx for what that client cannot send):
a tiny random GPT served in-process by uvicorn on a free loopback port, its answers checked against
the Engine run directly on the same model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from cli_helpers import one_line_error, run_main  # noqa: E402
from nanochat_rs.batching import BatchScheduler, SamplingParams  # noqa: E402
from nanochat_rs.checkpoint import save_checkpoint  # noqa: E402
from nanochat_rs.conversation import readable_reply, render_for_completion  # noqa: E402
from nanochat_rs.engine import Engine  # noqa: E402
from nanochat_rs.serve import main  # noqa: E402
from nanochat_rs.serve.cli import is_loopback  # noqa: E402
from nanochat_rs.serve.protocol import MAX_STOP_CHARS  # noqa: E402
from nanochat_rs.serve.text import ReplyText  # noqa: E402
from nanochat_rs.tokenizer import Tokenizer  # noqa: E402
from serve_helpers import KEY, MAX_BODY, MODEL, Server, serve  # noqa: E402
from test_engine import make_model, small_tokenizer  # noqa: E402

CONTEXT = 64
MAX_TOKENS = 12
REPO = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return small_tokenizer()


@pytest.fixture(scope="module")
def server(tok: Tokenizer) -> Iterator[Server]:
    scheduler = BatchScheduler(make_model(tok, sequence_len=CONTEXT), tok, max_batch_size=4, max_queue=16)
    scheduler.start()
    yield from serve(scheduler, tok)


@pytest.fixture
def idle_server(tok: Tokenizer) -> Iterator[Server]:
    """A server whose scheduler takes one request and is stepped only by the test."""
    yield from serve(BatchScheduler(make_model(tok, sequence_len=256), tok, max_batch_size=1, max_queue=0), tok)


def engine_reply(server: Server, prompt: list[int], **kwargs: Any) -> list[int]:
    engine = Engine(server.scheduler.model, server.tokenizer)
    reply: list[int] = []
    for column, _ in engine.generate(prompt, **kwargs):
        if column[0] in (server.tokenizer.encode_special("<|assistant_end|>"), server.tokenizer.bos_token_id):
            break
        reply.append(column[0])
    return reply


def chat(server: Server, messages: list[dict[str, Any]] = HELLO, **kwargs: Any) -> Any:
    options = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **kwargs}
    return server.client().chat.completions.create(model=MODEL, messages=messages, **options)


def stream_chat(server: Server, messages: list[dict[str, Any]] = HELLO, **kwargs: Any) -> list[Any]:
    return list(chat(server, messages, stream=True, **kwargs))


def streamed_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


# ---- answers -------------------------------------------------------------------------------------


def test_greedy_chat_answer_is_the_engine_answer(server: Server) -> None:
    prompt = render_for_completion(server.tokenizer, HELLO)
    expected = readable_reply(server.tokenizer, engine_reply(server, prompt, max_tokens=MAX_TOKENS, temperature=0.0))
    assert expected.strip(), "the test model should say something"
    response = chat(server)
    assert response.object == "chat.completion" and response.model == MODEL
    [choice] = response.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expected, "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt), MAX_TOKENS)
    assert response.usage.total_tokens == len(prompt) + MAX_TOKENS


def test_streaming_sends_the_same_text_in_openai_chunks(server: Server) -> None:
    chunks = stream_chat(server, stream_options={"include_usage": True})
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "text should arrive in pieces"
    assert streamed_text(chunks) == chat(server).choices[0].message.content


def test_raw_completion_is_the_engine_continuation(server: Server) -> None:
    tokenizer = server.tokenizer
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("two plus two is")]
    expected = tokenizer.decode(engine_reply(server, prompt, max_tokens=MAX_TOKENS, temperature=0.0))
    client = server.client()
    response = client.completions.create(model=MODEL, prompt="two plus two is", max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].text == expected and response.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="two plus two is", max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_openai_message_forms_read_as_the_plain_conversation(server: Server) -> None:
    """Text parts for a user, the "developer" role (OpenAI's newer name for the system prompt) and an
    assistant turn with null content are what SDKs send; they mean the plain forms."""
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello\nthere"},
             {"role": "assistant", "content": ""}, {"role": "user", "content": "and?"}]
    openai_forms = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                    {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
                    {"role": "assistant", "content": None}, {"role": "user", "content": "and?"}]
    assert chat(server, openai_forms).choices[0].message.content == chat(server, plain).choices[0].message.content


def test_n_choices_are_the_samples_of_consecutive_seeds(server: Server) -> None:
    response = chat(server, n=3, temperature=1.0, seed=7)
    assert [c.index for c in response.choices] == [0, 1, 2]
    singles = [chat(server, temperature=1.0, seed=7 + i).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in response.choices] == singles
    assert response.usage.completion_tokens == 3 * MAX_TOKENS
    chunks = stream_chat(server, n=3, temperature=1.0, seed=7)
    assert [streamed_text(chunks, i) for i in range(3)] == singles


def test_same_seed_same_text(server: Server) -> None:
    first, again, other = (chat(server, temperature=1.0, top_p=0.9, extra_body={"top_k": 40}, seed=seed)
                           .choices[0].message.content for seed in (123, 123, 124))
    assert first == again
    assert first != other


def test_stop_sequence_ends_the_reply_before_it(server: Server) -> None:
    full = chat(server).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2
    expected = full[:full.find(stop)]
    response = chat(server, stop=[stop, "\x00never"])
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (expected, "stop")
    chunks = stream_chat(server, stop=stop)
    assert streamed_text(chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streaming_clients_get_their_own_answers(server: Server) -> None:
    conversations = [[{"role": "user", "content": f"what is {i} plus {i}?"}] for i in range(16)]
    expected = [readable_reply(server.tokenizer, engine_reply(server, render_for_completion(server.tokenizer, c),
                                                              max_tokens=MAX_TOKENS, temperature=0.0))
                for c in conversations]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda c: streamed_text(stream_chat(server, c)), conversations))
    assert answers == expected
    assert server.scheduler.load().running == 0


# ---- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hello there " * 40}]}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": CONTEXT}, "max_tokens"),
    ({"max_completion_tokens": -1, "max_tokens": None}, "max_completion_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"seed": -5}, "seed"),
    ({"top_p": 1.5}, "top_p"),
    ({"extra_body": {"top_k": 0}}, "top_k"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
], ids=["unknown-role", "no-messages", "prompt-too-long", "max-tokens-0", "max-tokens-too-big",
        "max-completion-tokens", "temperature", "seed", "top-p", "top-k", "five-stops", "long-stop"])
def test_bad_requests_are_400(server: Server, kwargs: dict[str, Any], param: str | None) -> None:
    messages = kwargs.pop("messages", HELLO)
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, messages, **kwargs)
    error = caught.value.body
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def test_prompt_longer_than_the_context_says_so(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, [{"role": "user", "content": "hello there " * 40}])
    assert caught.value.body["code"] == "context_length_exceeded"
    assert f"context is {CONTEXT} tokens" in caught.value.body["message"]


def test_unknown_model_is_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="gpt-4", messages=HELLO)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")


def test_malformed_json_and_bad_fields_are_400(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b'{"model": "tiny", "messages": "hello"}', b'{"model": "tiny"}', b"[1, 2]"):
        response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, body
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_too_big_bodies_are_413_whatever_content_length_says(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode()
    declared = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers)
    chunked = httpx.post(f"{server.url}/v1/chat/completions", content=iter([body[:100], body[100:]]), headers=headers)
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"


def test_api_key_is_required_on_v1(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{server.url}/v1/chat/completions", content=b"{bad").status_code == 401
    assert [m.id for m in server.client().models.list()] == [MODEL]


def test_health_and_page_need_no_key(server: Server) -> None:
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"] == MODEL
    assert httpx.head(f"{server.url}/health").status_code == 200  # load balancers probe with HEAD
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text


def post(server: Server, path: str, body: bytes | dict[str, Any], **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, **kwargs)


def test_text_that_is_not_unicode_is_400_in_plain_words(server: Server) -> None:
    """JSON may escape a lone surrogate ("\\ud800"), which no tokenizer can encode."""
    for path, body, param in (
            ("/v1/completions", b'{"model": "tiny", "prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
            ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udc00"}]}',
             "messages"),
            ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "stop": ["a\\ud800"]}', "stop")):
        response = post(server, path, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "unpaired surrogate" in error["message"], error
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_null_options_mean_their_defaults(server: Server) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": None, "n": None, "stream": None,
            "top_p": None, "stop": None, "seed": None, "stream_options": {"include_usage": None}}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


@pytest.mark.parametrize(("field", "value"), [("max_tokens", True), ("max_tokens", 2.0), ("temperature", "0.5"),
                                              ("stream", "true"), ("n", 2.0), ("seed", "7")])
def test_options_of_the_wrong_json_type_are_400(server: Server, field: str, value: Any) -> None:
    """No coercion: a JSON true is not max_tokens 1, nor "0.5" a temperature."""
    response = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_a_top_p_that_rounds_to_zero_is_greedy_and_harms_nothing(server: Server) -> None:
    """1e-46 is 0 in float32: the nucleus still keeps the best token, so the reply is the greedy one
    (it once emptied the nucleus, and the failed draw stopped the scheduler for everyone)."""
    for top_p in (1e-46, 5e-324):
        assert chat(server, temperature=1.0, top_p=top_p, seed=1).choices[0].message.content == \
            chat(server).choices[0].message.content
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_wrong_method_is_405_with_allow(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scheduler_fails_requests_and_health_says_so(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tok, sequence_len=CONTEXT)

    def broken_forward(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward", broken_forward)
    scheduler = BatchScheduler(model, tok)
    scheduler.start()
    for server in serve(scheduler, tok):
        with pytest.raises(openai.InternalServerError, match="device lost"):
            chat(server)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "device lost" in health.json()["error"]
        with pytest.raises(openai.APIStatusError, match="restart the server") as caught:
            chat(server)
        assert caught.value.status_code == 503


def test_full_queue_is_429(idle_server: Server, tok: Tokenizer) -> None:
    held = idle_server.scheduler.submit([tok.bos_token_id], SamplingParams(max_tokens=4))
    with pytest.raises(openai.RateLimitError):
        chat(idle_server)
    held.cancel()


def test_a_client_that_disconnects_mid_stream_frees_its_slot(idle_server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": True}
    scheduler = idle_server.scheduler
    with httpx.stream("POST", f"{idle_server.url}/v1/chat/completions", json=body, headers=headers) as response:
        scheduler.step()  # admit, prefill, emit the first token
        assert next(response.iter_lines()).startswith("data: ")
    # the test steps the scheduler itself: the request could only finish in 100 steps by being cancelled
    for _ in range(100):
        scheduler.step()
        if scheduler.load().running == 0:
            break
        time.sleep(0.05)
    assert scheduler.load().running == 0


def test_a_client_that_leaves_a_fast_non_streaming_request_frees_its_slot(idle_server: Server) -> None:
    """Tokens arriving faster than the disconnect poll must not hide that the client left."""
    scheduler = idle_server.scheduler
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "temperature": 0.0}
    assert len(engine_reply(idle_server, render_for_completion(idle_server.tokenizer, HELLO), max_tokens=200,
                            temperature=0.0)) == 200  # it cannot end early by itself
    with ThreadPoolExecutor(1) as pool:
        leaving = pool.submit(post, idle_server, "/v1/chat/completions", body, timeout=httpx.Timeout(5, read=0.5))
        for _ in range(500):
            if scheduler.load().waiting:
                break
            time.sleep(0.01)
        steps = 0
        while steps < 200 and (scheduler.load().running or scheduler.load().waiting):
            scheduler.step()  # one token about every 20 ms, far faster than the poll
            steps += 1
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):
            leaving.result()
    assert scheduler.load().running == 0
    assert steps < 150, "the request ran (nearly) to its max_tokens instead of being cancelled"


# ---- the pieces ------------------------------------------------------------------------------------


def test_reply_text_holds_back_partial_characters_and_possible_stops() -> None:
    pieces = ["caf", "\xc3", "\xa9 st", "o", "p here"]
    reply = ReplyText(lambda tokens: "".join(pieces[i] for i in tokens).encode("latin-1").decode("utf-8", "replace"),
                      stops=["stop"])
    assert [reply.add(i) for i in range(5)] == ["caf", "", "é ", "", ""]
    assert (reply.text, reply.stopped) == ("café ", True)


def test_command_line_checks_options_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(main, ["--max-batch-size", "0"], capsys)
    assert code == 2 and "--max-batch-size must be positive" in one_line_error(err)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


# ---- the job as a user runs it -------------------------------------------------------------------


def serve_command(checkpoint_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "nanochat_rs.serve", "--checkpoint", str(checkpoint_dir), "--port", str(port),
            "--device-type", "cpu", "--api-key", KEY]


def test_the_serve_job_answers_refuses_a_busy_port_and_stops_on_ctrl_c(tok: Tokenizer, tmp_path: Path) -> None:
    """`python -m nanochat_rs.serve` (what `nanochat-serve` runs) on a checkpoint written here: port 0 gets a
    free port that the first line names; the API answers as the Engine does; a second server on the same
    port fails in one line; Ctrl-C stops the first with exit 130 and no traceback."""
    model = make_model(tok)
    checkpoint_dir = tmp_path / "d2"
    save_checkpoint(checkpoint_dir, 1, model, None, {"dataloader_state": None}, tokenizer=tok)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(serve_command(checkpoint_dir, 0), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            assert process.stdout is not None
            first_line = process.stdout.readline()  # EOF ("") if the job died first
            announced = re.fullmatch(r"serving d2 on (http://127\.0\.0\.1:(\d+)) \(.*\)\n", first_line)
            assert announced, (first_line, process.stderr.read() if process.poll() is not None else "")
            url, port = announced.group(1), int(announced.group(2))
            for _ in range(200):  # the port is bound before the model loads; answers come after
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
            response = client.chat.completions.create(model="d2", messages=HELLO, max_tokens=MAX_TOKENS,
                                                      temperature=0.0)
            prompt = render_for_completion(tok, HELLO)
            expected = readable_reply(tok, [column[0] for column, _ in Engine(model, tok).generate(
                prompt, max_tokens=MAX_TOKENS, temperature=0.0)])
            assert response.choices[0].message.content == expected

            busy = subprocess.run(serve_command(checkpoint_dir, port), env=env, capture_output=True, text=True,
                                  timeout=300)
            assert busy.returncode == 1
            assert one_line_error(busy.stderr) == (f"error: cannot listen on 127.0.0.1:{port}: Address already in "
                                                   "use: is another server running? pick another --port")
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr, stderr
