"""model.feature_step: the real tokens equal extract_features (fp32, 1e-5 of max |ref|) for several frame sizes,
batch sizes and dict inputs; a warm step reads nothing back from the device; the compiled step equals eager and
does not recompile when the texts change; every bad input is a clear error before any work. The CUDA checks
(sync debug mode, graph capture) are in test_gpu_step.py."""
import os
import warnings

import pytest
import torch

from tests.helpers import rel_err
from tests.host_reads import count_host_reads

TEXTS = ["pick up the red cube", "", "x" * 20]  # the last one fills max_text_tokens=20 exactly


def _frames(B, N, H, W, dtype=torch.uint8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, N, 3, H, W), generator=g, dtype=torch.uint8)
    return (x if dtype == torch.uint8 else (x.to(dtype) / 255)).to(device)


def assert_real_tokens_equal(out, ref, tol=1e-5):
    """out from the step, ref from extract_features: same real tokens, same hidden states on them."""
    B = out.attention_mask.shape[0]
    mine, theirs = out.attention_mask.bool(), ref.attention_mask.bool()
    assert torch.equal(mine.sum(1), theirs.sum(1))
    assert out.layers == ref.layers
    for h, r in zip(out.hidden_states, ref.hidden_states):
        assert h.shape[:2] == mine.shape
        real = torch.cat([h[b][mine[b]] for b in range(B)])
        assert rel_err(real, torch.cat([r[b][theirs[b]] for b in range(B)])) <= tol
        assert not h[~mine].any()  # pads are zero
    for b in range(B):
        assert torch.equal(out.image_mask[b][mine[b]], ref.image_mask[b][theirs[b]])
    assert rel_err(out.vision_embeds, ref.vision_embeds) <= tol
    assert mine[:, -1].all()  # the last token is real in every row


@pytest.mark.parametrize("B, N, H, W, dtype", [
    (1, 3, 56, 84, torch.uint8),  # no resize
    (2, 2, 70, 100, torch.uint8),  # resized to 56x112
    (3, 1, 150, 120, torch.float32),  # resized to 140x112 (unequal windows), float frames
])
def test_step_equals_extract_features(models, B, N, H, W, dtype):
    m = models[1]
    frames, texts = _frames(B, N, H, W, dtype), TEXTS[:B]
    step = m.feature_step(B, N, H, W, max_text_tokens=20, layers=[0, 2, -1])
    out = step(frames, texts)
    L, D = step.length, m.cfg.text.hidden_size
    assert all(h.shape == (B, L, D) for h in out.hidden_states)
    assert_real_tokens_equal(out, m.extract_features(images=frames, texts=texts, layers=[0, 2, -1]))
    # the same step, other texts (the instruction broadcast to every row) and other frames
    frames2 = _frames(B, N, H, W, dtype, seed=1)
    out2 = step(frames2, "open the drawer")
    assert all(h.shape == (B, L, D) for h in out2.hidden_states)
    assert_real_tokens_equal(out2, m.extract_features(images=frames2, texts=["open the drawer"] * B,
                                                      layers=[0, 2, -1]))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton preprocessing needs CUDA or TRITON_INTERPRET=1")
def test_step_with_the_triton_preprocessing(models, monkeypatch):
    """The step preprocesses through the processor's own path (_patch_rows) with its held resize tables: with the
    fused Triton kernel forced on, as on CUDA, it still equals extract_features (which takes the same kernel)."""
    m = models[1]
    monkeypatch.setattr(m.processor, "use_triton", True)
    frames = _frames(2, 2, 70, 100)  # resized to 56x112
    out = m.feature_step(2, 2, 70, 100, max_text_tokens=20)(frames, TEXTS[:2])
    assert_real_tokens_equal(out, m.extract_features(images=frames, texts=TEXTS[:2], layers=[-1]))


def test_dict_frames_in_camera_order(models):
    m = models[1]
    frames = _frames(2, 2, 56, 56)
    named = {"top": frames[:, 1], "wrist": frames[:, 0]}
    step = m.feature_step(2, 2, 56, 56, texts=TEXTS[:2], max_text_tokens=20, cameras=["wrist", "top"])
    a, b = step(named), step(frames)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    assert_real_tokens_equal(a, m.extract_features(images=frames, texts=TEXTS[:2], layers=[-1]))
    inferred = m.feature_step(2, 2, 56, 56, texts=TEXTS[:2], max_text_tokens=20)  # order of the first dict
    c = inferred({"wrist": frames[:, 0], "top": frames[:, 1]})
    assert inferred.cameras == ("wrist", "top")
    assert all(torch.equal(x, y) for x, y in zip(c.hidden_states, b.hidden_states))


