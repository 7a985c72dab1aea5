"""The ``extract`` job: hidden states of chosen layers per input, as safetensors shards plus ``index.json``."""
from __future__ import annotations

import json
import os

import torch

from .batch_inputs import _field, _model_inputs
from .features import INDEX_FORMAT, merge_features, read_feature_shards
from .inputs import Item, read_image_inputs
from .io import FEATURE_SHARD_RE
from .job import Job
from .model import model_id_of
from .results import Result


def parse_layers(spec: str) -> list[int]:
    try:
        layers = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise SystemExit(f"error: --layers must be comma-separated integers, got {spec!r}")
    return layers


def _spans(mask: list[bool]) -> list[list[int]]:
    """[start, end) runs of True."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append([start, i])
            start = None
    return spans


class ExtractJob(Job):
    """``extract``: hidden states of chosen layers per input, as safetensors shards plus ``index.json``."""

    kind = "extract"
    shard_re = FEATURE_SHARD_RE
    shard_prefix = "features"
    shard_ext = ".safetensors"

    def __init__(self, args, model=None):
        super().__init__(args, model)
        self.out_dir = os.path.abspath(args.out)
        self.layers = parse_layers(args.layers)
        self.save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
        self.resolved_layers: list[int] | None = None

    def read_items(self) -> list[Item]:
        return read_image_inputs(self.args.images, self.args.image_folder, self.args.text, self.args.limit)

    def settings(self) -> dict:
        a = self.args
        return {"job": "extract", "model": model_id_of(a.model), "layers": self.layers, "tokens": a.tokens,
                "text": a.text, "conv_mode": a.conv_mode, "final_norm": not a.no_final_norm,
                "save_dtype": a.save_dtype, "save_vision": a.save_vision}

    def read_done(self):
        return read_feature_shards(self.out_dir)

    def encode(self, results: list[Result]) -> bytes:
        """Tensors concatenated row-wise over the shard's inputs; the entries go in the header metadata."""
        from safetensors.torch import save

        entries, cols = [], {}
        offset = voffset = 0
        for r in results:
            e = dict(r.record, key=r.key)
            if r.retry:
                e["retry"] = True
            if r.tensors:
                n = int(r.tensors["input_ids"].shape[0])
                e["offset"], e["length"] = offset, n
                offset += n
                if "vision_embeds" in r.tensors:
                    nv = int(r.tensors["vision_embeds"].shape[0])
                    e["vision_offset"], e["vision_length"] = voffset, nv
                    voffset += nv
                for name, t in r.tensors.items():
                    cols.setdefault(name, []).append(t)
            entries.append(e)
        tensors = {name: torch.cat(ts).contiguous() for name, ts in cols.items()}
        return save(tensors, metadata={"format": INDEX_FORMAT, "entries": json.dumps(entries, ensure_ascii=False)})

    def _entry(self, pos: int, **kw) -> dict:
        it = self.items[pos]
        return {"id": it.qid, "images": it.images, "text": it.text, **kw}

    def error_result(self, pos: int, msg: str, retry: bool) -> Result:
        return Result(pos, self.items[pos].key, self._entry(pos, error=msg), retry)

    def run_batch(self, inputs, positions: list[int]) -> list[Result]:
        a, cfg = self.args, self.model.cfg
        out = self.model.extract_features(**_model_inputs(inputs, self.device), layers=self.layers,
                                          final_norm=not a.no_final_norm)
        hs = _field(out, "hidden_states")
        layers = [int(x) for x in (_field(out, "layers") or self.layers)]
        self.resolved_layers = layers
        ids = _field(inputs, "input_ids").cpu()
        mask = _field(out, "attention_mask")
        mask = (mask if mask is not None else _field(inputs, "attention_mask")).cpu().bool()
        img_mask = _field(out, "image_mask")
        img_mask = (img_mask.cpu() if img_mask is not None else ids == cfg.image_token_id).bool()
        vis = _field(out, "vision_embeds") if a.save_vision else None
        hs = [h.to(self.save_dtype).cpu() if self.save_dtype is not None else h.cpu() for h in hs]
        if vis is not None:
            vis = vis.to(self.save_dtype).cpu() if self.save_dtype is not None else vis.cpu()
        results, vstart = [], 0
        for b, pos in enumerate(positions):
            valid = mask[b]
            keep = valid & img_mask[b] if a.tokens == "image" else valid
            t = {f"layer.{L}": h[b][keep].contiguous() for L, h in zip(layers, hs)}
            t["input_ids"] = ids[b][keep].to(torch.int32)
            t["image_mask"] = img_mask[b][keep]
            t["position"] = (torch.cumsum(valid.long(), 0) - 1)[keep].to(torch.int32)
            n_img = int(img_mask[b][valid].sum())
            if vis is not None:
                t["vision_embeds"] = vis[vstart:vstart + n_img].contiguous()
                vstart += n_img
            entry = self._entry(pos, image_sizes=self.sizes.get(pos, []), n_prompt_tokens=int(valid.sum()),
                                n_image_tokens=n_img, image_spans=_spans(t["image_mask"].tolist()))
            results.append(Result(pos, self.items[pos].key, entry, tensors=t))
        return results

    def rank_stats(self) -> dict:
        return {"layers": self.resolved_layers}

    def check_model(self, model) -> None:
        n = model.cfg.text.num_hidden_layers
        bad = [L for L in self.layers if not -(n + 1) <= L <= n]
        if bad:
            raise SystemExit(f"error: --layers {bad} out of range: this model has hidden states 0..{n} "
                             f"(0 embeddings, {n} after the final norm; negative counts from the end)")

    def merge(self, stats) -> str:
        resolved = next((st["extra"]["layers"] for st in stats if st["extra"].get("layers")), None)
        merge_features(self.items, self.out_dir, self.settings(), self.model_id, resolved)
        return os.path.join(self.out_dir, "index.json")


def run_extract(args, model=None) -> int:
    """The ``extract`` job for parsed ``args``; ``model`` reuses a loaded model (its device wins)."""
    return ExtractJob(args, model).run()
