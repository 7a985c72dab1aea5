"""Prompts: token ids, masks and mm_token_type_ids equal to transformers' Qwen2_5_VLProcessor; chat template text;
tokenizers; prompt errors."""
from __future__ import annotations

import json

import pytest
import torch

from qwen_batched.config import TINY_SPECIAL_TOKENS, default_chat_template, tiny_config
from qwen_batched.processor import BatchedImageProcessor, load_processor
from qwen_batched.prompts import chat_messages, render_builtin, render_jinja
from qwen_batched.tokenizer import ByteTokenizer, load_tokenizer

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CORPUS = ["You are a helpful assistant.", "Describe the image in detail.", "What is in these pictures?",
          "hello world, how are you today?", "Compare the three images and list the differences."] * 4
TEXTS = ["Say hello.", "What is in this image?", "Compare these pictures, please."]


def _noise(h, w, seed):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


IMAGES = [None, [_noise(56, 84, 0)], [_noise(200, 300, 1), _noise(56, 56, 2), _noise(28, 28, 3)]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with the Qwen special tokens (ids depend on training, not on Qwen's)."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=420, special_tokens=QWEN_SPECIAL, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    d = tmp_path_factory.mktemp("ckpt")
    tok.save(str(d / "tokenizer.json"))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": default_chat_template()}))
    return d


def _ids(tok) -> dict[str, int]:
    """Special token ids of the test vocabulary, as a model config would give them."""
    return {name: tok.token_to_id(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("pad_token_id", "<|endoftext|>")]}


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    return BatchedImageProcessor(tokenizer=tok, **_ids(tok))


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    transformers = pytest.importorskip("transformers")

    class NoVideoProcessor(transformers.Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without its (torchvision-only) video processor."""

        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                               pad_token="<|endoftext|>", padding_side="left")
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    return NoVideoProcessor(image_processor=images, tokenizer=tok, chat_template=default_chat_template())


def _hf_inputs(hf, images, texts, chat=True, system_prompt=None):
    prompts = []
    for imgs, text in zip(images, texts):
        n = len(imgs or [])
        if chat:
            prompts.append(hf.apply_chat_template(chat_messages(text, n, system_prompt), tokenize=False,
                                                  add_generation_prompt=True))
        else:
            prompts.append("<|vision_start|><|image_pad|><|vision_end|>" * n + text)
    flat = [x.permute(1, 2, 0).numpy() for s in images for x in (s or [])]
    return hf(images=flat or None, text=prompts, padding=True, return_tensors="pt")


def _assert_same(ours_inputs, ref):
    assert ours_inputs.input_ids.equal(ref["input_ids"])
    assert ours_inputs.attention_mask.equal(ref["attention_mask"])
    assert ours_inputs.mm_token_type_ids.equal(ref["mm_token_type_ids"])


def test_ids_masks_and_types_match_hf(ours, hf):
    got = ours.prepare(IMAGES, TEXTS)
    ref = _hf_inputs(hf, IMAGES, TEXTS)
    _assert_same(got, ref)
    assert got.image_grid_thw.equal(ref["image_grid_thw"])
    assert got.images_per_sample == (0, 1, 3)
    assert got.attention_mask[0, 0] == 0 and got.input_ids[0, 0] == ours.pad_token_id  # left padding
    # one vision block per image, each with t*h*w/4 image tokens
    per_row = (got.input_ids == ours.image_token_id).sum(1).tolist()
    grid_tokens = (got.image_grid_thw.prod(-1) // 4).tolist()
    assert per_row == [0, grid_tokens[0], sum(grid_tokens[1:])]
    assert (got.input_ids == ours.vision_start_token_id).sum(1).tolist() == [0, 1, 3]


def test_raw_prompts_and_custom_system_prompt_match_hf(ours, hf):
    _assert_same(ours.prepare(IMAGES, TEXTS, chat_template=False), _hf_inputs(hf, IMAGES, TEXTS, chat=False))
    sp = "You describe pictures."
    _assert_same(ours.prepare(IMAGES, TEXTS, system_prompt=sp), _hf_inputs(hf, IMAGES, TEXTS, system_prompt=sp))


def test_text_only_batch_matches_hf(ours, hf):
    got = ours.prepare(None, ["hi", "What is the capital of France?"])
    _assert_same(got, _hf_inputs(hf, [None, None], ["hi", "What is the capital of France?"]))
    assert got.pixel_values is None and got.image_grid_thw is None and got.images_per_sample == (0, 0)


def test_right_padding(ours):
    left = ours.prepare(IMAGES, TEXTS)
    right = ours.prepare(IMAGES, TEXTS, padding_side="right")
    for b in range(3):
        assert right.input_ids[b][right.attention_mask[b].bool()].equal(left.input_ids[b][left.attention_mask[b].bool()])
    assert right.attention_mask[0, -1] == 0 and right.attention_mask[0, 0] == 1


def test_builtin_template_equals_rendered_jinja(hf):
    for n in (0, 1, 3):
        for sp in (None, "Be brief."):
            want = hf.apply_chat_template(chat_messages("Hi there", n, sp), tokenize=False, add_generation_prompt=True)
            assert render_builtin("Hi there", n, sp) == want


def test_checkpoint_template_is_rendered_with_jinja(tokenizer_dir, hf):
    custom = default_chat_template().replace("You are a helpful assistant.", "You answer in French.")
    tok = load_tokenizer(tokenizer_dir)
    p = BatchedImageProcessor(tokenizer=tok, chat_template=custom, **_ids(tok))
    assert p.chat_template == custom
    assert p._render("Hi", 2, True, None) == hf.apply_chat_template(
        chat_messages("Hi", 2, None), tokenize=False, add_generation_prompt=True,
        chat_template=custom)
    assert "You answer in French." in p._render("Hi", 0, True, None)


def test_checkpoint_templates_get_what_transformers_gives_them(tokenizer_dir, hf, tmp_path):
    """A fine-tune's template may use the tokenizer's special tokens ({{ eos_token }}), loop controls
    ({% break %}), raise_exception and tojson: rendered as transformers renders them."""
    import shutil

    turn = ("<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}")
    templates = {
        "eos": "{% for m in messages %}" + turn + "{{ eos_token }}\n{% endfor %}<|im_start|>assistant\n",
        "break": "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}" + turn
                 + "<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
        "tojson": "{% for m in messages %}" + turn + "{{ {'n': 'é'} | tojson }}<|im_end|>\n{% endfor %}"
                  "{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}<|im_start|>assistant\n",
    }
    hf.tokenizer.eos_token = "<|im_end|>"
    for name, template in templates.items():
        d = tmp_path / name
        d.mkdir()
        shutil.copy(tokenizer_dir / "tokenizer.json", d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"},
                                                             "chat_template": template}))
        p = BatchedImageProcessor.from_pretrained(d)
        messages = chat_messages("Hi", 1, "Be brief.")
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
        assert p._render("Hi", 1, True, "Be brief.") == ref, name
    with pytest.raises(ValueError, match="too long"):
        render_jinja(templates["tojson"].replace("> 9", "> 0"), "Hi", 0, None)


def test_from_pretrained_loads_tokenizer_and_template(tokenizer_dir, ours):
    p = BatchedImageProcessor.from_pretrained(tokenizer_dir)  # no config.json: ids from the vocabulary
    assert p.image_token_id == ours.image_token_id and p.pad_token_id == ours.pad_token_id
    assert p.chat_template is None  # the published template is rendered by the built-in formatter
    a, b = p.prepare(IMAGES, TEXTS), ours.prepare(IMAGES, TEXTS)
    assert a.input_ids.equal(b.input_ids)


def test_model_inputs_to(ours):
    got = ours.prepare(IMAGES, TEXTS).to("cpu", dtype=torch.float64)
    assert got.pixel_values.dtype == torch.float64 and got.input_ids.dtype == torch.long
    assert set(got.keys()) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}


def test_decoding_roundtrip(ours):
    text = "Describe the image in detail, please."
    got = ours.prepare(None, text, chat_template=False)
    assert ours.batch_decode(got.input_ids) == [text]
    full = ours.decode(ours.prepare(None, "hi").input_ids[0], skip_special_tokens=False)
    assert full.startswith("<|im_start|>system\n") and full.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------- byte tokenizer
def test_byte_tokenizer_matches_tiny_config_ids():
    tok = ByteTokenizer()
    cfg = tiny_config()
    assert tok.vocab_size == 256 + len(TINY_SPECIAL_TOKENS) <= cfg.text.vocab_size
    assert tok.token_to_id("<|image_pad|>") == cfg.image_token_id
    assert tok.token_to_id("<|vision_start|>") == cfg.vision_start_token_id
    assert tok.token_to_id("<|vision_end|>") == cfg.vision_end_token_id
    assert tok.token_to_id("<|endoftext|>") == cfg.pad_token_id
    assert tok.token_to_id("<|im_end|>") in cfg.eos_token_ids


def test_byte_tokenizer_encode_decode():
    tok = ByteTokenizer()
    text = "héllo <|im_start|>wörld<|image_pad|><|image_pad|> ✓<|im_end|"
    ids = tok.encode(text)
    assert ids.count(tok.token_to_id("<|image_pad|>")) == 2 and tok.token_to_id("<|im_start|>") in ids
    assert max(i for i in ids if i < 256) == max(text.encode()) and len(ids) == len(text.encode()) - 12 - 2 * 13 + 3
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "héllo wörld ✓<|im_end|"  # the unterminated marker is plain text
    assert tok.batch_decode(torch.tensor([ids[:5], ids[-5:]])) == [tok.decode(ids[:5]), tok.decode(ids[-5:])]


def test_tiny_processor_prompt_layout():
    p = load_processor(None, tiny_config())
    cfg = tiny_config()
    got = p.prepare([[_noise(56, 56, 0)]], "What?")
    ids = got.input_ids[0].tolist()
    start = ids.index(cfg.vision_start_token_id)
    assert ids[start + 1:start + 5] == [cfg.image_token_id] * 4 and ids[start + 5] == cfg.vision_end_token_id
    assert p.decode(ids) == "system\nYou are a helpful assistant.\nuser\nWhat?\nassistant\n"
    assert got.mm_token_type_ids.sum() == 4


# ------------------------------------------------------------------------------------------- errors
def test_error_texts_type(ours):
    with pytest.raises(TypeError, match="texts must be a str or a non-empty list of str"):
        ours.prepare(None, ["ok", 3])
    with pytest.raises(TypeError, match="texts must be"):
        ours.prepare(None, [])


def test_error_texts_images_count_mismatch(ours):
    with pytest.raises(ValueError, match="texts has 1 prompts but images has 3 samples"):
        ours.prepare(IMAGES, "one prompt")


def test_error_placeholder_in_text(ours):
    with pytest.raises(ValueError, match=r"texts\[0\]: the prompt has 2 <\|image_pad\|> placeholders but the sample has 1"):
        ours.prepare([[_noise(56, 56, 0)]], "look: <|image_pad|>")


def test_error_padding_side(ours):
    with pytest.raises(ValueError, match="padding_side"):
        ours.prepare(None, "hi", padding_side="middle")


def test_error_tokenizer_ids_disagree_with_config(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(ValueError, match="tokenizer maps <\\|image_pad\\|>"):
        BatchedImageProcessor(tokenizer=tok, **{**_ids(tok), "image_token_id": 5})
