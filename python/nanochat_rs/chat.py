"""Chat with a trained model from the terminal: `nanochat-chat` (or `python -m nanochat_rs.chat`).

    nanochat-chat                                 # interactive, the newest chat model (nanochat-sft)
    nanochat-chat -p "What is 2+2?"               # one answer, then exit
    nanochat-chat --source base                   # the newest base model (nanochat-train) instead
    nanochat-chat --checkpoint DIR --device-type cpu --temperature 0

Tool calls in a reply are shown as `[calculator] 123*45 -> 5535` (conversation.TOOL_DISPLAY).

Interactive commands: 'quit' / 'exit' (or end of input) to leave, 'clear' to start a new conversation.
Errors follow the policy of `nanochat_rs.cli`: one line on stderr, exit 2 for bad options, 1 for bad
files or devices, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nanochat_rs import cli
from nanochat_rs.conversation import readable_reply, render_next_turn

# Modules that import torch are imported inside functions, under cli.run_job: `--help` answers at
# once, and Ctrl-C during the seconds that importing torch takes ends as quietly as it does later.
if TYPE_CHECKING:
    from nanochat_rs.engine import Engine
    from nanochat_rs.tokenizer import Tokenizer

__all__ = ["Chat", "add_checkpoint_args", "chat_loop", "check_options", "default_checkpoint_dir", "main", "parse_args",
           "run"]

SOURCES = ("chat", "base")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nanochat-chat", description="Chat with a nanochat_rs model.")
    add_checkpoint_args(parser, "chat: the most recently written run under $NANOCHAT_BASE_DIR/chat_checkpoints "
                                "(the base model when there is none yet); base: the same under base_checkpoints")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed, 0 <= seed < 2**64")
    cli.add_device_arg(parser)
    return parser.parse_args(argv)


def add_checkpoint_args(parser: argparse.ArgumentParser, source_help: str) -> None:
    """--source, --checkpoint and --step: the checkpoint a job loads (`default_checkpoint_dir` finds the
    newest of --source when no --checkpoint is given)."""
    parser.add_argument("--source", choices=SOURCES, default="chat", help=source_help)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint directory holding step_NNNNNN/ folders (instead of --source)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")


def check_options(args: argparse.Namespace) -> None:
    """Reject impossible option values with a UsageError; run() calls this before the (slow) model
    load, so a typo costs nothing. Turns `--top-k 0` into None (all tokens)."""
    from nanochat_rs.sampling import check_sampling_args

    if args.max_tokens < 1:
        raise cli.UsageError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.top_k < 0:
        raise cli.UsageError(f"--top-k must be >= 0 (0 = all tokens), got {args.top_k}")
    args.top_k = args.top_k or None
    cli.usage_checked(lambda: check_sampling_args(args.max_tokens, args.temperature, args.top_k, args.seed))


def default_checkpoint_dir(base: Path, source: str = "chat") -> Path:
    """The run directory (holding step_NNNNNN/ folders) of `source` under `base` whose newest complete
    step was written last. A chat source with no chat model yet falls back to the base model, saying so."""
    from nanochat_rs.checkpoint import BASE_CHECKPOINTS, CHAT_CHECKPOINTS, newest_checkpoint_dir

    if source == "chat" and (chat := newest_checkpoint_dir(base / CHAT_CHECKPOINTS)) is not None:
        return chat
    found = newest_checkpoint_dir(base / BASE_CHECKPOINTS)
    if found is None:
        roots = " or ".join(str(base / root) for root in (CHAT_CHECKPOINTS, BASE_CHECKPOINTS)[SOURCES.index(source):])
        raise FileNotFoundError(f"no checkpoints under {roots}: train a model with nanochat-train (then "
                                "nanochat-sft) first, or pass --checkpoint DIR")
    if source == "chat":
        print(f"Note: no chat model under {base / CHAT_CHECKPOINTS} yet (fine-tune one with nanochat-sft); "
              f"using the base model in {found}", file=sys.stderr)
    return found


def valid_text(text: str) -> str:
    """`text` with undecodable input bytes replaced by U+FFFD. Python passes such bytes on as lone
    surrogates (surrogateescape, for argv and for stdin as set up in chat_loop), which the tokenizer
    cannot encode."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class Chat:
    """A loaded model plus the sampling options of this run."""

    engine: Engine
    tokenizer: Tokenizer
    context: int  # the model's sequence_len: prompt + reply must fit in it
    temperature: float
    top_k: int | None
    max_tokens: int

    def room_for(self, tokens: list[int]) -> int:
        return min(self.max_tokens, self.context - len(tokens))

    def answer(self, tokens: list[int], seed: int) -> list[int]:
        """Print the reply to `tokens` as it streams and return its tokens (without the stop token).

        Text is decoded from the whole reply so far and held back while it ends in a partial UTF-8
        character (a multi-byte character can be split across tokens).
        """
        stop = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.bos_token_id}
        reply: list[int] = []
        shown = 0
        for column, _ in self.engine.generate(tokens, max_tokens=self.room_for(tokens),
                                              temperature=self.temperature, top_k=self.top_k, seed=seed):
            if column[0] in stop:
                break
            reply.append(column[0])
            text = readable_reply(self.tokenizer, reply)
            if not text.endswith("\ufffd"):
                print(text[shown:], end="", flush=True)
                shown = len(text)
        print(readable_reply(self.tokenizer, reply)[shown:], flush=True)  # a reply cut mid-character ends in U+FFFD
        if len(tokens) + len(reply) >= self.context:  # no stop token fitted: the context ran out
            print(f"(reply cut off: it reached the model's {self.context}-token context)", file=sys.stderr)
        return reply


