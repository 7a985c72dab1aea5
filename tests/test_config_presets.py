"""Presets as keyword overrides, and configs the model cannot run are refused."""
import dataclasses

import pytest

from qwen_batched import ModelConfig
from qwen_batched.config import PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_validate(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.vision.out_hidden_size == cfg.text.hidden_size
    assert ModelConfig.from_name(f"Qwen2.5-VL-{name.upper()}-Instruct") == cfg


def test_large_presets_have_their_shapes():
    c72 = ModelConfig.from_name("72b").text
    assert (c72.hidden_size, c72.num_hidden_layers, c72.num_attention_heads, c72.num_key_value_heads) == (8192, 80, 64, 8)
    assert ModelConfig.from_name("7b").text.hidden_size == 3584 and ModelConfig.from_name("3b").text.hidden_size == 2048


@pytest.mark.parametrize("part", ["text", "vision"])
def test_unimplemented_activation_is_refused(part):
    cfg = ModelConfig.from_name("tiny")
    bad = dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), hidden_act="gelu_pytorch_tanh")})
    with pytest.raises(ValueError, match="hidden_act 'gelu_pytorch_tanh' is not implemented"):
        bad.validate()


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown config name"):
        ModelConfig.from_name("13b")
