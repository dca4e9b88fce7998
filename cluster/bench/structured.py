"""`expertmesh bench structured`: what grammar-constrained decoding costs.

The demo tokenizer has 1,024 tokens; masks cost per vocabulary entry, so this benchmark builds
a synthetic byte-level vocabulary of the real model's size (151,936 entries: the 256 bytes,
then the most frequent words, space-prefixed words, whitespace runs and punctuation runs of the
Python standard library's sources) and measures, on it:

* compile: the tokenizer view (once per process), and each grammar kind cold (JSON object,
  a tool's argument schema, the Qwen3-Coder tool-call grammar for 12 tools, a regex) and
  cached (a per-sequence copy of the compiled grammar);
* per decode step at batch B: a stand-in for the model's forward (matmuls that keep the CPU
  busy) followed by `sample()` of B rows: no grammar; all rows constrained with the masks
  filled at sampling time; all rows constrained with the masks prefetched on a thread during
  the forward (what the engine does). Same logits and params otherwise, interleaved rounds.
  Also the mask fill alone. The constrained rows sit at varied points of their grammars
  (each advanced by a random number of valid tokens first).

    expertmesh bench structured --batch 32 --steps 30 --repeats 3
"""

from __future__ import annotations

import collections
import re
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.bench import machine_info, median
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown
from workers.sampler import SamplingParams, SamplingState, prefetch_masks, sample
from workers.structured import (
    GrammarCompiler,
    allowed_tokens,
    json_schema_grammar,
    regex_grammar,
)

VOCAB = 151_936  # Qwen3-Next's logits width
FORWARD_ROWS, FORWARD_MATMULS = 64, 8  # the forward stand-in (see run)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
_PIECES = re.compile(r" ?\w+|\s+|[^\w\s]+")

ARGS_SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "start_line": {"type": "integer", "minimum": 1},
        "end_line": {"type": "integer"},
        "mode": {"enum": ["read", "write", "append"]},
        "options": {
            "type": "object",
            "properties": {"recursive": {"type": "boolean"}, "depth": {"type": "integer"}},
            "additionalProperties": False,
        },
        "patterns": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["path", "mode"],
    "additionalProperties": False,
}
AGENT_TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": list(props)[:1]}}}
    for name, desc, props in [
        ("shell", "Run a command", {"command": {"type": "string"},
                                     "timeout_ms": {"type": "integer"}}),
        ("apply_patch", "Apply a patch", {"patch": {"type": "string"}}),
        ("read_file", "Read a file", {"path": {"type": "string"},
                                       "offset": {"type": "integer"},
                                       "limit": {"type": "integer"}}),
        ("write_file", "Write a file", {"path": {"type": "string"},
                                         "content": {"type": "string"}}),
        ("list_dir", "List a directory", {"path": {"type": "string"},
                                           "recursive": {"type": "boolean"}}),
        ("grep", "Search files", {"pattern": {"type": "string"}, "path": {"type": "string"},
                                  "include": {"type": "array", "items": {"type": "string"}}}),
        ("glob", "Find files", {"pattern": {"type": "string"}}),
        ("edit", "Replace text", {"path": {"type": "string"}, "old": {"type": "string"},
                                  "new": {"type": "string"}, "count": {"type": "integer"}}),
        ("web_fetch", "Fetch a URL", {"url": {"type": "string"}}),
        ("todo", "Update the plan", {"items": {"type": "array", "items": {"type": "object"}}}),
        ("run_tests", "Run tests", {"selector": {"type": "string"},
                                     "verbose": {"type": "boolean"}}),
        ("ask_user", "Ask a question", {"question": {"type": "string"},
                                         "options": {"enum": ["yes", "no", "other"]}}),
    ]
]  # fmt: skip


class _Vocab:
    """What llguidance reads from a tokenizer (llguidance.TokenizerWrapper's interface)."""

    def __init__(self, tokens: list[bytes], specials: list[int], eos: int) -> None:
        self.tokens = tokens
        self.special_token_ids = specials
        self.eos_token_id = eos
        self.bos_token_id = None
        self._ids = {t: i for i, t in enumerate(tokens)}

    def __call__(self, data: bytes) -> list[int]:  # greedy longest match (not used by masks)
        out, i = [], 0
        while i < len(data):
            for j in range(min(len(data), i + 32), i, -1):
                if data[i:j] in self._ids:
                    out.append(self._ids[data[i:j]])
                    i = j
                    break
        return out


def synthetic_vocab(size: int = VOCAB) -> _Vocab:
    """256 bytes + specials + the most frequent stdlib source pieces (deterministic)."""
    counts: collections.Counter[bytes] = collections.Counter()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        counts.update(m.group().encode() for m in _PIECES.finditer(text) if len(m.group()) > 1)
        if len(counts) > 4 * size:
            break
    tokens = [bytes([b]) for b in range(256)]
    specials = list(range(256, 256 + len(SPECIALS)))
    tokens += [s.encode() for s in SPECIALS]
    seen = set(tokens)
    for piece, _ in counts.most_common():
        if len(tokens) >= size:
            break
        if piece not in seen and len(piece) <= 32:
            seen.add(piece)
            tokens.append(piece)
    gen = torch.Generator().manual_seed(0)
    letters = b"abcdefghijklmnopqrstuvwxyz_"
    while len(tokens) < size:  # top up with random lowercase pieces
        n = int(torch.randint(3, 9, (1,), generator=gen))
        piece = bytes(letters[int(i)] for i in torch.randint(0, len(letters), (n,), generator=gen))
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
    return _Vocab(tokens, specials, eos=specials[2])


