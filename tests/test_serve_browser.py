"""The web chat page at `/`, in a real browser: headless Chromium driven by selenium against a live
server with a tiny model. Set the temperature and the API key, type a message and watch the reply
stream in token by token; a second message carries the whole conversation; "New chat" starts over.
The replies are checked against what the server's API answers for the same conversation.

Skipped where selenium, Debian's `chromium` or its `chromedriver` is missing, except in CI (CI=true),
where that is a failure: `.ci/run` installs them. Saves a screenshot of the page after the first reply
to $NANOCHAT_SCREENSHOT_DIR/chat_page.png (else to the test's tmp_path)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

try:  # no selenium: the `browser` fixture skips (or fails, in CI) with the reason
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

from nanochat_rs.batching import BatchScheduler  # noqa: E402
from nanochat_rs.conversation import render_for_completion  # noqa: E402
from nanochat_rs.engine import Engine  # noqa: E402
from nanochat_rs.gpt import GPT  # noqa: E402
from nanochat_rs.tokenizer import Tokenizer  # noqa: E402
from serve_helpers import KEY, MODEL, Server, serve  # noqa: E402
from test_engine import make_model, small_tokenizer  # noqa: E402

CHROMIUM = "chromium"  # Debian's names, as .ci/run installs them
CHROMEDRIVER = "chromedriver"
CONTEXT = 256  # room for two turns
FIRST = "Hello, who are you?"
SECOND = "Tell me more."
MIN_FIRST_REPLY = 12  # tokens: enough to arrive in several pieces
STEP_S = 0.02  # a forward pass at least this long, so tokens reach the browser one by one, as from a GPU
WAIT_S = 20

# Every text the newest assistant bubble shows, recorded as the page renders it.
RECORD_RENDERS = """
window.renders = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll("#log .assistant");
  const text = replies.length ? replies[replies.length - 1].textContent : "";
  if (text && text !== window.renders[window.renders.length - 1]) window.renders.push(text);
}).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
"""
BUBBLES = "return [...document.querySelectorAll('#log .msg')].map(div => [div.className, div.textContent]);"


def browser_missing() -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for program, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(program) is None:
            return f"no `{program}` on PATH (apt-get install {package})"
    return None


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium through the system's chromedriver (named, so selenium downloads nothing)."""
    missing = browser_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI, but {missing}", pytrace=False)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def replying_model(tok: Tokenizer) -> GPT:
    """A tiny random GPT that says only printable text and ends its reply to FIRST after at least
    MIN_FIRST_REPLY tokens (make_model's never ends one, so a first reply would fill the context)."""
    model = make_model(tok, sequence_len=CONTEXT)
    specials = set(tok.special_tokens().values())
    end = tok.encode_special("<|assistant_end|>")
    with torch.no_grad():
        for token in range(tok.vocab_size):
            text = tok.decode([token])
            if token in specials or not text.isprintable() or "\ufffd" in text:
                model.lm_head.weight[token] = 0.0  # logit 0: never the argmax, like make_model's stop tokens
        reply = [column[0] for column, _ in Engine(model, tok).generate(
            render_for_completion(tok, [{"role": "user", "content": FIRST}]), max_tokens=40, temperature=0.0)]
        # The reply ends where the model would first say a token new after MIN_FIRST_REPLY: from now on
        # <|assistant_end|> scores just above that token, so it wins wherever that token would.
        ending = next(t for i, t in enumerate(reply) if i >= MIN_FIRST_REPLY and t not in reply[:i])
        model.lm_head.weight[end] = 1.01 * model.lm_head.weight[ending]
    forward = model.forward

    def paced(*args: Any, **kwargs: Any) -> torch.Tensor:
        started = time.monotonic()
        logits = forward(*args, **kwargs)
        time.sleep(max(0.0, STEP_S - (time.monotonic() - started)))
        return logits

    model.forward = paced  # type: ignore[method-assign]
    return model


@pytest.fixture
def server() -> Iterator[Server]:
    tok = small_tokenizer()
    scheduler = BatchScheduler(replying_model(tok), tok, max_batch_size=2, max_queue=2)
    scheduler.start()
    yield from serve(scheduler, tok)


