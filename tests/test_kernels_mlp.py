"""The SwiGLU activation (silu_mul) and residual add + RMSNorm (add_rms_norm) kernels == their torch references
(CUDA, or TRITON_INTERPRET=1), and the model with them on == the torch path."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from qwen_batched.kernels.rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm  # noqa: E402
from qwen_batched.kernels.swiglu import silu_mul, silu_mul_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTHS = [8, 80, 1280, 2048, 3420, 11008]  # tiny widths, the vision (1280, 3420) and 3B decoder (2048, 11008) ones
HALF = [torch.bfloat16, torch.float16]
# the interpreter's numpy warns where exp overflows or inf/inf gives NaN (torch computes the same values silently)
numpy_overflow = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)


def within_one_step(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16/fp16 RMSNorm against the torch reference: the float32 sum of squares is summed in another order, so
    a last-bit step in rare elements (as for ``rms_norm``, see kernels/rmsnorm.py)."""
    step = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(1e-3)
    diff = (ours.float() - ref.float()).abs()
    assert bool((diff <= step * 1.01).all()) and int((diff > 0).sum()) <= max(2, ref.numel() // 1000)


# ---------------------------------------------------------------------------------------------- silu_mul
@numpy_overflow
@pytest.mark.parametrize("dtype", HALF)
def test_silu_mul_every_gate_value_is_bit_exact(dtype):
    """Every finite bf16/fp16 value as the gate (silu is a function of one 16-bit value): equal bit for bit."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    gate = bits.view(dtype)
    gate = gate[torch.isfinite(gate)]
    gate = gate[: gate.numel() // 256 * 256].view(-1, 256).to(DEVICE)  # (255 or 248, 256)
    up = randn(*gate.shape, dtype=dtype, scale=2.0)
    assert torch.equal(silu_mul(gate, up), silu_mul_reference(gate, up))


@numpy_overflow
def test_silu_mul_infinities_and_nan():
    gate = torch.tensor([[float("inf"), -float("inf"), float("nan"), 100.0, -100.0, 0.0, -0.0, 1e-30]], device=DEVICE)
    up = torch.full_like(gate, 3.0)
    for dtype in (torch.float32, *HALF):
        g, u = gate.to(dtype), up.to(dtype)
        torch.testing.assert_close(silu_mul(g, u), silu_mul_reference(g, u), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("H", WIDTHS)
def test_silu_mul_matches_reference(H, dtype):
    gate, up = randn(3, H, dtype=dtype, scale=4.0), randn(3, H, dtype=dtype, seed=1)
    ours, ref = silu_mul(gate, up), silu_mul_reference(gate, up)
    assert ours.shape == ref.shape and ours.dtype == dtype
    if dtype == torch.float32:  # float32 exp differs from torch's in the last bit for some inputs
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(ours, ref)


def test_silu_mul_strided_empty_and_batched_shapes():
    base = randn(6, 2 * 80, dtype=torch.bfloat16, scale=3.0)
    gate, up = base[:, ::2], base[:, 1::2]  # column stride 2
    assert torch.equal(silu_mul(gate, up), silu_mul_reference(gate, up))
    up_t = randn(80, 6, dtype=torch.bfloat16, seed=2).t()  # (6, 80), row stride 1
    assert torch.equal(silu_mul(gate, up_t), silu_mul_reference(gate, up_t))
    g3, u3 = randn(2, 5, 80, dtype=torch.float16, scale=3.0), randn(2, 5, 80, dtype=torch.float16, seed=3)
    assert torch.equal(silu_mul(g3, u3), silu_mul_reference(g3, u3))  # (B, L, H), as the padded decoder
    g3t, u3t = g3.transpose(0, 1), u3.transpose(0, 1)  # (5, 2, 80): a reshape that copies
    assert torch.equal(silu_mul(g3t, u3t), silu_mul_reference(g3t, u3t))
    empty = torch.empty(0, 80, device=DEVICE, dtype=torch.bfloat16)
    out = silu_mul(empty, empty)
    assert out.shape == (0, 80) and out.dtype == torch.bfloat16


def test_silu_mul_rejects_bad_arguments():
    gate = randn(4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="up must match gate"):
        silu_mul(gate, randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="up must match gate"):
        silu_mul(gate, randn(4, 16))
    with pytest.raises(ValueError, match="gate must be"):
        silu_mul(gate.to(torch.int32), gate.to(torch.int32))
    with pytest.raises(ValueError, match="gate must be"):
        silu_mul(torch.tensor(1.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))


# ---------------------------------------------------------------------------------------------- add_rms_norm
def check_add_rms_norm(x, r, w, eps=1e-6):
    """s == x + r bit for bit; y == the unfused kernel's norm of s bit for bit, and close to the reference's."""
    s, y = add_rms_norm(x, r, w, eps)
    s_ref, y_ref = add_rms_norm_reference(x, r, w, eps)
    assert s.shape == y.shape == x.shape and s.dtype == x.dtype and y.dtype == y_ref.dtype
    assert torch.equal(s, s_ref)
    assert torch.equal(y, rms_norm(s_ref, w, eps))
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=2e-6)
    else:
        within_one_step(y, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("D", WIDTHS)
def test_add_rms_norm_matches_reference(D, dtype):
    N = max(4, 1024 // D)
    x, r = randn(N, D, dtype=dtype, scale=3.0), randn(N, D, dtype=dtype, seed=1)
    check_add_rms_norm(x, r, (1 + 0.1 * randn(D, seed=2)).to(dtype))


def test_add_rms_norm_strided_empty_and_batched_shapes():
    D = 80
    w = (1 + 0.1 * randn(D, seed=2)).to(torch.bfloat16)
    base = randn(6, 2 * D, dtype=torch.bfloat16, scale=3.0)
    check_add_rms_norm(base[:, ::2], base[:, 1::2], w)  # column stride 2
    check_add_rms_norm(base[:, :D], randn(D, 6, dtype=torch.bfloat16, seed=3).t(), w)  # row stride 1
    x3 = randn(2, 5, D, dtype=torch.bfloat16, seed=4)
    check_add_rms_norm(x3, randn(2, 5, D, dtype=torch.bfloat16, seed=5), w)  # (B, L, D), the padded decoder
    check_add_rms_norm(x3.transpose(0, 1), randn(5, 2, D, dtype=torch.bfloat16, seed=6), w)  # a copying reshape
    w32 = torch.stack([w.float(), w.float()], 1)[:, 0]  # a float32 weight (y in float32), strided
    check_add_rms_norm(randn(6, D, dtype=torch.bfloat16), randn(6, D, dtype=torch.bfloat16, seed=1), w32)
    empty = torch.empty(0, D, device=DEVICE, dtype=torch.bfloat16)
    s, y = add_rms_norm(empty, empty, w, 1e-6)
    assert s.shape == y.shape == (0, D)


def test_add_rms_norm_rejects_bad_arguments():
    x, w = randn(4, 16, dtype=torch.bfloat16), torch.ones(16, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="r must match x"):
        add_rms_norm(x, randn(4, 8, dtype=torch.bfloat16), w, 1e-6)
    with pytest.raises(ValueError, match="r must match x"):
        add_rms_norm(x, randn(4, 16), w, 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, x, torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        add_rms_norm(x.to(torch.int32), x.to(torch.int32), w, 1e-6)


# ---------------------------------------------------------------------------------------------- the switch
def test_fused_policy_argument_errors_and_collectives(monkeypatch):
    """Argument errors reach the caller (the kernels stay on); a tensor-parallel all-reduce's
    AsyncCollectiveTensor (no storage: data_ptr 0) reaches the kernel waited on. (Fallbacks:
    test_kernels_fused.py.)"""
    import qwen_batched.fused as fused
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    monkeypatch.setattr(fused, "_use_kernel", lambda x: fused._state["on"])
    monkeypatch.setitem(fused._state, "on", True)
    monkeypatch.setitem(fused._state, "failed", set())
    x, r, w = randn(4, 16), randn(4, 16, seed=1), torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError, match="up must match gate"):
        fused.silu_mul(x, randn(4, 8))
    with pytest.raises(ValueError, match="weight must be"):
        fused.add_rms_norm(x, r, torch.ones(8, device=DEVICE), 1e-6)
    assert fused._state["on"] is True and not fused._state["failed"]
    seen = []
    orig = fused.rmsnorm.add_rms_norm
    monkeypatch.setattr(fused.rmsnorm, "add_rms_norm", lambda *a: seen.extend(map(type, a[:2])) or orig(*a))
    s, y = fused.add_rms_norm(x, AsyncCollectiveTensor(r), w, 1e-6)
    assert seen == [torch.Tensor, torch.Tensor] and torch.equal(s, x + r)


# ---------------------------------------------------------------------------------------------- end to end
def run_model(m, b):
    feats = m.extract_features(**b)  # every layer
    gen = m.generate(**b, max_new_tokens=4, eos_token_id=[])
    return feats, gen.sequences


def small_batch(cfg) -> dict:
    """Left-padded (2, 15): a 56x84 image (24 patches, 6 tokens) between words; text only. Small, because the
    interpreter runs each kernel program in Python."""
    from tests.helpers import pad_rows

    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id]
    b = pad_rows(cfg, [words(4) + image + words(3), words(6)])
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, cfg.vision.patch_dim, generator=g)
    return {"input_ids": b["input_ids"].to(DEVICE), "attention_mask": b["attention_mask"].to(DEVICE),
            "pixel_values": pixels.to(DEVICE), "image_grid_thw": grid}


@pytest.fixture(scope="module")
def tiny_runs():
    """{dtype: (model, inputs, torch-path outputs)} for the tiny model, every kernel off (also on CUDA)."""
    import qwen_batched.fused as fused
    from qwen_batched import QwenBatchedVL

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "_use_kernel", lambda x: False)
        for dtype in (torch.float32, torch.bfloat16):
            m = QwenBatchedVL.from_config("tiny", seed=0, device=DEVICE, dtype=dtype)
            b = small_batch(m.cfg)
            runs[dtype] = m, b, run_model(m, b)
    return runs


def force_kernels(monkeypatch, m) -> list[tuple[str, str]]:
    """Every kernel on. Each call of the new kernels is recorded as (tower, kernel) and checked against what it
    replaces: the add then the RMSNorm kernel (bit for bit), eager silu and mul (bit for bit in bf16)."""
    import qwen_batched.fused as fused

    calls, tower = [], [None]
    for mod, name in ((m.visual, "vision"), (m.model, "text")):
        def forward(*a, fwd=mod.forward, name=name, **kw):
            tower[0] = name
            return fwd(*a, **kw)
        monkeypatch.setattr(mod, "forward", forward)
    monkeypatch.setattr(fused, "_use_kernel", lambda x: True)
    silu, add, rms = fused.swiglu.silu_mul, fused.rmsnorm.add_rms_norm, fused.rmsnorm.rms_norm

    def checked_silu(gate, up):
        calls.append((tower[0], "silu_mul"))
        out, ref = silu(gate, up), silu_mul_reference(gate, up)
        assert torch.equal(out, ref) if gate.dtype != torch.float32 else torch.allclose(out, ref, 1e-6, 1e-7)
        return out

    def checked_add(x, r, w, eps):
        calls.append((tower[0], "add_rms_norm"))
        s, y = add(x, r, w, eps)
        assert torch.equal(s, x + r) and torch.equal(y, rms(x + r, w, eps))
        return s, y

    monkeypatch.setattr(fused.swiglu, "silu_mul", checked_silu)
    monkeypatch.setattr(fused.rmsnorm, "add_rms_norm", checked_add)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_fused_mlp_kernels_matches_torch_path(monkeypatch, tiny_runs, dtype):
    """extract_features and greedy generate() with every kernel on == the torch path: the same tokens, hidden
    states within the RMSNorm kernel's last-bit differences (each new kernel checked call by call against the
    ops it replaces)."""
    from tests.helpers import rel_err

    m, b, (ref, ref_tokens) = tiny_runs[dtype]
    calls = force_kernels(monkeypatch, m)
    out, tokens = run_model(m, b)
    assert {(t, k) for t in ("vision", "text") for k in ("silu_mul", "add_rms_norm")} <= set(calls)
    assert torch.equal(tokens, ref_tokens)
    valid = b["attention_mask"].bool()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a last-bit RMSNorm step (2**-8) may grow a little
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert rel_err(ours[valid], theirs[valid]) <= tol
    assert rel_err(out.vision_embeds, ref.vision_embeds) <= tol
