"""Model configuration: plain dataclasses parsed from a checkpoint's ``config.json``.

Accepts the published flat format (text fields at top level, ``rope_scaling: {type: mrope, ...}``, vision
``in_chans``) and the nested format written by ``transformers`` 5 (``text_config``, ``rope_parameters``).
Named presets: ``"3b"``, ``"7b"`` (published files, vendored), ``"32b"``, ``"72b"`` (known shapes) and
``"tiny"`` (real vision geometry at a small width; random-weight demos and tests).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # columns of pixel_values: C * T * P * P
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:  # patches per LLM token
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:  # window side in merged tokens (112 px -> 4)
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_ids: tuple[int, ...] = (151645,)
    pad_token_id: int = 151643
    bos_token_id: int = 151643
    torch_dtype: str | None = None  # the checkpoint's stored dtype name, e.g. "bfloat16"

    def validate(self) -> "ModelConfig":
        v, t = self.vision, self.text
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError(f"vision hidden_size {v.hidden_size} / num_heads {v.num_heads} must give a head_dim divisible by 4")
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(
                f"text heads: hidden_size {t.hidden_size}, num_attention_heads {t.num_attention_heads} and "
                f"num_key_value_heads {t.num_key_value_heads} must divide evenly"
            )
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if any(i < 0 or i >= v.depth for i in v.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {v.fullatt_block_indexes} out of range for depth {v.depth}")
        if v.window_size % (v.spatial_merge_size * v.patch_size):
            raise ValueError(f"window_size {v.window_size} must be a multiple of merge*patch size")
        for where, act in (("text_config", t.hidden_act), ("vision_config", v.hidden_act)):
            if act not in HIDDEN_ACTS:
                raise ValueError(f"{where}.hidden_act {act!r} is not implemented (the MLPs here use {HIDDEN_ACTS})")
        return self

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Parse a ``config.json`` dict (flat published or nested transformers-5 format)."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in MODEL_TYPES and ARCHITECTURE not in archs:
            raise ValueError(
                f"config is not a Qwen2.5-VL config: model_type={model_type!r}, architectures={archs!r} "
                f"(expected model_type 'qwen2_5_vl')"
            )
        td = dict(d.get("text_config") or {})
        flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}

        def get(key, default=None):  # nested text_config wins over top level
            if key in td and td[key] is not None:
                return td[key]
            return flat.get(key, default)

        def need(key):  # no default in the reference either
            value = get(key)
            if value is None:
                raise ValueError(f"config has no {key} (at the top level or in text_config)")
            return value

        rope = get("rope_scaling") or get("rope_parameters") or {}
        mrope = rope.get("mrope_section")
        if mrope is None:
            raise ValueError("config has no mrope_section in rope_scaling/rope_parameters")
        rope_theta = rope.get("rope_theta", get("rope_theta", 1000000.0))
        text = TextConfig(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=int(need("num_attention_heads")),
            num_key_value_heads=int(get("num_key_value_heads") or need("num_attention_heads")),
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),  # defaults: transformers' Qwen2_5_VLTextConfig
            rope_theta=float(rope_theta),
            mrope_section=tuple(int(x) for x in mrope),
            max_position_embeddings=int(get("max_position_embeddings", 32768)),
            hidden_act=str(get("hidden_act", "silu")),
        )
        vd = d.get("vision_config") or {}
        vrope = vd.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=int(vd.get("depth", 32)),
            hidden_size=int(vd.get("hidden_size", 1280)),
            intermediate_size=int(vd.get("intermediate_size", 3420)),
            num_heads=int(vd.get("num_heads", 16)),
            in_channels=int(vd.get("in_channels", vd.get("in_chans", 3))),
            patch_size=int(vd.get("patch_size", vd.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vd.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vd.get("spatial_merge_size", 2)),
            window_size=int(vd.get("window_size", 112)),
            out_hidden_size=int(vd.get("out_hidden_size", text.hidden_size)),
            fullatt_block_indexes=tuple(int(i) for i in vd.get("fullatt_block_indexes", (7, 15, 23, 31))),
            tokens_per_second=float(vd.get("tokens_per_second", 2)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            hidden_act=str(vd.get("hidden_act", "silu")),
        )
        eos = get("eos_token_id", 151645)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        # as transformers: tied when either level says so (older saves put it in text_config only)
        tie = bool(d.get("tie_word_embeddings")) or bool(td.get("tie_word_embeddings"))
        bos = get("bos_token_id", 151643)
        pad = get("pad_token_id")
        return cls(
            vision=vision,
            text=text,
            tie_word_embeddings=bool(tie),
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            eos_token_ids=eos_ids,
            pad_token_id=int(pad if pad is not None else (bos if bos is not None else 151643)),
            bos_token_id=int(bos if bos is not None else 151643),
            torch_dtype=d.get("torch_dtype") or d.get("dtype") or td.get("dtype"),
        ).validate()

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        d = read_json(path)
        if d is None:
            raise FileNotFoundError(f"no config.json at {path!r}")
        return cls.from_dict(d)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A named preset: '3b', '7b' (the published config files), '32b', '72b' (their shapes) or 'tiny'."""
        key = str(name).lower().replace("qwen2.5-vl-", "").replace("-instruct", "")
        if key not in PRESETS:
            raise ValueError(f"unknown config name {name!r}; expected one of {tuple(PRESETS)}")
        spec = PRESETS[key]
        if isinstance(spec, str):
            return cls.from_dict(json.loads(_read_vendored(spec)))
        base = cls.from_name(spec["base"]) if "base" in spec else cls()
        return replace(base, text=replace(base.text, **spec.get("text", {})),
                       vision=replace(base.vision, **spec.get("vision", {})),
                       **{k: v for k, v in spec.items() if k not in ("base", "text", "vision")}).validate()


