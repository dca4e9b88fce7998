"""A small embedded training corpus for the demo byte-level BPE tokenizer.

Hand-written English prose and Python code, so the demo tokenizer can be trained offline and
deterministically. The text only shapes which merges exist; any byte sequence still encodes.
"""

from __future__ import annotations

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. Once upon a time, in a small village by the sea, there lived an old fisherman
who went out every morning before the sun came up. He knew the tides, the winds and the
birds, and he could tell from the colour of the water where the fish would be that day.

Large language models are trained on a great deal of text. They read one token at a time and
learn to predict the next one. A mixture of experts model routes every token to a few small
feed-forward networks, called experts, chosen by a router. Only the chosen experts do any
work, so the model can hold many parameters while each token costs only a little compute.

Serving such a model across many machines means placing the experts on different devices and
sending each token's hidden state to the devices that hold its experts. The answers come back,
are weighted by the router's scores, and are added to the residual stream. Latency depends on
the slowest device, so the load must be balanced and the network must be fast.

What is the capital of France? The capital of France is Paris. What is two plus two? Two plus
two is four. Please write a short poem about the autumn rain. Thank you for your help today!
Can you explain how attention works? Attention lets each position look at earlier positions,
weigh them by how relevant they are, and mix their values into a new representation.

Linear attention keeps a fixed-size state instead of a growing cache. The state decays a
little at every step and is updated with the new key and value, so long inputs cost the same
memory as short ones. Hybrid models mix a few full attention layers with many linear ones.

The weather was cold and clear. She opened the window, looked at the mountains, and decided
that today she would finally finish the book she had started writing three years ago. Her
friends had asked about it many times, and she had always said that it was nearly done.

Numbers and dates: 1, 2, 3, 10, 42, 100, 256, 1024, 2048, 65536. On 12 March 2024 at 09:30
the meeting started; it ended at 11:45. The price rose from $3.50 to $4.25 (an increase of
about 21%). Email: user@example.com. Visit https://example.org/docs/index.html for details.
"""

PYTHON = '''\
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Point:
    x: float
    y: float

    def norm(self) -> float:
        return (self.x * self.x + self.y * self.y) ** 0.5


def read_config(path: str) -> dict:
    """Read a JSON config file and return it as a dictionary."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fibonacci(n: int) -> list[int]:
    result = [0, 1]
    for i in range(2, n):
        result.append(result[i - 1] + result[i - 2])
    return result[:n]


class Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, word: str) -> None:
        self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, k: int = 10) -> list[tuple[str, int]]:
        items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return items[:k]


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [pow(2.718281828, v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def main() -> int:
    path = Path(os.environ.get("CONFIG", "config.json"))
    if not path.exists():
        print(f"error: {path} not found")
        return 1
    config = read_config(str(path))
    for key, value in config.items():
        print(key, "=", value)
    counter = Counter()
    for word in "the cat sat on the mat and the dog sat too".split():
        counter.add(word)
    print(counter.most_common(3))
    print(fibonacci(10), softmax([1.0, 2.0, 3.0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''

CHAT = """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Write a function that returns the sum of a list.<|im_end|>
<|im_start|>assistant
def total(xs):
    return sum(xs)<|im_end|>
"""

CORPUS: tuple[str, ...] = (ENGLISH, PYTHON, CHAT)
