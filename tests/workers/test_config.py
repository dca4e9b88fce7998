import json

import pytest

from tests.workers.hf_reference import TINY_HF
from workers.config import ConfigError, ModelConfig


def test_from_hf_reads_every_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    c = ModelConfig.from_hf(tmp_path)
    assert c.layer_types[-1] == "full_attention" and c.linear_layers == (0, 1, 2)
    assert c.rotary_dim == 8 and c.conv_dim == 2 * 32 + 64
    assert c.num_experts == 32 and c.num_experts_per_tok == 4 and c.norm_topk_prob
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_layer_types_default_from_interval():
    raw = {k: v for k, v in TINY_HF.items() if k != "layer_types"}
    raw["num_hidden_layers"] = 8
    c = ModelConfig.from_hf(raw)
    assert c.full_layers == (3, 7)


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"linear_num_key_heads": 3}, "linear_num_key_heads"),
        ({"num_experts_per_tok": 64}, "num_experts_per_tok"),
        ({"layer_types": ["linear_attention"] * 3 + ["sliding"]}, "layer_types[3]"),
        ({"layer_types": ["linear_attention"] * 2}, "layer_types"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type"),
        ({"mlp_only_layers": [1]}, "mlp_only_layers"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_values_name_the_key(patch, key):
    raw = {**TINY_HF, **patch}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_hf(raw)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_config_is_frozen():
    c = ModelConfig.from_hf(TINY_HF)
    with pytest.raises(AttributeError):
        c.hidden_size = 3  # type: ignore[misc]
