"""Fused RMSNorm and vision-rotary Triton kernels == their torch references (CUDA, or TRITON_INTERPRET=1).

The decoder's M-RoPE kernel: test_kernels_rope.py."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from qwen_batched.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from qwen_batched.kernels.rotary import rotary_qkv, rotary_qkv_reference  # noqa: E402
from qwen_batched.geometry import rotary_tables  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 7, 80), (37, 1280), (3, 200)])
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    ours, ref = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-6)
    else:  # same two roundings as the reference: at most one last-bit step, in few elements
        step = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1e-3)
        diff = (ours.float() - ref.float()).abs()
        assert bool((diff <= step * 1.01).all()) and (diff > 0).float().mean().item() < 1e-3


def test_rms_norm_strided_input_and_errors():
    x = torch.randn(6, 64, device=DEVICE)[:, ::2]  # non-unit last stride
    w = torch.ones(32, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)


@pytest.mark.parametrize("copy_v", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,hd", [(16, 80), (4, 16), (3, 24)])
def test_rotary_matches_reference(heads, hd, dtype, copy_v):
    g = torch.Generator().manual_seed(1)
    N = 23
    qkv = torch.randn(N, 3 * heads * hd, generator=g).to(DEVICE, dtype).view(N, 3, heads, hd)
    rows, cols = torch.randint(0, 40, (N,), generator=g), torch.randint(0, 40, (N,), generator=g)
    cos, sin = (t.to(DEVICE) for t in rotary_tables(rows, cols, hd, 10000.0))
    ours, ref = rotary_qkv(qkv, cos, sin, copy_v), rotary_qkv_reference(qkv, cos, sin, copy_v)
    for o, r in zip(ours[:2], ref[:2]):  # q, k: dense, rotated in fp32 (no FMA contraction: bit for bit)
        assert o.shape == (N, heads, hd) and o.dtype == dtype and o.is_contiguous() and r.is_contiguous()
        assert torch.equal(o, r)
    for v in (ours[2], ref[2]):  # v: qkv's, dense only when asked for (no copy otherwise)
        assert torch.equal(v, qkv[:, 2]) and v.is_contiguous() == copy_v
        assert (v.data_ptr() == qkv[:, 2].data_ptr()) != copy_v


def test_rotary_no_rows():
    qkv = torch.randn(0, 3, 2, 8, device=DEVICE)
    q, k, v = rotary_qkv(qkv, torch.ones(0, 8, device=DEVICE), torch.ones(0, 8, device=DEVICE), True)
    assert q.shape == k.shape == v.shape == (0, 2, 8)


def test_rotary_rejects_bad_shapes():
    qkv = torch.randn(4, 3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="expected cos/sin"):
        rotary_qkv(qkv, torch.ones(4, 6, device=DEVICE), torch.ones(4, 6, device=DEVICE))
    with pytest.raises(ValueError, match="expected qkv"):
        rotary_qkv(qkv[:, :2], torch.ones(4, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))


def test_model_with_fused_kernels_matches_torch_path(monkeypatch):
    """Route the model's RMSNorm and vision rotary through the kernels (interpreted on CPU) end to end."""
    import qwen_batched.fused as fused
    from qwen_batched import QwenBatchedVL
    from tests.helpers import rel_err

    m = QwenBatchedVL.from_config("tiny", seed=0, device=DEVICE)
    img = torch.randint(0, 256, (3, 112, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = m.processor.prepare([[img.to(DEVICE)], []], ["what is this?", "hello"], device=DEVICE)
    b = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    ref = m.extract_features(**b, layers=[-1])
    calls = []
    orig_rms, orig_rot, orig_rope = fused.rmsnorm.rms_norm, fused.rotary.rotary_qkv, fused.rotary.rope_qk
    monkeypatch.setattr(fused, "_use_kernel", lambda x: True)
    monkeypatch.setattr(fused.rmsnorm, "rms_norm", lambda *a: calls.append("rms") or orig_rms(*a))
    monkeypatch.setattr(fused.rotary, "rotary_qkv", lambda *a: calls.append("rot") or orig_rot(*a))
    monkeypatch.setattr(fused.rotary, "rope_qk", lambda *a: calls.append("rope") or orig_rope(*a))
    out = m.extract_features(**b, layers=[-1])
    assert "rms" in calls and "rot" in calls and "rope" in calls
    valid = b["attention_mask"].bool()
    assert rel_err(out.hidden_states[0][valid], ref.hidden_states[0][valid]) <= 1e-5
    assert rel_err(out.vision_embeds, ref.vision_embeds) <= 1e-5


def _wrapper_args():
    """name -> (kernel module attribute, wrapper arguments) for every kernel behind qwen_batched.fused."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)
    cos, sin = rotary_tables(torch.arange(6), torch.arange(6), 16, 1e4)
    return {"rms_norm": ("rmsnorm", (r(4, 16), r(16), 1e-6)),
            "add_rms_norm": ("rmsnorm", (r(4, 16), r(4, 16), r(16), 1e-6)),
            "silu_mul": ("swiglu", (r(4, 16), r(4, 16))),
            "rotary_qkv": ("rotary", (r(6, 3, 2, 16), cos.to(DEVICE), sin.to(DEVICE), True)),
            "rope_qk": ("rotary", (r(6, 4, 16), r(6, 2, 16), r(6, 16), r(6, 16)))}


@pytest.mark.parametrize("fn", ["rms_norm", "add_rms_norm", "silu_mul", "rotary_qkv", "rope_qk"])
def test_kernel_failure_falls_back_with_a_warning(monkeypatch, fn):
    """A kernel that cannot build or launch: a warning naming it, the torch reference's result; that kernel is
    off from then on (not called again), the others stay on."""
    import qwen_batched.fused as fused

    calls = []

    def broken(*a):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")
    module_name, args = _wrapper_args()[fn]
    module = getattr(fused, module_name)
    monkeypatch.setattr(fused, "_use_kernel", lambda x: fused._state["on"])
    monkeypatch.setitem(fused._state, "on", True)
    monkeypatch.setitem(fused._state, "failed", set())
    monkeypatch.setattr(module, fn, broken)
    name = {"rotary_qkv": "rotary", "rope_qk": "rope"}.get(fn, fn)
    with pytest.warns(UserWarning, match=f"Triton {name} kernel failed"):
        out = getattr(fused, fn)(*args)
    ref = getattr(module, fn + "_reference")(*args)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (out, ref))):
        assert torch.equal(a, b)
    getattr(fused, fn)(*args)  # no second attempt, no second warning
    assert calls == [1] and fused._state["failed"] == {name}
    assert not fused.kernels_enabled(name) and fused.kernels_enabled("resize_patchify")


def test_kernel_argument_error_reaches_the_caller(monkeypatch):
    """A kernel's own argument check (ValueError) is the caller's bug: it propagates and the kernels stay on."""
    import qwen_batched.fused as fused

    monkeypatch.setattr(fused, "_use_kernel", lambda x: fused._state["on"])
    monkeypatch.setitem(fused._state, "on", True)
    x = torch.randn(4, 16, device=DEVICE)
    monkeypatch.setitem(fused._state, "failed", set())
    with pytest.raises(ValueError, match="weight must have shape"):
        fused.rms_norm(x, torch.ones(8, device=DEVICE), 1e-6)
    assert fused._state["on"] is True and not fused._state["failed"]
