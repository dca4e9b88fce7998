"""Token sampling for a batch: penalties, logit bias, min_tokens, grammar masks, then greedy or
temperature / top-k / top-p / min-p sampling with per-request RNGs; logprobs and alternatives.

Shape legend: B sequences sampled in the step, V vocab, K alternatives (top_logprobs).

Order of the processing (vLLM's): repetition penalty (HF: logits of tokens in the prompt or
output divided by r where positive, multiplied where negative), frequency and presence penalties
(OpenAI: logit - frequency * count - presence * [count > 0], counting output tokens), logit bias,
min_tokens (end-of-sequence and stop token ids banned before the min), grammar mask, then
temperature, top-k, top-p, min-p. Every step is one tensor operation over the rows that need it.

Logprobs (of the sampled token and of the top-K alternatives) are of the model's RAW
distribution, log_softmax of the logits before any of the processing above (vLLM's default).

Per-request state (output token counts, tokens seen, the grammar matcher) lives in a
`SamplingState`, advanced with every output token, so a request resumed from its tokens rebuilds
it by replaying them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.structured import GrammarCompiler, GrammarState, MaskPrefetch, allowed_tokens

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)
_NEG_INF = float("-inf")


class SamplingError(ValueError):
    """An invalid sampling parameter; the message starts with its name."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # no end of sequence / stop token id / stop string before this many
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per output token (with logprobs), up to 20
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob + k alts
    presence_penalty: float = 0.0  # OpenAI, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI, in [-2, 2]
    repetition_penalty: float = 1.0  # HF, > 0 (1 = off); prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    grammar: str | None = None  # llguidance grammar (workers/structured.py): output must match
    n: int = 1  # choices sampled from one prefill; choice i draws like seed + i
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens > 0, "max_tokens", "> 0"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                "temperature",
                "a finite number >= 0",
            ),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (_is_int(self.top_k) and self.top_k >= -1, "top_k", ">= -1 (0/-1 = off)"),
            (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (_is_int(self.min_tokens) and 0 <= self.min_tokens, "min_tokens", ">= 0"),
            (
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"<= max_tokens ({self.max_tokens})",
            ),
            (
                _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                "top_logprobs",
                f"in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (
                self.prompt_logprobs is None
                or (
                    _is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
                ),
                "prompt_logprobs",
                f"None or in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty",
                "a finite number > 0",
            ),
            (_is_int(self.n) and self.n >= 1, "n", ">= 1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise SamplingError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingError(f"logit_bias has {len(self.logit_bias)} entries (max 300)")
        for token, bias in self.logit_bias:
            if not _is_int(token) or token < 0:
                raise SamplingError(f"logit_bias: token id {token!r} is not an integer >= 0")
            if not -100 <= bias <= 100:
                raise SamplingError(
                    f"logit_bias: bias {bias!r} of token {token} is not in [-100, 100]"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def token_ids(self) -> list[int]:
        """Token ids the request names (stop_token_ids, logit_bias), for range checks."""
        return [*self.stop_token_ids, *(t for t, _ in self.logit_bias)]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------- per-request state
class SamplingState:
    """What sampling a request needs besides its params: counts of its output tokens, the tokens
    it has seen (prompt + output, for the repetition penalty), its grammar matcher, and how many
    tokens it has produced. Advanced with every output token (and by replaying them)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        end_ids: Sequence[int] = (),
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.num_output = 0
        self.counts = torch.zeros(vocab_size, dtype=torch.int32) if params.penalized else None
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long)] = True
        # banned until min_tokens: end of sequence (unless ignored) and the stop token ids
        self.end_ids = sorted(set(params.stop_token_ids) | set(end_ids))
        self.grammar: GrammarState | None = None
        if params.grammar is not None:
            if grammars is None:
                raise SamplingError("grammar: structured output needs the model's tokenizer")
            self.grammar = GrammarState(grammars.matcher(params.grammar))
        self.error: str | None = None  # set when the grammar rejects a replayed token

    def advance(self, token: int) -> None:
        self.num_output += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.grammar is not None and self.error is None and not self.grammar.advance(token):
            self.error = f"the grammar does not allow token {token}: {self.grammar.error}"

    def replay(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.advance(t)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but end of sequence may follow."""
        return self.grammar is not None and self.grammar.done

    @property
    def in_min_tokens(self) -> bool:
        return self.num_output < self.params.min_tokens

    @property
    def processes(self) -> bool:
        """Whether this step changes the logits before sampling (penalty, bias, ban, mask)."""
        p = self.params
        return bool(
            self.counts is not None
            or self.seen is not None
            or p.logit_bias
            or (self.in_min_tokens and self.end_ids)
            or self.grammar is not None
        )


@dataclass
class Sampled:
    """One step's sampling result. `errors` maps a row to why it could not be sampled (its
    token is -1); the other rows are unaffected."""

    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] raw logprob of each token
    top_ids: torch.Tensor | None = None  # [B, K] most likely tokens (raw distribution)
    top_logprobs: torch.Tensor | None = None  # [B, K]
    errors: dict[int, str] = field(default_factory=dict)

    def top(self, row: int, k: int) -> list[tuple[int, float]]:
        """The k most likely (token, raw logprob) of a row, most likely first."""
        if k == 0 or self.top_ids is None:
            return []
        ids, lps = self.top_ids[row, :k].tolist(), self.top_logprobs[row, :k].tolist()
        return list(zip(ids, lps, strict=True))


# ------------------------------------------------------------------------------ sampling
def prefetch_masks(states: Sequence[SamplingState | None], vocab_size: int) -> MaskPrefetch | None:
    """Start filling the grammar masks of these requests on a worker thread (call before the
    forward pass; hand the result to `sample`). None when no request has a grammar."""
    grammars = [s.grammar for s in states if s is not None and s.grammar is not None]
    return MaskPrefetch(grammars, vocab_size) if grammars else None


def sample(
    logits: torch.Tensor,
    states: Sequence[SamplingState],
    generators: Sequence[torch.Generator | None],
    masks: MaskPrefetch | None = None,
) -> Sampled:
    """logits [B, V] fp32 -> the next token of every row (see the module docstring). Each
    full-vocabulary pass counts at B x 150k: one log-sum-exp of the raw logits (logprobs), one
    max of the processed ones (greedy tokens, rows left with nothing), and for sampled rows
    exp + cumsum + a binary search."""
    lse = torch.logsumexp(logits, dim=-1)  # [B] raw normaliser
    x = process_logits(logits, states, masks)
    best, tokens = x.max(dim=-1)  # [B]
    errors = _check_rows(best, states)
    rows = [i for i, s in enumerate(states) if not s.params.greedy and i not in errors]
    if rows:
        draw = _draw if len(rows) == len(states) else _draw_rows
        tokens = tokens.clone()
        picked = draw(x, best, rows, [states[i].params for i in rows], generators)
        tokens[rows if len(rows) != len(states) else slice(None)] = picked
    for i in errors:
        tokens[i] = -1
    logprobs = logits.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1) - lse
    out = Sampled(tokens, logprobs, errors=errors)
    k = max((s.params.top_logprobs for s in states if s.params.logprobs), default=0)
    if k:
        vals, out.top_ids = torch.topk(logits, k, dim=-1)
        out.top_logprobs = vals - lse[:, None]
    return out


def prompt_logprobs(
    logits: torch.Tensor, targets: Sequence[int], k: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """logits [n, V] of n positions, the token that followed each -> per position (raw logprob
    of that token, its k most likely alternatives)."""
    raw = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = raw.gather(-1, torch.tensor(list(targets), dtype=torch.long)[:, None])[:, 0]
    if k:
        vals, ids = torch.topk(raw, k, dim=-1)
        tops = [
            list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)
        ]
    else:
        tops = [[] for _ in targets]
    return list(zip(chosen.tolist(), tops, strict=True))


def process_logits(
    logits: torch.Tensor, states: Sequence[SamplingState], masks: MaskPrefetch | None = None
) -> torch.Tensor:
    """Penalties, bias, min_tokens bans and grammar masks applied to a copy of logits [B, V]
    (logits themselves when no row needs any). `masks`: rows filled ahead (prefetch_masks)."""
    if not any(s.processes for s in states):
        return logits
    x = logits.float().clone()
    _repetition_penalty(x, states)
    _frequency_presence(x, states)
    _logit_bias(x, states)
    _min_tokens(x, states)
    _grammar_masks(x, states, masks)
    return x


def _repetition_penalty(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
    rows = [i for i, s in enumerate(states) if s.seen is not None]
    if not rows:
        return
    idx = torch.tensor(rows)
    seen = torch.stack([states[i].seen for i in rows])  # [R, V]
    r = torch.tensor([states[i].params.repetition_penalty for i in rows])[:, None]
    sub = x[idx]
    penalized = torch.where(sub > 0, sub / r, sub * r)
    x[idx] = torch.where(seen, penalized, sub)


def _frequency_presence(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
    rows = [i for i, s in enumerate(states) if s.counts is not None]
    if not rows:
        return
    idx = torch.tensor(rows)
    counts = torch.stack([states[i].counts for i in rows]).float()  # [R, V]
    freq = torch.tensor([states[i].params.frequency_penalty for i in rows])[:, None]
    pres = torch.tensor([states[i].params.presence_penalty for i in rows])[:, None]
    x[idx] -= freq * counts + pres * (counts > 0).float()


def _logit_bias(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
    entries = [
        (i, t, b) for i, s in enumerate(states) for t, b in s.params.logit_bias if t < x.shape[1]
    ]
    if entries:
        rows, toks, bias = zip(*entries, strict=True)
        x.index_put_((torch.tensor(rows), torch.tensor(toks)), torch.tensor(bias), accumulate=True)


def _min_tokens(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
    pairs = [(i, t) for i, s in enumerate(states) if s.in_min_tokens for t in s.end_ids]
    pairs = [(i, t) for i, t in pairs if t < x.shape[1]]
    if pairs:
        rows, toks = zip(*pairs, strict=True)
        x[torch.tensor(rows), torch.tensor(toks)] = _NEG_INF


def _grammar_masks(
    x: torch.Tensor, states: Sequence[SamplingState], masks: MaskPrefetch | None
) -> None:
    rows = [i for i, s in enumerate(states) if s.grammar is not None and s.error is None]
    if not rows:
        return
    ready = masks.get() if masks is not None else {}
    missing = [states[i].grammar for i in rows if id(states[i].grammar) not in ready]
    if missing:  # not prefetched (e.g. choices forked this step): fill now
        filled = allowed_tokens(missing, x.shape[1])
        ready |= {id(g): filled[j] for j, g in enumerate(missing)}
    allowed = torch.stack([ready[id(states[i].grammar)] for i in rows])  # [G, V]
    banned = allowed.logical_not_()
    if len(rows) == x.shape[0]:
        x.masked_fill_(banned, _NEG_INF)
    else:
        idx = torch.tensor(rows)
        x[idx] = x[idx].masked_fill_(banned, _NEG_INF)


def _check_rows(best: torch.Tensor, states: Sequence[SamplingState]) -> dict[int, str]:
    """Rows that cannot be sampled: a grammar already broken, or no token left allowed (their
    best processed logit is -inf)."""
    errors = {i: s.error for i, s in enumerate(states) if s.error is not None}
    for i in torch.isneginf(best).nonzero().flatten().tolist():
        if i in errors:
            continue
        s = states[i]
        why = "no token satisfies the request's constraints"
        if s.grammar is not None:
            why = "the grammar allows no next token"
            if s.in_min_tokens:
                why += f" that min_tokens ({s.params.min_tokens}) does not ban"
        errors[i] = why + f" (after {s.num_output} output tokens)"
    return errors


def _draw_rows(
    x: torch.Tensor,
    best: torch.Tensor,
    rows: list[int],
    params: Sequence[SamplingParams],
    gens: Sequence[torch.Generator | None],
) -> torch.Tensor:
    idx = torch.tensor(rows)
    return _draw(x[idx], best[idx], list(range(len(rows))), params, [gens[i] for i in rows])


def _draw(
    x: torch.Tensor,
    best: torch.Tensor,
    rows: list[int],
    params: Sequence[SamplingParams],
    gens: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Sample every row of processed logits x [S, V] (best: each row's max): temperature,
    top-k, top-p, min-p, then one uniform draw per row from its own generator (inverse CDF
    over the unnormalised probabilities)."""
    inv_t = 1.0 / torch.tensor([p.temperature for p in params])[:, None]  # [S, 1]
    scaled = torch.addcmul(-best[:, None] * inv_t, x, inv_t)  # (x - max) / T: [S, V], max 0
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        scaled = _top_k_top_p(scaled, params)
    weights = scaled.exp_()  # the most likely token weighs 1
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    if bool((min_p > 0).any()):
        weights.masked_fill_(weights < min_p, 0.0)
    cdf = weights.cumsum(dim=-1)  # [S, V]
    u = torch.stack([1.0 - torch.rand((), generator=gens[i]) for i in rows])  # (0, 1]
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=x.shape[1] - 1)


def _top_k_top_p(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Keep each row's top_k tokens and the smallest set whose probability reaches top_p (the
    most likely token always stays). Sorts only the largest top_k when every row has one."""
    s, v = scaled.shape
    ks = [p.top_k if p.top_k > 0 else v for p in params]
    width = min(max(ks), v)
    ordered, order = torch.topk(scaled, width, dim=-1)  # [S, width], descending
    drop = torch.arange(width)[None, :] >= torch.tensor(ks)[:, None]
    probs = torch.softmax(scaled, dim=-1).gather(1, order)  # full-vocab probabilities
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalised over the top_k kept
    ps = torch.tensor([p.top_p for p in params])[:, None]
    drop |= (probs.cumsum(dim=-1) - probs) >= ps
    out = torch.full_like(scaled, _NEG_INF)
    return out.scatter(1, order, ordered.masked_fill(drop, _NEG_INF))
