"""Grammar-constrained decoding with llguidance: compile a grammar once per (tokenizer,
grammar text), give every sequence its own matcher, and turn the matchers' next-token sets into
one boolean mask per step.

A grammar is llguidance's serialized form (a string): built by `json_schema_grammar`,
`regex_grammar`, `choice_grammar` or `lark_grammar` here, or by deploy/tools.py for tool calls,
and carried in `SamplingParams.grammar` (picklable, so it crosses the Serve hop as text).
Compiling happens off the engine thread (`GrammarCompiler.prepare`, called by the async engine
in a worker thread before the request is queued) and is cached; the engine thread only
deep-copies the compiled template. Masks of all constrained sequences of a step are filled in
one call into llguidance's thread pool (it releases the GIL).

Shape legend: G constrained sequences in the step, V model vocab (logits width), W = ceil(V/32).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance as llg
import numpy as np
import torch

from workers.tokenizer import TextTokenizer

# Whitespace allowed between JSON tokens: one space, or a newline and indentation (compact and
# pretty-printed output both fit), never runs of blanks, so a sampler cannot loop on them.
JSON_WHITESPACE = r"(?:[\x20\x09]|\x0D?\x0A[\x20\x09]{0,32})?"
_JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}


class GrammarError(ValueError):
    """A grammar (or schema, regex, choice list) that cannot be compiled; the message says why."""


# ------------------------------------------------------------------------ grammar builders
def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """Output constrained to JSON valid under `schema` (`{"type": "object"}` for json_object)."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None


def regex_grammar(pattern: str) -> str:
    return llg.LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: Sequence[str]) -> str:
    """Output exactly one of `choices`."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("expected a non-empty list of strings")
    return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def lark_grammar(text: str) -> str:
    """A Lark grammar in llguidance's dialect (also takes llama.cpp's GBNF)."""
    try:
        return llg.grammar_from("grammar", text)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None


def json_subschema(schema: dict[str, Any]) -> str:
    """`%json {...}` for use inside a Lark grammar, with the bounded whitespace above."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_OPTIONS})


# ------------------------------------------------------------------------------ compiling
class GrammarCompiler:
    """Compiles grammars against one tokenizer and model vocab (cached, thread-safe)."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        vocab_size: int,
        eos_ids: Sequence[int],
        cache_size: int = 256,
    ) -> None:
        self.vocab_size = vocab_size
        self._source = (tokenizer, list(eos_ids))
        self._tokenizer: llg.LLTokenizer | None = None
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llg.LLTokenizer:
        """llguidance's view of the vocabulary (built on first use: ~1 s for 150k tokens)."""
        with self._lock:
            if self._tokenizer is None:
                tok, eos = self._source
                self._tokenizer = llg.LLTokenizer(
                    tok.to_json(), n_vocab=self.vocab_size, eos_token=eos or None
                )
            return self._tokenizer

    def prepare(self, grammar: str) -> None:
        """Compile `grammar` into the cache (call off the engine thread); GrammarError if bad."""
        self._template(grammar)

    def matcher(self, grammar: str) -> llg.LLMatcher:
        """A fresh matcher at the start of `grammar` (compiles it if `prepare` was not called)."""
        return self._template(grammar).deep_copy()

    def _template(self, grammar: str) -> llg.LLMatcher:
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)  # releases the GIL
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher


# ---------------------------------------------------------------------------- per sequence
class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llg.LLMatcher) -> None:
        self.matcher = matcher

    @property
    def error(self) -> str | None:
        return _short(self.matcher.get_error()) if self.matcher.is_error() else None

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but end-of-sequence."""
        return self.matcher.is_stopped()

    def advance(self, token: int) -> bool:
        """Consume a sampled (or replayed) token; False when the grammar does not allow it."""
        return self.matcher.consume_token(token)


_EXECUTOR: llg.LLExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> llg.LLExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llg.LLExecutor()
        return _EXECUTOR


def allowed_tokens(states: Sequence[GrammarState], vocab_size: int) -> torch.Tensor:
    """The tokens each grammar allows next: bool [G, V]. One parallel fill for all G."""
    words = (vocab_size + 31) // 32
    bits = torch.zeros((len(states), words), dtype=torch.int32)  # [G, W]
    pairs = [(s.matcher, i) for i, s in enumerate(states)]
    _executor().unsafe_compute_mask_ptr(pairs, bits.data_ptr(), words * 4, len(states))
    # bit k of word w is token 32 w + k (little-endian words, bits unpacked LSB first)
    flat = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")  # [G, 32 W]
    return torch.from_numpy(flat[:, :vocab_size]).bool()


_PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")


class MaskPrefetch:
    """The masks of some grammars, filled on a worker thread while the model runs (their next
    tokens depend only on tokens already consumed). Nothing may advance these grammars before
    `get` returns."""

    def __init__(self, states: Sequence[GrammarState], vocab_size: int) -> None:
        self.states = list(states)
        self.vocab_size = vocab_size
        self._future: Future = _PREFETCH.submit(allowed_tokens, self.states, vocab_size)

    def get(self) -> dict[int, torch.Tensor]:
        """id(state) -> its bool [V] row."""
        rows = self._future.result()
        return {id(state): rows[i] for i, state in enumerate(self.states)}


def _short(message: str, limit: int = 400) -> str:
    """llguidance errors carry a parser dump after the first line; keep the reason."""
    first = message.strip().split("\n<state>")[0].strip()
    return first if len(first) <= limit else first[: limit - 3] + "..."