HIDDEN_ACTS = ("silu",)  # the activations the SwiGLU MLPs implement

# Special-token ids of the tiny preset: they index into the small byte-level vocabulary built by
# ``qwen_batched.tokenizer.ByteTokenizer`` (256 bytes, then the Qwen special tokens in this order).
TINY_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
TINY_VOCAB = 320
_TINY_ID = {tok: 256 + i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}

# Presets: a vendored config file, or keyword overrides of a base preset (or of the defaults).
PRESETS: dict[str, str | dict] = {
    "3b": "3b.config.json",
    "7b": "7b.config.json",
    "32b": dict(base="7b", text=dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                     num_key_value_heads=8, intermediate_size=27648),
                vision=dict(intermediate_size=3456, out_hidden_size=5120)),
    "72b": dict(base="7b", text=dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                     num_key_value_heads=8, intermediate_size=29568),
                vision=dict(intermediate_size=3456, out_hidden_size=8192)),
    # real Qwen2.5-VL geometry (patch 14, merge 2, window 112, full-attention blocks) at a small width
    "tiny": dict(vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                             fullatt_block_indexes=(1, 3)),
                 text=dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                           max_position_embeddings=32768),
                 image_token_id=_TINY_ID["<|image_pad|>"], video_token_id=_TINY_ID["<|video_pad|>"],
                 vision_start_token_id=_TINY_ID["<|vision_start|>"], vision_end_token_id=_TINY_ID["<|vision_end|>"],
                 eos_token_ids=(_TINY_ID["<|im_end|>"], _TINY_ID["<|endoftext|>"]),
                 pad_token_id=_TINY_ID["<|endoftext|>"], bos_token_id=_TINY_ID["<|endoftext|>"]),
}


def tiny_config() -> ModelConfig:
    return ModelConfig.from_name("tiny")


def read_json(path: str | os.PathLike) -> dict | None:
    """A checkpoint's JSON file as a dict; None when the file does not exist. A file that is not JSON, or whose
    top level is not an object, is a ValueError naming it (every JSON file of a checkpoint is read here)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(d).__name__}")
    return d


def _read_vendored(name: str) -> str:
    return resources.files("qwen_batched.configs").joinpath(name).read_text()


def default_preprocessor_config() -> dict[str, Any]:
    """The published ``preprocessor_config.json`` (min_pixels 3136, max_pixels 12845056)."""
    return json.loads(_read_vendored("preprocessor_config.json"))


def default_chat_template() -> str:
    return _read_vendored("chat_template.jinja")


def with_generation_eos(cfg: ModelConfig, eos) -> ModelConfig:
    """``cfg`` with a generation config's ``eos_token_id`` (None, an int or a list) added after its own EOS ids:
    the published checkpoints stop at <|im_end|> (config.json) and also at <|endoftext|> (generation config)."""
    if eos is None:
        return cfg
    ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise ValueError(f"a generation config's eos_token_id must be a token id or a list of them, got {eos!r}")
    return replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + ids)))


def load_generation_eos(path: str | os.PathLike):
    """``eos_token_id`` of the ``generation_config.json`` next to a checkpoint (None, an int or a list)."""
    return (read_json(os.path.join(os.fspath(path), "generation_config.json")) or {}).get("eos_token_id")
