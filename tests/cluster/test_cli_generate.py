"""`expertmesh generate --local` end to end: checkpoint files -> our loader -> tokens equal
transformers' greedy decode of the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.cli import main
from workers.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=3, tokenizer=False)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_matches_transformers_greedy(tiny_dir, capsys):
    from transformers import Qwen3NextForCausalLM

    prompt = list(range(5, 75))  # 70 tokens: over one DeltaNet chunk
    code, out, _ = _run(
        capsys,
        "generate",
        "--local",
        "--model",
        str(tiny_dir),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--logprobs",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    hf = Qwen3NextForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert result["token_ids"] == ref.sequences[0, len(prompt) :].tolist()
    ref_lp = [
        torch.log_softmax(s[0], -1)[t].item()
        for s, t in zip(ref.logits, result["token_ids"], strict=True)
    ]
    assert max(abs(a - b) for a, b in zip(result["logprobs"], ref_lp, strict=True)) < 1e-4
    assert result["completion_tokens"] == 16 and result["prompt_tokens"] == 70


def test_batch_of_prompts_prints_one_object_each(tiny_dir, capsys):
    code, out, _ = _run(
        capsys,
        "generate",
        "--local",
        "--model",
        str(tiny_dir),
        "--prompt-ids",
        "1,2,3",
        "--prompt-ids",
        "4,5",
        "--max-tokens",
        "3",
        "--json",
    )
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert code == 0 and [len(x["token_ids"]) for x in lines] == [3, 3]
    assert "logprobs" not in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,x"], "--prompt-ids"),
        (["--prompt-ids", "1", "--temperature", "-1"], "temperature"),
        (["--prompt-ids", "1", "--max-tokens", "0"], "max_tokens"),
        (["--prompt", "hello"], "no tokenizer.json"),
        (["--prompt-ids", "99999"], "outside"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(tiny_dir, capsys, args, message):
    code, _, err = _run(capsys, "generate", "--local", "--model", str(tiny_dir), *args)
    assert code != 0 and message in err


def test_missing_model_dir(tmp_path, capsys):
    code, _, err = _run(
        capsys, "generate", "--local", "--model", str(tmp_path), "--prompt-ids", "1"
    )
    assert code == 2 and "config.json" in err


def test_text_prompt_with_tokenizer(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "m", preset="tiny", seed=0)
    code, out, _ = _run(
        capsys,
        "generate",
        "--local",
        "--model",
        str(model),
        "--prompt",
        "def f(x):",
        "--chat",
        "--max-tokens",
        "4",
        "--json",
    )
    assert code == 0 and len(json.loads(out)["token_ids"]) <= 4


def test_checkpoint_saved_by_transformers_without_tokenizer(tmp_path, capsys):
    """A directory written by transformers' save_pretrained (its own config layout, no
    tokenizer, no EOS): --prompt-ids works and greedy tokens equal transformers'."""
    from tests.workers.hf_reference import TINY_HF, perturbed_hf_model

    hf = perturbed_hf_model(TINY_HF, seed=4)
    hf.save_pretrained(tmp_path)
    prompt = list(range(1, 71))
    code, out, _ = _run(capsys, "generate", "--local", "--model", str(tmp_path), "--prompt-ids",
                        ",".join(map(str, prompt)), "--max-tokens", "12", "--json")  # fmt: skip
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert code == 0
    assert json.loads(out)["token_ids"] == ref[0, len(prompt) :].tolist()
