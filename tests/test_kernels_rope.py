"""The decoder's M-RoPE kernel (q and k in one launch) == eager torch ``apply_rope`` bit for bit, on every layout
the decoder uses, and end to end (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import qwen_batched.fused as fused  # noqa: E402
from qwen_batched.kernels.rotary import _rows, rope_qk, rope_qk_reference  # noqa: E402
from qwen_batched.rope import apply_rope, inv_freq, mrope_cos_sin, section_index  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = (torch.bfloat16, torch.float16)


def tables(lead, T, hd, dtype, seed=0):
    """cos/sin (*lead, T, hd) in ``dtype`` from random 3-D positions, as the model builds them."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 30000, (3, *lead, T), generator=g)
    half = hd // 2
    sections = section_index((half // 4, half // 4, half - 2 * (half // 4)), DEVICE)
    return mrope_cos_sin(pos.to(DEVICE), inv_freq(hd, 1e6, DEVICE), sections, dtype)


def projection(lead, T, H, Hkv, hd, dtype, seed=0):
    """q (*lead, T, H, hd) and k (*lead, T, Hkv, hd) as strided views of one fused qkv projection output."""
    g = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(*lead, T, (H + 2 * Hkv) * hd, generator=g)).to(DEVICE, dtype)
    q = qkv[..., :H * hd].unflatten(-1, (H, hd))
    k = qkv[..., H * hd:(H + Hkv) * hd].unflatten(-1, (Hkv, hd))
    return q, k


def check(q, k, cos, sin):
    """The kernel against eager torch: bit for bit (its three roundings, and no FMA contraction)."""
    qo, ko = rope_qk(q, k, cos, sin)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    for o, r in ((qo, qr), (ko, kr)):
        assert o.shape == r.shape and o.dtype == r.dtype and o.is_contiguous()
        assert torch.equal(o, r)
    return qo, ko


def test_rope_qk_bf16_subnormals():
    """bf16 inputs and products in the subnormal range go through the kernel as through torch (the loads widen
    bf16 on the bits: the interpreter's own conversion garbles subnormals)."""
    q, k = projection((1,), 6, 4, 2, 16, torch.float32)
    q, k = (q * 1e-38).to(torch.bfloat16), (k * 1e-39).to(torch.bfloat16)
    assert (q.float().abs() < torch.finfo(torch.bfloat16).tiny).any()
    cos, sin = tables((1,), 6, 16, torch.bfloat16)
    check(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hd", [8, 16, 64, 80, 128])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4)])
def test_rope_qk_matches_eager_torch(H, Hkv, hd, dtype):
    q, k = projection((2,), 5, H, Hkv, hd, dtype)
    cos, sin = tables((2,), 5, hd, dtype)
    qo, _ = check(q, k, cos, sin)
    if dtype in HALF:  # the roundings matter: one rounding of the float32 result differs somewhere
        single = (q.float() * cos[..., None, :].float()
                  + torch.cat((-q[..., hd // 2:], q[..., :hd // 2]), -1).float() * sin[..., None, :].float())
        assert not torch.equal(qo, single.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_qk_layouts(dtype):
    hd, H, Hkv = 16, 4, 2
    # packed (T, H, hd) with cos (T, hd), odd T
    check(*projection((), 13, H, Hkv, hd, dtype), *tables((), 13, hd, dtype))
    # the feature step's SDPA path: cos (1, L, hd) broadcast over B
    check(*projection((3,), 7, H, Hkv, hd, dtype), *tables((1,), 7, hd, dtype))
    # a decode step: one token per row
    check(*projection((5,), 1, H, Hkv, hd, dtype), *tables((5,), 1, hd, dtype))
    # two leading dims, cos broadcast over the first
    check(*projection((2, 3), 4, H, Hkv, hd, dtype), *tables((3,), 4, hd, dtype))
    # contiguous q, k, and a q whose last dim is strided (copied first)
    q, k = (x.contiguous() for x in projection((2,), 3, H, Hkv, hd, dtype))
    check(q, k, *tables((2,), 3, hd, dtype))
    wide = torch.randn(2, 3, H, 2 * hd, device=DEVICE).to(dtype)
    check(wide[..., ::2], k, *tables((2,), 3, hd, dtype))


def test_rope_qk_reads_views_in_place():
    """Strided projection views and broadcast tables are read through their strides, not copied."""
    q, k = projection((3,), 7, 4, 2, 16, torch.float32)
    cos, _ = tables((1,), 7, 16, torch.float32)
    for x in (q, k):
        assert _rows(x, 1, 3, 7).data_ptr() == x.data_ptr()
    c = _rows(cos.expand(3, 7, 16), 1, 3, 7)
    assert c.data_ptr() == cos.data_ptr() and c.stride(0) == 0


def test_rope_qk_no_tokens():
    q, k = projection((2,), 0, 4, 2, 8, torch.bfloat16)
    qo, ko = rope_qk(q, k, *tables((2,), 0, 8, torch.bfloat16))
    assert qo.shape == (2, 0, 4, 8) and ko.shape == (2, 0, 2, 8)


def test_rope_qk_rejects_bad_arguments():
    q, k = projection((2,), 5, 4, 2, 8, torch.float32)
    cos, sin = tables((2,), 5, 8, torch.float32)
    bad = {
        "same leading dims": (q, k[:1], cos, sin),
        "even hd": (q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]),
        "T, H, hd": (q[0, 0], k[0, 0], cos, sin),
        "broadcasting": (q, k, cos[:, :4], sin[:, :4]),
        "of one shape": (q, k, cos, sin[:1]),
        "floating dtype": (q, k, cos.double(), sin.double()),
    }
    for match, args in bad.items():
        with pytest.raises(ValueError, match=match):
            rope_qk(*args)


def test_rope_qk_reference_is_apply_rope():
    q, k = projection((2,), 5, 4, 2, 16, torch.bfloat16)
    cos, sin = tables((2,), 5, 16, torch.bfloat16)
    qr, kr = rope_qk_reference(q, k, cos, sin)
    assert torch.equal(qr, apply_rope(q, cos, sin)) and torch.equal(kr, apply_rope(k, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_rope_kernels_matches_torch_path(monkeypatch, dtype):
    """Both rotary kernels on (interpreted on CPU), RMSNorm (alone and after the residual add) and the SwiGLU
    activation left to torch (the norm kernels sum in another order, the float32 exp may differ in the last bit):
    hidden states, vision features and greedy tokens are the torch path's exactly. The decoder kernel runs in the
    prefill and in the decode steps."""
    from qwen_batched import QwenBatchedVL

    m = QwenBatchedVL.from_config("tiny", seed=0, device=DEVICE, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8, generator=g).to(DEVICE) for _ in range(2)]
    inputs = m.processor.prepare([imgs, []], ["what is this?", "hi"], device=DEVICE)
    feats = lambda: m.extract_features(inputs, layers=[1, -1])  # noqa: E731
    gen = lambda: m.generate(inputs, max_new_tokens=4, eos_token_id=[])  # noqa: E731
    ref_f, ref_g = feats(), gen()

    calls = []
    orig_rope, orig_rot = fused.rotary.rope_qk, fused.rotary.rotary_qkv
    monkeypatch.setattr(fused, "_use_kernel", lambda x: True)
    monkeypatch.setattr(fused.rmsnorm, "rms_norm", fused.rmsnorm.rms_norm_reference)
    monkeypatch.setattr(fused.rmsnorm, "add_rms_norm", fused.rmsnorm.add_rms_norm_reference)
    monkeypatch.setattr(fused.swiglu, "silu_mul", fused.swiglu.silu_mul_reference)
    monkeypatch.setattr(fused.rotary, "rope_qk", lambda q, *a: calls.append(("rope", q.shape)) or orig_rope(q, *a))
    monkeypatch.setattr(fused.rotary, "rotary_qkv", lambda *a: calls.append(("rot", None)) or orig_rot(*a))
    out_f = feats()
    assert {c[0] for c in calls} == {"rope", "rot"}
    for o, r in zip(out_f.hidden_states, ref_f.hidden_states):
        assert torch.equal(o, r)
    assert torch.equal(out_f.vision_embeds, ref_f.vision_embeds)

    calls.clear()
    out_g = gen()
    assert torch.equal(out_g.sequences, ref_g.sequences) and torch.equal(out_g.lengths, ref_g.lengths)
    decode = [s for name, s in calls if name == "rope" and s[:2] == (2, 1)]  # (B, 1, H, hd): a decode step
    assert len(decode) == 3 * m.cfg.text.num_hidden_layers  # 4 tokens: 3 decode steps after the prefill


def test_vision_packed_backend_gets_dense_qkv_from_one_kernel(monkeypatch):
    """On a varlen backend the rotary kernel also copies v, so q, k, v reach the varlen kernel dense (no
    .contiguous() copies); the result is the 'sdpa' path's."""
    from qwen_batched import QwenBatchedVL, vision

    m = QwenBatchedVL.from_config("tiny", seed=0, device=DEVICE, dtype=torch.bfloat16)
    grids = ((1, 4, 4), (1, 4, 8))
    px = torch.randn(sum(t * h * w for t, h, w in grids), m.cfg.vision.patch_dim, device=DEVICE)
    geo = m.caches.geometry(grids, m.device, "sdpa")
    calls = []
    orig_rot, orig_attn = fused.rotary.rotary_qkv, vision.varlen_attention
    monkeypatch.setattr(fused, "_use_kernel", lambda x: True)
    monkeypatch.setattr(fused.rotary, "rotary_qkv", lambda *a: calls.append(a[-1]) or orig_rot(*a))
    ref = m.visual(px, geo, "sdpa")

    def dense_varlen(q, k, v, plan, backend, **kw):
        assert backend == "torch_varlen" and all(x.is_contiguous() for x in (q, k, v))
        return orig_attn(q, k, v, plan, "sdpa", **kw)  # the CPU stand-in for the varlen kernel
    monkeypatch.setattr(vision, "varlen_attention", dense_varlen)
    out = m.visual(px, geo, "torch_varlen")
    depth = m.cfg.vision.depth
    assert calls == [False] * depth + [True] * depth
    assert torch.equal(out, ref)
