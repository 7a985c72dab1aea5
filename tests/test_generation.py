"""Generation against transformers' ``generate`` (greedy, fp32, CPU), stopping, and sampling."""
import dataclasses

import pytest
import torch

from qwen_batched import ModelInputs, QwenBatchedVL
from qwen_batched.config import tiny_config
from qwen_batched.generation import StaticDecoder, sample
from tests.helpers import make_hf_model, model_inputs, pad_rows

N_NEW = 16




def hf_generate(hf, b, n=N_NEW, eos=None):
    """Reference greedy continuation: (B, n) new tokens, padded with the pad id after EOS."""
    cfg = hf.config.text_config
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = cfg.pad_token_id
    kw = {k: b[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if b.get("pixel_values") is not None:
        kw.update(pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"])
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=n, do_sample=False)[:, b["input_ids"].shape[1]:]
    return torch.nn.functional.pad(out, (0, n - out.shape[1]), value=cfg.pad_token_id)


@pytest.fixture(scope="module")
def greedy(models, batch):
    return models[1].generate(**model_inputs(batch), max_new_tokens=N_NEW, eos_token_id=[])


def test_greedy_matches_reference_generate(models, batch, greedy):
    hf, _ = models
    ref = hf_generate(hf, batch)
    assert greedy.sequences.shape == (3, N_NEW)
    for i in range(3):  # every sample of the mixed batch, all 16 tokens
        assert greedy.sequences[i].tolist() == ref[i].tolist(), f"sample {i}"
    assert greedy.lengths.tolist() == [N_NEW] * 3


def test_greedy_alone_equals_batched(models, batch, greedy):
    _, m = models
    for i, (row, grid, px) in enumerate(zip(batch["rows"], batch["grids"], batch["pixels"])):
        kw = dict(pixel_values=px, image_grid_thw=grid) if len(grid) else {}
        alone = m.generate(input_ids=torch.tensor([row]), max_new_tokens=N_NEW, eos_token_id=[], **kw)
        assert alone.sequences[0].tolist() == greedy.sequences[i].tolist(), f"sample {i}"


def test_text_only_batch_matches_reference(models):
    hf, m = models
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 3, 7, 20)]
    b = pad_rows(m.cfg, rows)
    ours = m.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=N_NEW,
                      eos_token_id=[])
    assert ours.sequences.tolist() == hf_generate(hf, b).tolist()


def test_stops_at_eos(models, batch, greedy, monkeypatch):
    """With an EOS every row hits: each row ends at its first EOS (kept), then pads; the loop stops early."""
    hf, m = models
    seqs = greedy.sequences.tolist()
    # per row, the latest token that is new in that row; together they are the EOS ids
    eos = sorted({r[max(k for k in range(N_NEW - 1) if r[k] not in r[:k])] for r in seqs})
    first = [min(k for k, t in enumerate(r) if t in eos) for r in seqs]
    assert 0 < max(first) < N_NEW - 1
    steps = []
    orig = StaticDecoder.forward
    monkeypatch.setattr(StaticDecoder, "forward", lambda self, *a: steps.append(1) or orig(self, *a))
    out = m.generate(**model_inputs(batch), max_new_tokens=N_NEW, eos_token_id=eos)
    pad = m.cfg.pad_token_id
    for i, k in enumerate(first):
        assert out.sequences[i].tolist() == seqs[i][:k + 1] + [pad] * (N_NEW - k - 1)
    assert out.lengths.tolist() == [k + 1 for k in first]
    assert len(steps) == max(first)  # no decode step after the last row stopped
    assert out.sequences.tolist() == hf_generate(hf, batch, eos=eos).tolist()


def test_default_eos_are_checkpoint_ids(models, batch):
    _, m = models
    out = m.generate(**model_inputs(batch), max_new_tokens=N_NEW)  # eos_token_id=None -> cfg.eos_token_ids
    eos = set(m.cfg.eos_token_ids)
    for seq, n in zip(out.sequences.tolist(), out.lengths.tolist()):
        assert not eos & set(seq[:n - 1])
        assert n == N_NEW or seq[n - 1] in eos


