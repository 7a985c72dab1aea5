"""Parity figures of the README's table, measured: ours against transformers' Qwen2.5-VL on the tests' tiny
random-weight model (fp32, CPU), the same cases the tests assert (<= 1e-5) on.

  vision     merged and pre-merger features of tests/test_vision.py's grid cases (max rel over all)
  invariance each image of the 32-image mixed batch encoded alone against inside the batch
  decoder    every hidden state and the logits of tests/helpers.build_batch (left padded; real tokens)

  python bench/parity.py [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import header, markdown_table, write_json  # noqa: E402
from qwen_batched import QwenBatchedVL  # noqa: E402
from qwen_batched.geometry import build_geometry  # noqa: E402
from tests.helpers import build_batch, make_hf_model, rel_err  # noqa: E402
from tests.test_vision import CASES, _inputs  # noqa: E402


@torch.no_grad()
def measure() -> list[dict]:
    hf = make_hf_model()
    ours = QwenBatchedVL.from_hf(hf)
    merged_err = pre_err = 0.0
    for grids in CASES.values():
        pv, g = _inputs(grids)
        ref = hf.model.visual(pv, grid_thw=g)
        merged_err = max(merged_err, rel_err(ours.encode_images(pv, g), ref.pooler_output))
        pre = ours.encode_images(pv, g, return_pre_merger=True)
        geo = build_geometry(tuple(grids), ours.cfg.vision, torch.device("cpu"), "sdpa")
        D = pre.shape[1]
        pre_err = max(pre_err, rel_err(pre, ref.last_hidden_state.view(-1, 4, D)[geo.reverse_index].view(-1, D)))
    grids = CASES["32-image mixed batch"]
    pv, g = _inputs(grids)
    together = ours.encode_images(pv, g)
    alone, start = [], 0
    for t, h, w in grids:
        alone.append(ours.encode_images(pv[start:start + t * h * w], torch.tensor([[t, h, w]])))
        start += t * h * w
    invariance = rel_err(together, torch.cat(alone))
    b = build_batch(ours.cfg)
    kw = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    ref = hf(**kw, mm_token_type_ids=b["mm_token_type_ids"], output_hidden_states=True)
    out = ours.extract_features(**kw)
    real = b["attention_mask"].bool()
    hidden = max(rel_err(a[real], r[real]) for a, r in zip(out.hidden_states, ref.hidden_states))
    logits = rel_err(ours.lm_head(out.hidden_states[-1])[real], ref.logits[real])
    return [
        {"stage": "vision tower", "case": f"{len(CASES)} grid cases (tests/test_vision.py)", "what": "merged features",
         "max_rel": merged_err},
        {"stage": "vision tower", "case": "same", "what": "pre-merger features", "max_rel": pre_err},
        {"stage": "batch invariance", "case": "32-image mixed batch", "what": "each image alone vs in the batch",
         "max_rel": invariance},
        {"stage": "decoder", "case": "left-padded mixed batch (tests/helpers.build_batch)",
         "what": "every hidden state (real tokens)", "max_rel": hidden},
        {"stage": "decoder", "case": "same", "what": "logits (real tokens)", "max_rel": logits},
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = measure()
    meta = header(torch.device("cpu"))
    print(f"## Parity against transformers: {meta['device']}, {meta['date']}, commit {meta['commit']}\n")
    print("Command: `python bench/parity.py`; the tests' tiny random-weight model, float32; max |ours - ref| / "
          "max |ref|.\n")
    print(markdown_table(rows, [("stage", "stage"), ("case", "case"), ("what", "compared"), ("max_rel", "max rel")]))
    write_json(args.json, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
