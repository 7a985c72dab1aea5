"""The ``extract`` job: hidden states of chosen layers per input, as safetensors shards plus ``index.json``, and
:func:`load_features` to read one input back."""
from __future__ import annotations

import json
import os

import torch

from .io import FEATURE_SHARD_RE, atomic_write_bytes, list_shards, read_image_inputs, read_json
from ..validation import resolve_layers
from .run import Job, Result, model_source, source_config

FORMAT = "qwen_batched.features/2"
TENSORS = {
    "layer.<L>": "(rows, hidden) hidden state L: 0 embeddings, i output of decoder layer i, num_layers after the "
                 "final norm (-1 requests that one)",
    "input_ids": "(rows,) int32 token ids",
    "image_mask": "(rows,) bool, True on image-token rows",
    "position": "(rows,) int32, index of the row's token in the input's unpadded prompt",
}
VISION_TENSOR = {"vision_embeds": "(image tokens, hidden) vision tower output (vision_offset/vision_length)"}


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


def read_feature_shards(directory: str) -> dict[str, tuple[str, dict, str]]:
    """key -> (content digest, index entry, shard file), from every complete shard (the newest run wins).

    Entries of inputs that have rows carry ``shard``; failed inputs carry ``error`` instead.
    """
    from safetensors import safe_open

    out: dict[str, tuple[str, dict, str]] = {}
    for fn in list_shards(directory, FEATURE_SHARD_RE):
        with safe_open(os.path.join(directory, fn), framework="pt") as f:
            entries = json.loads(f.metadata()["entries"])
        for e in entries:
            key, digest = e.pop("key"), e.pop("digest")
            if "error" not in e:
                e["shard"] = fn
            out[key] = (digest, e, fn)
    return out


class ExtractJob(Job):
    kind = "extract"
    format = FORMAT
    shard_re = FEATURE_SHARD_RE
    shard_prefix = "features"
    shard_ext = ".safetensors"

    def __init__(self, args, model=None):
        super().__init__(args, model)
        self.out_dir = os.path.abspath(args.out)
        self.elsewhere = "a new --out directory"
        self.layers = parse_layers(args.layers)
        self.save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
        self.resolved_layers: list[int] | None = None

    def read_items(self):
        a = self.args
        return read_image_inputs(a.images, a.image_folder, a.text, a.limit, a.extra_keys)

    def settings(self) -> dict:
        a = self.args
        return {"layers": self.layers, "tokens": a.tokens, "conv_mode": a.conv_mode, "final_norm": not a.no_final_norm,
                "save_dtype": a.save_dtype, "save_vision": a.save_vision}

    def read_done(self):
        return {k: (digest, e) for k, (digest, e, _) in read_feature_shards(self.out_dir).items()}

    def discard(self) -> None:
        if os.path.isfile(os.path.join(self.out_dir, "index.json")):
            os.remove(os.path.join(self.out_dir, "index.json"))

    def encode(self, key_digest, results: list[Result]) -> bytes:
        """Tensors concatenated row-wise over the shard's inputs; the entries go in the header metadata."""
        from safetensors.torch import save

        entries, cols = [], {}
        offset = voffset = 0
        for (key, digest), r in zip(key_digest, results):
            e = dict(r.record, key=key, digest=digest)
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
        return save(tensors, metadata={"format": FORMAT, "entries": json.dumps(entries, ensure_ascii=False)})

    def _entry(self, pos: int, **kw) -> dict:
        it = self.items[pos]
        return {"id": it.qid, "images": it.images, "text": it.text, **kw}

    def error_result(self, pos: int, msg: str) -> Result:
        return Result(pos, self._entry(pos, error=msg))

    def run_batch(self, inputs, positions: list[int]) -> list[Result]:
        a = self.args
        out = self.model.extract_features(inputs.to(self.device, non_blocking=True), layers=self.layers,
                                          final_norm=not a.no_final_norm, max_batch_tokens=a.max_batch_tokens)
        self.resolved_layers = layers = [int(x) for x in out.layers]
        ids = inputs.input_ids.cpu()
        mask, img_mask = out.attention_mask.cpu().bool(), out.image_mask.cpu().bool()
        cast = (lambda t: t.to(self.save_dtype).cpu()) if self.save_dtype is not None else (lambda t: t.cpu())
        hs = [cast(h) for h in out.hidden_states]
        vis = cast(out.vision_embeds) if a.save_vision and out.vision_embeds is not None else None
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
            entry = self._entry(pos, image_sizes=self.image_sizes.get(pos, []), n_prompt_tokens=int(valid.sum()),
                                n_image_tokens=n_img, image_spans=_spans(t["image_mask"].tolist()))
            results.append(Result(pos, entry, tensors=t))
        return results

    def rank_stats(self) -> dict:
        return {"layers": self.resolved_layers}

    def check_source(self, source: str) -> None:
        self._check_layers(source_config(source).text.num_hidden_layers)

    def check_model(self, model) -> None:
        self._check_layers(model.cfg.text.num_hidden_layers)

    def _check_layers(self, n: int) -> None:
        bad = [L for L in self.layers if not -(n + 1) <= L <= n]
        if bad:
            raise SystemExit(f"error: --layers {bad} out of range: this model has hidden states 0..{n} "
                             f"(0 embeddings, {n} after the final norm; negative counts from the end)")

    def merge(self, stats) -> tuple[str, int]:
        """``index.json``: every input, in input order, with its shard and rows; drop superseded shards."""
        done = read_feature_shards(self.out_dir)
        entries, missing = [], []
        for pos, it in enumerate(self.items):
            if it.error is not None:
                entries.append(self._entry(pos, error=it.error))
            elif it.key in done and done[it.key][0] == it.digest:
                entries.append(done[it.key][1])
            else:
                missing.append(it)
        if missing:
            raise RuntimeError(f"{len(missing)} input(s) have no features in {self.out_dir} (e.g. "
                               f"{missing[0].qid!r}); rerun the same command to finish them")
        path = os.path.join(self.out_dir, "index.json")
        resolved = next((st["extra"]["layers"] for st in stats if st["extra"].get("layers")), None)
        s, a = self.settings(), self.args
        if resolved is None:  # no batch ran here (a resume with nothing left): resolved from the model's config
            cfg = self.model.cfg if self.model is not None else \
                source_config(model_source(a.model, a.revision, a.cache_dir))
            resolved = [int(x) for x in resolve_layers(self.layers, cfg.text.num_hidden_layers)]
        index = {"format": FORMAT, "model_id": self.model_id, "layers": resolved,
                 "requested_layers": s["layers"], "tokens": s["tokens"], "text": a.text, "conv_mode": s["conv_mode"],
                 "final_norm": s["final_norm"], "tensors": {**TENSORS, **(VISION_TENSOR if s["save_vision"] else {})},
                 "rows": "all non-pad tokens of each input" if s["tokens"] == "all" else "image tokens only",
                 "shards": sorted({e["shard"] for e in entries if "shard" in e}), "items": entries}
        atomic_write_bytes(path, (json.dumps(index, ensure_ascii=False) + "\n").encode())
        winners = {fn for _, _, fn in done.values()}
        for fn in list_shards(self.out_dir, FEATURE_SHARD_RE):  # every entry superseded by a later run
            if fn not in winners:
                os.remove(os.path.join(self.out_dir, fn))
        return path, sum("error" in e for e in entries)