# ------------------------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible(models, batch):
    _, m = models
    kw = dict(**model_inputs(batch), max_new_tokens=N_NEW, eos_token_id=[], temperature=1.0, top_p=0.95)
    a = m.generate(**kw, seed=123).sequences
    b = m.generate(**kw, seed=123).sequences
    c = m.generate(**kw, seed=124).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_1_and_tiny_top_p_equal_greedy(models, batch, greedy):
    _, m = models
    kw = dict(**model_inputs(batch), max_new_tokens=N_NEW, eos_token_id=[], temperature=0.8, seed=0)
    assert torch.equal(m.generate(**kw, top_k=1).sequences, greedy.sequences)
    assert torch.equal(m.generate(**kw, top_p=1e-6).sequences, greedy.sequences)


def test_sample_filters_and_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40000, -1)
    seeds = torch.arange(40000)

    def freq(temperature, top_k, top_p, step):
        return torch.bincount(sample(logits, temperature, top_k, top_p, seeds, step), minlength=4) / 40000

    assert (freq(1.0, 0, 1.0, 0) - probs).abs().max() < 0.01  # draws follow the distribution
    freq_k = freq(1.0, 2, 1.0, 1)
    assert freq_k[2:].sum() == 0 and abs(freq_k[0] - 0.625) < 0.01  # top-2 renormalised
    freq_p = freq(1.0, 0, 0.7, 2)
    assert freq_p[2:].sum() == 0 and abs(freq_p[0] - 0.625) < 0.01  # 0.5 + 0.3 reaches 0.7
    sharp = probs ** 2 / (probs ** 2).sum()
    assert (freq(0.5, 0, 1.0, 3) - sharp).abs().max() < 0.01
    assert torch.equal(sample(logits[:3], 0.0, 0, 1.0, None), torch.zeros(3, dtype=torch.long))


def test_draws_are_a_function_of_seed_and_step():
    """Counter-based: a row's draw depends on (its seed, step) only, not on the rows beside it."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    full = sample(logits, 1.0, 0, 1.0, seeds, 5)
    part = sample(logits[[4, 1]], 1.0, 0, 1.0, seeds[[4, 1]], 5)
    assert torch.equal(part, full[[4, 1]])
    steps = torch.stack([sample(logits, 1.0, 0, 1.0, seeds, j) for j in range(8)])
    assert len({tuple(r) for r in steps.T.tolist()}) > 1  # steps draw anew


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature="hot"), ValueError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=1.5), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(eos_token_id="eos"), TypeError, "eos_token_id"),
    (dict(eos_token_id=[10_000]), ValueError, "eos_token_id"),
    (dict(compile="yes"), TypeError, "compile"),
])
def test_bad_generate_args_raise(models, kwargs, err, match, monkeypatch):
    _, m = models
    monkeypatch.setattr(m, "encode_images", lambda *a, **k: pytest.fail("work started before validation"))
    with pytest.raises(err, match=match):
        m.generate(input_ids=torch.tensor([[1, 2, 3]]), **kwargs)


# ------------------------------------------------------------------------------------------- processor path
def test_images_texts_go_through_processor(models):
    """images=/texts= equals passing the processor's outputs by hand; texts are the tokenizer's decoding."""
    pytest.importorskip("qwen_batched.processor")
    hf, m = models
    g = torch.Generator().manual_seed(3)
    images = [None, [torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8, generator=g),
                     torch.randint(0, 256, (3, 100, 50), dtype=torch.uint8, generator=g)],
              torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)]
    texts = ["hello there", "two pictures", "one"]
    x = m.processor.prepare(images, texts, chat_template=True, padding_side="left")
    explicit = dict(input_ids=x.input_ids, attention_mask=x.attention_mask, pixel_values=x.pixel_values,
                    image_grid_thw=x.image_grid_thw)
    out = m.generate(images=images, texts=texts, max_new_tokens=8, eos_token_id=[])
    ref = m.generate(**explicit, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(out.sequences, ref.sequences)
    assert out.texts == m.processor.tokenizer.batch_decode(out.sequences.tolist(), skip_special_tokens=True)
    hf_in = dict(explicit, mm_token_type_ids=x.mm_token_type_ids)
    assert out.sequences.tolist() == hf_generate(hf, hf_in, n=8).tolist()
    f = m.extract_features(images=images, texts=texts, layers=[-1]).hidden_states[0]
    assert torch.equal(f, m.extract_features(**explicit, layers=[-1]).hidden_states[0])


def test_sampling_does_not_depend_on_batching(models, batch):
    """With a seed, each row's sampled tokens are the same alone, in the batch, and across max_batch_tokens splits."""
    _, m = models
    kw = dict(max_new_tokens=N_NEW, eos_token_id=[], temperature=1.0, top_k=20)
    inputs = model_inputs(batch)
    full = m.generate(**inputs, **kw, seed=[101, 202, 303]).sequences
    L = inputs["input_ids"].shape[1]
    split = m.generate(**inputs, **kw, seed=[101, 202, 303], max_batch_tokens=L + N_NEW).sequences
    assert torch.equal(split, full)
    prepared = m.validate(ModelInputs(**inputs))
    for row, s in ((2, 303), (0, 101)):
        alone = m.generate(prepared.select_rows([row]), **kw, seed=[s]).sequences
        assert torch.equal(alone[0], full[row])
    same_int = m.generate(**inputs, **kw, seed=5).sequences
    assert torch.equal(same_int, m.generate(**inputs, **kw, seed=5, max_batch_tokens=L + N_NEW).sequences)
    with pytest.raises(ValueError, match="one per row"):
        m.generate(**inputs, **kw, seed=[1, 2])