def test_only_requested_layers_run(models):
    m = models[1]
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
             for i, layer in enumerate(m.model.layers)]
    try:
        step = m.feature_step(1, 1, 56, 56, texts="go", layers=[2])
        out = step(_frames(1, 1, 56, 56))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]
    assert_real_tokens_equal(out, m.extract_features(images=_frames(1, 1, 56, 56), texts=["go"], layers=[2]))


def test_warm_step_reads_nothing_from_the_device(models):
    m = models[1]
    step = m.feature_step(2, 2, 150, 120, texts="pick", max_text_tokens=20, layers=[1, -1])
    frames = _frames(2, 2, 150, 120)
    step(frames)
    with count_host_reads() as c:
        step(frames)
        step(_frames(2, 2, 150, 120, seed=3), ["new instruction", "other"])  # new texts: host tokens, no reads
        step({"a": frames[:, 0], "b": frames[:, 1]})
    assert c.calls == []


def test_compiled_step_equals_eager_and_does_not_recompile(models):
    from torch._dynamo.utils import counters

    m = models[1]
    args = (2, 1, 56, 56)
    eager = m.feature_step(*args, texts="pick", max_text_tokens=16)
    comp = m.feature_step(*args, texts="pick", max_text_tokens=16, compile=True)
    frames = _frames(*args)
    before = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = comp(frames)
    fallbacks = [str(w.message) for w in caught if "feature step failed" in str(w.message)]
    assert not fallbacks, fallbacks  # fullgraph=True compiled: no graph break, no fallback to eager
    assert counters["stats"]["unique_graphs"] - before == 1
    ref = eager(frames)
    assert rel_err(out.hidden_states[0], ref.hidden_states[0]) <= 1e-4
    assert torch.equal(out.attention_mask, ref.attention_mask)
    for texts in (["go left", "a longer one"], "pick"):
        f = _frames(*args, seed=len(texts))
        out, ref = comp(f, texts), eager(f, texts)
        assert rel_err(out.hidden_states[0], ref.hidden_states[0]) <= 1e-4
        assert torch.equal(out.attention_mask, ref.attention_mask)
    assert counters["stats"]["unique_graphs"] - before == 1  # same shapes, other texts: no recompilation


def test_bad_inputs_fail_before_any_work(models, monkeypatch):
    m = models[1]
    encoded = []
    hook = m.visual.patch_embed.register_forward_hook(lambda *a: encoded.append(1))
    try:
        step = m.feature_step(2, 2, 56, 84, max_text_tokens=8, cameras=["a", "b"])
        good = _frames(2, 2, 56, 84)
        calls = [
            (lambda: step(good[:1], "go"), ValueError, r"\(B, N, 3, H, W\)"),
            (lambda: step(good[:, :1], "go"), ValueError, "shape"),
            (lambda: step(_frames(2, 2, 56, 56), "go"), ValueError, "fixed when the step was built"),
            (lambda: step(good.int(), "go"), ValueError, "uint8"),
            (lambda: step(good.bool(), "go"), ValueError, "uint8"),
            (lambda: step(torch.empty(2, 2, 3, 56, 84, device="meta"), "go"), ValueError, "device"),
            (lambda: step(good.numpy(), "go"), TypeError, "torch.Tensor"),
            (lambda: step({"a": good[:, 0]}, "go"), ValueError, "missing"),
            (lambda: step({"a": good[:, 0], "b": good[:, 1], "c": good[:, 1]}, "go"), ValueError, "unexpected"),
            (lambda: step({"a": good[:, 0], "b": good[:, 1, :, :28]}, "go"), ValueError, r"frames\['b'\]"),
            (lambda: step({"a": good[:, 0], "b": good[:, 1].float()}, "go"), ValueError, "one dtype"),
            (lambda: step(good), ValueError, "texts is required"),
            (lambda: step(good, "way too long an instruction"), ValueError, "max_text_tokens=8"),
            (lambda: step(good, ["go"]), ValueError, "batch_size=2"),
            (lambda: step(good, ["go", 3]), TypeError, "texts"),
            (lambda: step(good, "<|image_pad|>"), ValueError, "image"),
        ]
        for fn, exc, match in calls:
            with pytest.raises(exc, match=match):
                fn()
        build = [
            (dict(batch_size=0), ValueError, "batch_size"),
            (dict(n_cameras=True), ValueError, "n_cameras"),
            (dict(height=-1), ValueError, "height"),
            (dict(width=2.5), ValueError, "width"),
            (dict(height=1, width=300), ValueError, "aspect ratio"),
            (dict(max_text_tokens=0), ValueError, "max_text_tokens"),
            (dict(max_text_tokens=40_000), ValueError, "context"),
            (dict(compile="yes"), TypeError, "compile"),
            (dict(cuda_graph=1), TypeError, "cuda_graph"),
            (dict(cuda_graph=True), ValueError, "CUDA"),
            (dict(cameras="a"), TypeError, "cameras"),
            (dict(cameras=["a", "a"]), ValueError, "distinct"),
            (dict(cameras=["a"]), ValueError, "n_cameras=2"),
            (dict(layers=[9]), ValueError, "layers"),
            (dict(texts="far too long to fit in"), ValueError, "max_text_tokens"),
            (dict(texts=["go"] * 3), ValueError, "batch_size"),
        ]
        for kw, exc, match in build:
            args = dict(batch_size=2, n_cameras=2, height=56, width=84, max_text_tokens=8)
            with pytest.raises(exc, match=match):
                m.feature_step(**{**args, **kw})
        monkeypatch.setattr(m.processor, "tokenizer", None)
        with pytest.raises(ValueError, match="tokenizer"):
            m.feature_step(1, 1, 56, 56)
    finally:
        hook.remove()
    assert not encoded


