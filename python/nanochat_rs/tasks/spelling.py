"""Letter counting through the calculator tool ("How many r are in strawberry?").

Tokens hide the letters of a word from the model, so it learns to ask the tool instead:

    user:      How many 'r' are in 'strawberry'?
    assistant: <|python_start|>'strawberry'.count('r')<|python_end|><|output_start|>3<|output_end|>
               There are 3 'r' in 'strawberry'.

Words come from a fixed list; train and test use disjoint words (a fixed hash of the word). Half of the
training questions ask about made-up letter strings instead: with only a hundred real words a small model
would memorise their spelling rather than learn to copy an unseen word into the tool call.
"""

from __future__ import annotations

import zlib

from nanochat_rs.calculator import format_result
from nanochat_rs.tasks.base import CalculatorTask, Conversation

TEST_SHARE = 8  # one word in eight is held out
MADE_UP_SHARE = 0.5  # of the training questions: about a random letter string, not a listed word
MADE_UP_LENGTHS = (3, 12)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = tuple("""
strawberry banana apple orange grape cherry lemon melon peach pear plum mango papaya coconut apricot
mississippi committee balloon bookkeeper coffee cookie bubble letter little middle puzzle pepper
happiness address success possess assessment accommodate occasion necessary embarrass parallel
keyboard computer monitor language tokenizer transformer attention gradient optimizer parameter
elephant giraffe kangaroo penguin dolphin octopus butterfly caterpillar crocodile hippopotamus
mountain river ocean island desert forest valley volcano glacier canyon meadow prairie savanna
library bicycle umbrella calendar chocolate vanilla cinnamon broccoli spaghetti avocado tomato potato
beginning disappear tomorrow yesterday afternoon everything somebody wonderful beautiful remember
engineer scientist musician architect carpenter professor astronaut detective journalist librarian
pineapple watermelon blueberry raspberry cranberry gooseberry blackberry elderberry mulberry
""".split())
PHRASINGS = ("How many '{letter}' are in '{word}'?", "How many times does the letter {letter} appear in {word}?",
             "Count the letter '{letter}' in the word '{word}'.", "In '{word}', how many '{letter}'s are there?")


def word_split(word: str) -> str:
    return "test" if zlib.crc32(word.encode()) % TEST_SHARE == 0 else "train"


class LetterCount(CalculatorTask):
    """`size` seeded questions about words of one split, each answered with `'word'.count('x')`."""

    eval_type = "generative"
    DEFAULT_SIZES = {"train": 5_000, "test": 200}

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, **slice_args: int) -> None:
        super().__init__(split, size, seed, **slice_args)
        self.words = [w for w in WORDS if word_split(w) == split]

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        if self.split == "train" and rng.random() < MADE_UP_SHARE:
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*MADE_UP_LENGTHS)))
        else:
            word = rng.choice(self.words)
        # mostly letters of the word, sometimes one it lacks (the answer 0 matters too)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
        expression = f"'{word}'.count('{letter}')"
        count = format_result(word.count(letter))  # as in arithmetic.py: not through the calculator
        return [
            {"role": "user", "content": rng.choice(PHRASINGS).format(letter=letter, word=word)},
            {"role": "assistant", "content": [
                {"type": "python", "text": expression},
                {"type": "python_output", "text": count},
                {"type": "text", "text": f"There are {count} '{letter}' in '{word}'."},
            ]},
        ]