def wait_for(driver: WebDriver, what: str, condition: Callable[[WebDriver], Any]) -> Any:
    """condition's first truthy value, failing with the page's messages if WAIT_S pass first."""
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition)
    except Exception as e:  # selenium's TimeoutException says nothing of the page
        raise AssertionError(f"timed out waiting for {what}; the page shows {driver.execute_script(BUBBLES)}") from e


def say(driver: WebDriver, text: str, *, enter: bool) -> str:
    """Send `text` (by Enter or the Send button), wait for the whole reply and return it."""
    before = len(driver.execute_script(BUBBLES))
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    if enter:
        box.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()
    # The page adds the user's and the assistant's bubbles at once and enables Send again when done.
    wait_for(driver, "the reply", lambda d: len(d.execute_script(BUBBLES)) == before + 2
             and d.find_element(By.ID, "send").is_enabled())
    bubbles = driver.execute_script(BUBBLES)
    assert bubbles[-2:] == [["msg user", text], ["msg assistant", bubbles[-1][1]]], bubbles
    return bubbles[-1][1]


def api_reply(server: Server, messages: list[dict[str, str]], **kwargs: Any) -> str:
    response = server.client().chat.completions.create(model=MODEL, messages=messages, temperature=0.0, **kwargs)
    return response.choices[0].message.content


def screenshot_path(tmp_path: Path) -> Path:
    folder = os.environ.get("NANOCHAT_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder) / "chat_page.png"
    return tmp_path / "chat_page.png"


def test_chat_page_streams_replies_keeps_the_conversation_and_starts_over(browser: WebDriver, server: Server,
                                                                          tmp_path: Path) -> None:
    browser.get(server.url)
    assert browser.title == "nanochat_rs"
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")  # greedy, so the API's reply below must be the same text
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.execute_script(RECORD_RENDERS)

    first = say(browser, FIRST, enter=True)
    renders = browser.execute_script("return window.renders;")
    assert first, "the page showed no reply"
    assert renders[-1] == first, renders
    assert len(renders) > 1, f"the reply should arrive in pieces, the page showed only {renders}"
    assert all(later.startswith(earlier) for earlier, later in zip(renders, renders[1:], strict=False)), renders
    conversation = [{"role": "user", "content": FIRST}]
    assert first == api_reply(server, conversation), "the page should send the temperature set in its control"
    shot = screenshot_path(tmp_path)
    assert browser.save_screenshot(str(shot)), "the screenshot was not saved"
    print(f"screenshot of the chat page: {shot}")

    second = say(browser, SECOND, enter=False)
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": SECOND}]
    assert second == api_reply(server, conversation), "the page should send the whole conversation"
    # Were SECOND sent alone, the reply would begin with this (greedy: a shorter reply is a prefix).
    alone = api_reply(server, conversation[-1:], max_tokens=8)
    assert not second.startswith(alone), "the test cannot tell a new conversation from this one"

    browser.find_element(By.ID, "new").click()
    assert browser.execute_script(BUBBLES) == []
    # A fresh conversation: the first message gets the first reply again, so nothing of the old one was sent.
    assert say(browser, FIRST, enter=True) == first
    assert [role for role, _ in browser.execute_script(BUBBLES)] == ["msg user", "msg assistant"]


def test_chat_page_shows_tool_calls_apart_from_the_reply(browser: WebDriver, server: Server) -> None:
    """The random model never calls the calculator, so the page's own renderer gets a reply that does,
    in the form the server streams it (conversation.TOOL_DISPLAY)."""
    browser.get(server.url)
    pieces = browser.execute_script("""
        const div = document.createElement("div");
        showReply(div, "Let me see. [calculator] 123*45 -> 5535\\n123 * 45 = 5535.");
        return [...div.childNodes].filter(node => node.textContent)
                                  .map(node => [node.nodeName, node.className || "", node.textContent]);""")
    assert pieces == [["#text", "", "Let me see. "], ["SPAN", "tool", "[calculator] 123*45 -> 5535\n"],
                      ["#text", "", "123 * 45 = 5535."]]