def test_example_step(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "example.py")
    spec = importlib.util.spec_from_file_location("example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--step", "--batch", "2", "--cameras", "2", "--size", "84", "--iters", "2"])
    out = capsys.readouterr().out
    assert "image tokens per sample: 18" in out and "ms per step" in out


def test_failed_compilation_falls_back_to_eager(models):
    step = models[1].feature_step(1, 1, 56, 56, texts="go")
    frames = _frames(1, 1, 56, 56)
    ref = step(frames)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    step.compile, step._device_fn = True, broken  # what a failed torch.compile looks like from the step
    with pytest.warns(UserWarning, match="feature step failed"):
        out = step(frames)
    assert torch.equal(out.hidden_states[0], ref.hidden_states[0])
    assert step._device_fn == step._forward  # eager from then on


def test_eager_step_errors_reach_the_caller_once(models, monkeypatch):
    """An error in the eager step is raised as it is: no compile warning, no second run of the step."""
    m = models[1]
    step = m.feature_step(1, 1, 56, 56, texts="go")
    calls = []

    def broken(*args, **kw):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(m.visual, "forward", broken)  # inside the step's device part
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="boom"):
            step(_frames(1, 1, 56, 56))
    assert calls == [1]


def test_a_failed_call_does_not_fix_the_camera_order(models):
    m = models[1]
    frames = _frames(2, 2, 56, 56)
    step = m.feature_step(2, 2, 56, 56, texts=TEXTS[:2], max_text_tokens=20)
    with pytest.raises(ValueError, match="frames\\['top'\\]"):
        step({"top": frames[:, 1, :, :28], "wrist": frames[:, 0]})  # a bad shape
    with pytest.raises(ValueError, match="texts"):
        step({"top": frames[:, 1], "wrist": frames[:, 0]}, texts=["a"])  # a bad texts
    assert step.cameras is None
    out = step({"wrist": frames[:, 0], "top": frames[:, 1]})
    assert step.cameras == ("wrist", "top")
    assert all(torch.equal(x, y) for x, y in zip(out.hidden_states, step(frames).hidden_states))


def test_a_model_moved_after_the_step_was_built_is_an_error(models):
    m = models[1]
    step = m.feature_step(1, 1, 56, 56, texts="go")
    frames = _frames(1, 1, 56, 56)
    ref = step(frames)
    m.to("cpu")  # a no-op: the same weight tensors, the step goes on
    assert torch.equal(step(frames).hidden_states[0], ref.hidden_states[0])
    m.to(torch.float64)
    try:
        with pytest.raises(ValueError, match="build a new step"):
            step(frames)
    finally:
        m.to(torch.float32)
    with pytest.raises(ValueError, match="build a new step"):  # back to float32: still other weight tensors
        step(frames)
    assert torch.equal(m.feature_step(1, 1, 56, 56, texts="go")(frames).hidden_states[0], ref.hidden_states[0])