class _Compiler(GrammarCompiler):
    """GrammarCompiler over a ready llguidance tokenizer (the synthetic vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(None, vocab_size, [])  # type: ignore[arg-type]
        self._tokenizer = tokenizer


def run(
    batch: int,
    steps: int,
    repeats: int,
    seed: int,
    out_dir: str | Path,
    tool_grammar: Callable[[list[dict[str, Any]]], str] | None = None,
) -> dict[str, Any]:
    import llguidance as llg

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    vocab = synthetic_vocab()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=VOCAB)
    tokenizer_s = time.perf_counter() - t0

    grammars = {
        "json_object": json_schema_grammar({"type": "object"}),
        "tool arguments schema": json_schema_grammar(ARGS_SCHEMA),
        "regex (ISO date)": regex_grammar(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    }
    if tool_grammar is not None:
        grammars["Qwen3-Coder calls, 12 tools"] = tool_grammar(AGENT_TOOLS)
    compile_rows = []
    for name, g in grammars.items():
        cold = []
        for _ in range(repeats):
            compiler = _Compiler(lltok, VOCAB)
            t0 = time.perf_counter()
            compiler.prepare(g)
            cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(100):
            compiler.matcher(g)
        compile_rows.append((name, median(cold) * 1e3, (time.perf_counter() - t0) / 100 * 1e6))

    compiler = _Compiler(lltok, VOCAB)
    kinds = list(grammars.values())
    gen = torch.Generator().manual_seed(seed)

    def fresh(row: int) -> SamplingState:
        params = SamplingParams(max_tokens=4096, grammar=kinds[row % len(kinds)])
        state = SamplingState(params, [1], VOCAB, [vocab.eos_token_id], compiler)
        for _ in range(int(torch.randint(0, 40, (1,), generator=gen))):
            allowed = allowed_tokens([state.grammar], VOCAB)[0].nonzero().flatten()
            allowed = allowed[allowed != vocab.eos_token_id]
            if state.done or not len(allowed):
                break
            state.advance(int(allowed[torch.randint(0, len(allowed), (1,), generator=gen)]))
        return state

    states = [fresh(i) for i in range(batch)]
    free = [SamplingState(SamplingParams(max_tokens=4096), [1], VOCAB) for _ in range(batch)]
    weight = torch.randn(2048, 2048, generator=gen) / 45
    hidden = torch.randn(FORWARD_ROWS, 2048, generator=gen)

    def forward() -> None:  # a stand-in for the model's forward pass of the step
        h = hidden
        for _ in range(FORWARD_MATMULS):
            h = torch.tanh(h @ weight)

    forward_runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        forward()
        forward_runs.append(time.perf_counter() - t0)
    forward_s = median(forward_runs)
    modes = ("no grammar", "masks filled at sampling", "masks prefetched during the forward")
    times: dict[str, list[float]] = {m: [] for m in modes}
    mask_s: list[float] = []
    for r in range(repeats):
        for _ in range(steps):
            logits = torch.randn(batch, VOCAB, generator=gen)
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            for mode in modes[r % 3 :] + modes[: r % 3]:  # a different one first each round
                t0 = time.perf_counter()
                masks = prefetch_masks(states, VOCAB) if mode == modes[2] else None
                forward()
                rows = free if mode == modes[0] else states
                result = sample(logits, rows, gens, masks)
                times[mode].append(time.perf_counter() - t0)
                if mode != modes[0]:
                    tokens = result.tokens.tolist()
            t0 = time.perf_counter()
            allowed_tokens([s.grammar for s in states if s.grammar is not None], VOCAB)
            mask_s.append(time.perf_counter() - t0)
            for i, s in enumerate(states):
                if i in result.errors or tokens[i] == vocab.eos_token_id:
                    states[i] = fresh(i)
                    continue
                s.advance(tokens[i])
                if s.done or s.error:
                    states[i] = fresh(i)

    results = {
        "machine": machine_info(),
        "vocab": VOCAB,
        "batch": batch,
        "vocab_build_s": build_s,
        "llguidance_tokenizer_s": tokenizer_s,
        "compile": [{"grammar": n, "cold_ms": c, "copy_us": u} for n, c, u in compile_rows],
        "mask_fill_ms": median(mask_s) * 1e3,
        "forward_standin_ms": forward_s * 1e3,
        "step_ms": {m: median(v) * 1e3 for m, v in times.items()},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "structured.json", results)
    compile_table = markdown_table(
        ["grammar", "compile, cold (ms)", "per-sequence copy (us)"],
        [[n, f"{c:.2f}", f"{u:.1f}"] for n, c, u in compile_rows],
    )
    steps_ms = results["step_ms"]
    base = steps_ms[modes[0]]
    step_table = markdown_table(
        [f"decode step, B={batch}: forward stand-in + sample()", "median (ms)", "x no grammar"],
        [[m, f"{v:.2f}", f"{v / base:.2f}"] for m, v in steps_ms.items()]
        + [["mask fill alone (all rows constrained)", f"{results['mask_fill_ms']:.2f}", ""]],
    )
    intro = (
        f"{machine_line(results['machine'])}\n\nSynthetic byte-level vocabulary of {VOCAB:,} "
        f"tokens; llguidance's view of it built in {tokenizer_s * 1e3:.0f} ms (once per "
        f"process). The forward stand-in ({FORWARD_MATMULS} matmuls of [{FORWARD_ROWS}, 2048] "
        f"x [2048, 2048], ~{forward_s * 1e3:.0f} ms) keeps the CPU busy as the model would. "
        "Preliminary unless run on a quiet machine."
    )
    sections = [("Compile", compile_table), ("Per decode step", step_table)]
    write_markdown(out / "structured.md", "Structured outputs: grammar cost", sections, intro)
    return results