def _read_turn() -> str | None:
    """The user's next line, or None at the end of input. A closed stdin (`0<&-`, sys.stdin is None)
    has no input at all, which input() would report as a RuntimeError."""
    if sys.stdin is None:
        print()
        return None
    try:
        return valid_text(input("\nUser: ")).strip()
    except EOFError:
        print()
        return None


def chat_loop(chat: Chat, seed: int) -> None:
    from nanochat_rs.sampling import MAX_SEED

    tokenizer = chat.tokenizer
    if isinstance(sys.stdin, io.TextIOWrapper):  # bad UTF-8 typed or piped in must not end the session
        sys.stdin.reconfigure(errors="surrogateescape")
    print("nanochat_rs chat. Type 'quit' or 'exit' to leave, 'clear' to start over.")
    conversation = [tokenizer.bos_token_id]
    turn = 0
    while (text := _read_turn()) is not None:
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            conversation = [tokenizer.bos_token_id]
            print("(conversation cleared)")
            continue
        if not text:
            continue
        tokens = conversation + render_next_turn(tokenizer, text)
        if chat.room_for(tokens) <= 0:
            print(f"(the conversation fills the model's {chat.context}-token context; type 'clear')")
            continue
        print("Assistant: ", end="", flush=True)
        # a fresh seed per turn, so replies don't echo; wrapped to stay a 64-bit seed
        reply = chat.answer(tokens, seed=(seed + turn) % (MAX_SEED + 1))
        conversation = tokens + reply + [tokenizer.encode_special("<|assistant_end|>")]
        turn += 1


def run(args: argparse.Namespace) -> None:
    """Check the options, load the model, then answer `args.prompt` or chat interactively."""
    check_options(args)
    from nanochat_rs.checkpoint import load_model
    from nanochat_rs.common import autodetect_device_type, base_dir, compute_cleanup, compute_init
    from nanochat_rs.engine import Engine

    _, device = compute_init(args.device_type or autodetect_device_type())
    try:
        checkpoint = args.checkpoint or default_checkpoint_dir(base_dir(), args.source)
        model, tokenizer, _ = load_model(checkpoint, device, step=args.step)
        chat = Chat(Engine(model, tokenizer), tokenizer, model.config.sequence_len, args.temperature,
                    args.top_k, args.max_tokens)
        if args.prompt is None:
            chat_loop(chat, args.seed)
        else:
            tokens = [tokenizer.bos_token_id, *render_next_turn(tokenizer, valid_text(args.prompt))]
            if chat.room_for(tokens) <= 0:
                raise ValueError(f"the prompt does not fit the model's {chat.context}-token context")
            chat.answer(tokens, seed=args.seed)
    except BaseException:
        compute_cleanup(wait_for_peers=False)  # under torchrun a failed peer may never reach the barrier
        raise
    compute_cleanup()


def _run_in_terminal(args: argparse.Namespace) -> None:
    try:
        run(args)
    except KeyboardInterrupt:  # Ctrl-C at the prompt or mid-answer: end that line before leaving
        print(flush=True)
        raise
    except BrokenPipeError:  # the reader went away (`nanochat-chat -p ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit-time flush fails too
        raise SystemExit(cli.EXIT_FAILURE) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run_job(lambda: _run_in_terminal(args))


if __name__ == "__main__":
    main()