def run_extract(args, model=None) -> int:
    """The ``extract`` job for parsed ``args``; ``model`` reuses a loaded model (its device wins)."""
    return ExtractJob(args, model).run()


def load_features(out_dir: str | os.PathLike, which: int | str) -> dict[str, torch.Tensor]:
    """The tensors of one input of an ``extract`` output: ``which`` is its position in the input (int) or its id
    (str). Keys: ``layer.<L>`` per stored layer, ``input_ids``, ``image_mask``, ``position`` (and
    ``vision_embeds`` with ``--save-vision``), all with one row per stored token (see ``index.json``)."""
    from safetensors import safe_open

    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be the extract job's --out directory, got {type(out_dir).__name__}")
    if isinstance(which, bool) or not isinstance(which, (int, str)):
        raise TypeError(f"which must be an input position (int) or an input id (str), got {which!r}")
    out_dir = os.fspath(out_dir)
    index = read_json(os.path.join(out_dir, "index.json"))
    if index is None:
        raise FileNotFoundError(f"no index.json in {out_dir!r}: not an extract output (or the run has not finished)")
    entries = index["items"]
    if isinstance(which, int):
        if not -len(entries) <= which < len(entries):
            raise IndexError(f"input position {which} out of range: {out_dir!r} holds {len(entries)} inputs")
        e = entries[which]
    else:
        e = next((x for x in entries if x["id"] == which or (not isinstance(x["id"], str) and str(x["id"]) == which)),
                 None)
        if e is None:
            raise KeyError(f"no input with id {which!r} in {out_dir!r}")
    if "error" in e:
        raise ValueError(f"input {e['id']!r} failed: {e['error']}")
    out = {}
    with safe_open(os.path.join(out_dir, e["shard"]), framework="pt") as f:
        for name in f.keys():
            if name == "vision_embeds":  # an input without images holds none (its batch may have had no images)
                lo, n = e.get("vision_offset", 0), e.get("vision_length", 0)
            else:
                lo, n = e["offset"], e["length"]
            out[name] = f.get_slice(name)[lo:lo + n]
    return out