def test_decode_mode_policy(monkeypatch):
    """The decode step is captured as a CUDA graph on CUDA (one process), compiled when asked, eager otherwise; a
    capture waits for a stop check that saw rows still running and for enough steps left to pay for it, and a
    graph kept from an earlier call runs from the first step (the capture itself: tests/test_gpu_decoder.py)."""
    from types import SimpleNamespace

    from qwen_batched import generation
    from qwen_batched.generation import CAPTURE_MIN_STEPS, _decode_mode, _use_step

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _decode_mode(SimpleNamespace(device=gpu, tp=None), False) == "graph"
    assert _decode_mode(SimpleNamespace(device=gpu, tp=object()), False) == "eager"
    assert _decode_mode(SimpleNamespace(device=cpu, tp=None), False) == "eager"
    assert _decode_mode(SimpleNamespace(device=cpu, tp=None), True) == "compiled"
    assert _decode_mode(SimpleNamespace(device=gpu, tp=None), True) == "compiled"
    monkeypatch.setattr(generation, "CUDA_GRAPHS", False)
    assert _decode_mode(SimpleNamespace(device=gpu, tp=None), False) == "eager"

    new, kept = SimpleNamespace(graph=None), SimpleNamespace(graph=object())
    n = CAPTURE_MIN_STEPS
    assert not _use_step("eager", None, 5, 50, 4)
    assert _use_step("compiled", new, 0, 1, 4) and _use_step("graph", kept, 0, 1, 4)
    assert not _use_step("graph", new, 2, 50, 4)  # no stop check yet: all rows may be done already
    assert _use_step("graph", new, 3, n, 4) and not _use_step("graph", new, 3, n - 1, 4)


def test_from_hf_stops_at_the_generation_config_eos_ids():
    """A transformers model's generation_config may name more EOS ids than its config (the published checkpoints:
    <|im_end|> in config.json, also <|endoftext|> in generation_config.json): from_hf stops where its generate
    stops, as from_pretrained does."""
    cfg = tiny_config()
    im_end = cfg.eos_token_ids[0]
    hf = make_hf_model(dataclasses.replace(cfg, eos_token_ids=(im_end,)))
    g = torch.Generator().manual_seed(11)
    b = pad_rows(cfg, [torch.randint(0, 256, (12,), generator=g).tolist(),
                       torch.randint(0, 256, (7,), generator=g).tolist()])
    b = {k: b[k] for k in ("input_ids", "attention_mask")}
    free = QwenBatchedVL.from_hf(hf).generate(**b, max_new_tokens=8, eos_token_id=[]).sequences
    x = free[0, 2].item()  # a token row 0 emits: made the generation config's second EOS id
    hf.generation_config.eos_token_id = [im_end, x]
    hf.generation_config.pad_token_id = cfg.pad_token_id
    m = QwenBatchedVL.from_hf(hf)
    assert x in m.cfg.eos_token_ids
    with torch.no_grad():
        ref = hf.generate(**b, max_new_tokens=8, do_sample=False)[:, b["input_ids"].shape[1]:]
    assert torch.equal(m.generate(**b, max_new_tokens=8).sequences, ref)
