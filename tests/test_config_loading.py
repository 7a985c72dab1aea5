"""Config parsing (flat published, nested transformers-5, presets) and safetensors checkpoint loading."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_batched import ModelConfig, QwenBatchedVL
from tests.helpers import make_hf_model, rel_err

SHARED = os.path.join(os.path.dirname(__file__), "..", "qwen_batched", "configs")


@pytest.mark.parametrize("name,hidden,layers,kv,out,tie", [
    ("3b", 2048, 36, 2, 2048, True), ("7b", 3584, 28, 4, 3584, False),
    ("32b", 5120, 64, 8, 5120, False), ("72b", 8192, 80, 8, 8192, False),
])
def test_presets(name, hidden, layers, kv, out, tie):
    cfg = ModelConfig.from_name(name)
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.num_key_value_heads) == (hidden, layers, kv)
    assert cfg.vision.out_hidden_size == out and cfg.tie_word_embeddings == tie
    assert cfg.vision.depth == 32 and cfg.vision.hidden_size == 1280 and cfg.vision.fullatt_block_indexes == (7, 15, 23, 31)
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.rope_theta == 1e6 and cfg.vision.tokens_per_second == 2
    assert cfg.image_token_id == 151655 and 151645 in cfg.eos_token_ids


def test_tiny_preset_and_unknown_name():
    cfg = ModelConfig.from_name("tiny")
    assert cfg.vision.window_size == 112 and cfg.vision.patch_size == 14 and cfg.image_token_id < cfg.text.vocab_size
    with pytest.raises(ValueError, match="unknown config name"):
        ModelConfig.from_name("13b")


def _published_7b():
    with open(os.path.join(SHARED, "7b.config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("rope", [
    {"type": "mrope", "mrope_section": [16, 24, 24]},
    {"rope_type": "mrope", "mrope_section": [16, 24, 24]},
    {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
])
def test_flat_rope_variants(rope):
    d = _published_7b()
    d["rope_scaling"] = rope
    cfg = ModelConfig.from_dict(d)
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.rope_theta == 1e6


def test_nested_transformers5_format_round_trips():
    from transformers import Qwen2_5_VLConfig

    flat = ModelConfig.from_dict(_published_7b())
    hf = Qwen2_5_VLConfig(**_published_7b())  # transformers re-saves it nested
    nested = ModelConfig.from_dict(hf.to_dict())
    assert "text_config" in hf.to_dict()
    assert nested.text == flat.text
    assert nested.vision.out_hidden_size == flat.vision.out_hidden_size and nested.vision.in_channels == 3


def test_missing_keys_default_as_transformers_or_are_named():
    """Keys the reference has defaults for take its defaults; those without one are a ValueError naming them;
    a config tied at either level (older saves: text_config only) is tied, as transformers reads it."""
    from transformers import Qwen2_5_VLConfig

    d = _published_7b()
    for key in ("rms_norm_eps", "max_position_embeddings"):
        d.pop(key, None)
    ref = Qwen2_5_VLConfig(**d).text_config
    cfg = ModelConfig.from_dict(d)
    assert cfg.text.rms_norm_eps == ref.rms_norm_eps and cfg.text.max_position_embeddings == ref.max_position_embeddings
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        broken = {k: v for k, v in _published_7b().items() if k != key}
        with pytest.raises(ValueError, match=f"config has no {key}"):
            ModelConfig.from_dict(broken)
    tied = {**_published_7b(), "tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}
    assert ModelConfig.from_dict(tied).tie_word_embeddings == Qwen2_5_VLConfig(**tied).tie_word_embeddings is True


def test_generation_config_eos_ids_are_added_after_the_configs():
    from qwen_batched.config import with_generation_eos

    cfg = ModelConfig.from_dict(_published_7b())
    assert with_generation_eos(cfg, None) is cfg
    assert with_generation_eos(cfg, 151643).eos_token_ids == (*cfg.eos_token_ids, 151643)
    assert with_generation_eos(cfg, [151645, 151643]).eos_token_ids == tuple(dict.fromkeys(
        (*cfg.eos_token_ids, 151645, 151643)))
    for bad in ("151643", [1.5], [-1], True):
        with pytest.raises(ValueError, match="eos_token_id must be a token id"):
            with_generation_eos(cfg, bad)


def test_other_architecture_rejected():
    with pytest.raises(ValueError, match="not a Qwen2.5-VL config"):
        ModelConfig.from_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(TypeError):
        ModelConfig.from_dict([1, 2])


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model()


def _features(model):
    g = torch.Generator().manual_seed(5)
    grids = torch.tensor([[1, 8, 8], [1, 6, 4]])
    pv = torch.randn(88, 1176, generator=g)
    return model.encode_images(pv, grids)


def test_from_pretrained_matches_from_hf(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    ours = QwenBatchedVL.from_pretrained(tmp_path)
    ref = QwenBatchedVL.from_hf(hf_model)
    assert rel_err(_features(ours), _features(ref)) == 0.0
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_from_hf_shares_tensors(hf_model):
    ours = QwenBatchedVL.from_hf(hf_model)
    assert ours.visual.blocks[0].attn.qkv.weight.data_ptr() == hf_model.model.visual.blocks[0].attn.qkv.weight.data_ptr()
    assert ours.visual.patch_embed.proj.weight.data_ptr() == hf_model.model.visual.patch_embed.proj.weight.data_ptr()


def test_sharded_checkpoint(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = QwenBatchedVL.from_pretrained(tmp_path)
    assert rel_err(_features(ours), _features(QwenBatchedVL.from_hf(hf_model))) == 0.0


def test_in_memory_key_names_and_dtype(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}  # model.visual.*, model.language_model.*
    assert any(k.startswith("model.language_model.") for k in sd)
    os.remove(tmp_path / "model.safetensors")
    save_file(sd, tmp_path / "model.safetensors")
    ours = QwenBatchedVL.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert ours.visual.blocks[0].norm1.weight.dtype == torch.bfloat16


def test_tied_embeddings(tmp_path):
    import dataclasses
    from tests.helpers import tiny_model_config

    cfg = dataclasses.replace(tiny_model_config(), tie_word_embeddings=True)
    hf = make_hf_model(cfg)
    hf.save_pretrained(tmp_path)
    assert not any(k.startswith("lm_head") for k in load_file(tmp_path / "model.safetensors"))
    ours = QwenBatchedVL.from_pretrained(tmp_path)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def _resave(tmp_path, edit):
    sd = load_file(tmp_path / "model.safetensors")
    edit(sd)
    save_file(sd, tmp_path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    _resave(tmp_path, lambda sd: sd.pop("visual.blocks.1.attn.qkv.bias"))
    with pytest.raises(ValueError, match=r"missing tensors .*visual\.blocks\.1\.attn\.qkv\.bias"):
        QwenBatchedVL.from_pretrained(tmp_path)


def test_misshaped_and_unexpected_tensors_are_named(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)

    def edit(sd):
        sd["model.norm.weight"] = torch.ones(7)
        sd["visual.extra.weight"] = torch.ones(2)
    _resave(tmp_path, edit)
    with pytest.raises(ValueError) as e:
        QwenBatchedVL.from_pretrained(tmp_path)
    assert "model.norm.weight: checkpoint (7,)" in str(e.value) and "visual.extra.weight" in str(e.value)
    assert "missing" not in str(e.value)


def test_checkpoint_file_errors(tmp_path, hf_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QwenBatchedVL.from_pretrained(tmp_path / "nope")
    hf_model.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        QwenBatchedVL.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded"):
        QwenBatchedVL.from_pretrained(tmp_path)


def test_non_float_dtype_and_a_file_path_are_clear_errors(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    for dtype in (torch.int64, "int32"):
        with pytest.raises(TypeError, match="floating-point dtype"):
            QwenBatchedVL.from_pretrained(tmp_path, dtype=dtype)
    with pytest.raises(TypeError, match="floating-point dtype"):
        QwenBatchedVL.from_config("tiny", dtype=torch.int64)
    with pytest.raises(FileNotFoundError, match="is a file; pass the checkpoint directory"):
        QwenBatchedVL.from_pretrained(tmp_path / "config.json")


def test_from_config_and_backend_errors():
    m = QwenBatchedVL.from_config("tiny", seed=1)
    m2 = QwenBatchedVL.from_config("tiny", seed=1)
    assert torch.equal(m.visual.blocks[0].attn.qkv.weight, m2.visual.blocks[0].attn.qkv.weight)
    assert torch.all(m.visual.blocks[0].norm1.weight == 1) and torch.all(m.visual.blocks[0].attn.qkv.bias == 0)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        QwenBatchedVL.from_config("tiny", attn_backend="xformers")
    with pytest.raises(ValueError, match="flash-attn|CUDA"):
        QwenBatchedVL.from_config("tiny", attn_backend="flash")
    with pytest.raises(TypeError, match="dtype"):
        QwenBatchedVL.from_config("tiny", dtype="float99")


def test_published_flat_config_checkpoint_loads(tmp_path, hf_model):
    """A checkpoint whose config.json is in the published flat format (text fields at top level,
    rope_scaling {type: mrope}, vision in_chans) with a generation_config.json listing two EOS ids."""
    hf_model.save_pretrained(tmp_path)
    nested = json.loads((tmp_path / "config.json").read_text())
    text, vision = nested.pop("text_config"), nested.pop("vision_config")
    rope = text.pop("rope_parameters")
    flat = {**nested, **{k: v for k, v in text.items() if k not in ("model_type", "layer_types")},
            "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
            "vision_config": {**{k: v for k, v in vision.items() if k not in ("in_channels", "rope_parameters")},
                              "in_chans": 3, "spatial_patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256], "pad_token_id": 256}))
    ours = QwenBatchedVL.from_pretrained(tmp_path)
    assert ours.cfg.text == QwenBatchedVL.from_hf(hf_model).cfg.text
    assert set(ours.cfg.eos_token_ids) == {258, 256}
    assert rel_err(_features(ours), _features(QwenBatchedVL.from_hf(hf_model))) == 0.0


def _mixed_hf_model():
    """As transformers 5 builds one from the published config: text model and lm_head in bf16, vision in fp32."""
    hf = make_hf_model()
    hf.model.language_model.to(torch.bfloat16)
    hf.lm_head.to(torch.bfloat16)
    assert {p.dtype for p in hf.parameters()} == {torch.float32, torch.bfloat16}
    return hf


def test_from_hf_mixed_dtypes_needs_dtype():
    hf = _mixed_hf_model()
    with pytest.raises(ValueError, match=r"mixed dtypes \(vision tower: torch\.float32; text model and lm_head: "
                                         r"torch\.bfloat16\); pass dtype="):
        QwenBatchedVL.from_hf(hf)
    with pytest.raises(TypeError, match="floating-point dtype"):
        QwenBatchedVL.from_hf(hf, dtype=torch.int64)


def test_from_hf_mixed_dtypes_converted_to_dtype():
    hf = _mixed_hf_model()
    ours = QwenBatchedVL.from_hf(hf, dtype=torch.float32)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    # fp32 vision tensors are shared, bf16 text tensors converted (copies, not claimed as shared)
    assert ours.visual.blocks[0].attn.qkv.weight.data_ptr() == hf.model.visual.blocks[0].attn.qkv.weight.data_ptr()
    assert ours.model.layers[0].self_attn.q_proj.weight.data_ptr() != \
        hf.model.language_model.layers[0].self_attn.q_proj.weight.data_ptr()
    hf.float()  # the reference in fp32 from the same (bf16-rounded) text weights
    ref = QwenBatchedVL.from_hf(hf)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    got = ours.extract_features(input_ids=ids, attention_mask=torch.ones_like(ids), layers=[-1]).hidden_states[0]
    assert rel_err(got, want) < 1e-5
    bf16 = QwenBatchedVL.from_hf(hf, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_from_hf_parameters_on_several_devices():
    hf = make_hf_model()
    hf.lm_head.to("meta")
    with pytest.raises(ValueError, match=r"several devices \['cpu', 'meta'\]"):
        QwenBatchedVL.from_hf(hf)


def test_every_json_file_is_read_with_one_error(tmp_path, hf_model):
    from qwen_batched.config import read_json

    assert read_json(tmp_path / "absent.json") is None
    hf_model.save_pretrained(tmp_path)
    good = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(good[:-5])
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        QwenBatchedVL.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(good)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation_config\.json must hold a JSON object, got a list"):
        QwenBatchedVL.from_pretrained(tmp_path)
    os.remove(tmp_path / "generation_config.json")
    (tmp_path / "preprocessor_config.json").write_text("{'min_pixels': 1}")
    with pytest.raises(ValueError, match=r"preprocessor_config\.json is not valid JSON"):
        QwenBatchedVL.from_pretrained(tmp_path)
    os.remove(tmp_path / "preprocessor_config.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not a safetensors index"):
        QwenBatchedVL.from_pretrained(tmp_path)
