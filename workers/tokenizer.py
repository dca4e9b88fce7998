"""Text side of a checkpoint: `tokenizer.json` (HF tokenizers) and the chat template in
`tokenizer_config.json` (Jinja, rendered like transformers does). transformers is not needed."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """Missing or unusable tokenizer files, or a chat request the template cannot render."""


class TextTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer.json: not found in {model_dir} (use token ids instead)"
            )
        self._tok = Tokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        self.eos_token: str | None = _token_str(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def vocab(self) -> dict[str, int]:
        """Token string -> id (added tokens included)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def added_tokens(self) -> dict[str, int]:
        """Tokens added to the vocabulary (special or not) -> id, e.g. `<tool_call>`."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def to_json(self) -> str:
        """The tokenizer.json text (for llguidance's view of the vocabulary)."""
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render like transformers' `apply_chat_template(..., tokenize=False)`: the template
        sees `messages`, `tools` (OpenAI-style function specs), `add_generation_prompt`, the
        special tokens and any extra keyword (chat_template_kwargs, e.g. enable_thinking)."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (tokenizer_config.json)")
        try:
            template = _environment().from_string(self.chat_template)
            context = {
                "bos_token": _token_str(self.config.get("bos_token")) or "",
                "eos_token": self.eos_token or "",
                **kwargs,
            }
            return template.render(
                context,
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc


class IncrementalDetokenizer:
    """Text of a growing list of ids, emitted as deltas; holds back incomplete UTF-8."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""

    def push(self, ids: list[int]) -> str:
        """All output ids so far -> the new text since the last call."""
        full = self.tokenizer.decode(ids)
        if full.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta = full[len(self.text) :] if full.startswith(self.text) else full
        self.text = full
        return delta

    def replay(self, ids: list[int]) -> str:
        """Rebuild the state that pushing ids one by one would leave (for a resumed request):
        the text of the longest prefix whose decode does not end in an incomplete character."""
        for end in range(len(ids), 0, -1):
            full = self.tokenizer.decode(ids[:end])
            if not full.endswith("\ufffd"):
                self.text = full
                return full
        self.text = ""
        return ""


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: plain json.dumps (Jinja's own escapes HTML characters)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    """A sandbox with what chat templates on the Hub expect (as transformers sets it up)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
