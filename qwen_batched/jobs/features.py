"""The feature files of the ``extract`` job: reading shards, merging them into ``index.json``, loading an input."""
from __future__ import annotations

import json
import os

import torch

from .inputs import Item
from .io import FEATURE_SHARD_RE, atomic_write_bytes, list_shards

INDEX_FORMAT = "qwen_batched.features/1"


def read_feature_shards(directory: str) -> dict[str, tuple[dict, bool, str]]:
    """key -> (index entry, retry flag, shard file), from every complete shard (the newest run wins).

    Entries of inputs that have rows carry ``shard``; failed inputs carry ``error`` instead.
    """
    from safetensors import safe_open

    out: dict[str, tuple[dict, bool, str]] = {}
    for fn in list_shards(directory, FEATURE_SHARD_RE):
        with safe_open(os.path.join(directory, fn), framework="pt") as f:
            entries = json.loads(f.metadata()["entries"])
        for e in entries:
            key, retry = e.pop("key"), bool(e.pop("retry", False))
            if "error" not in e:
                e["shard"] = fn
            out[key] = (e, retry, fn)
    return out


def merge_features(items: list[Item], out_dir: str, settings: dict, model_id: str,
                   resolved_layers: list[int] | None) -> int:
    """Write ``index.json``: every input, in input order, with its shard and rows; drop superseded shards."""
    done = read_feature_shards(out_dir)
    missing = [it for it in items if it.key not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} input(s) have no features in {out_dir} (e.g. {missing[0].qid!r}); "
                           f"rerun the same command to finish them")
    old = _read_json(os.path.join(out_dir, "index.json")) or {}
    entries = [done[it.key][0] for it in items]
    used = sorted({e["shard"] for e in entries if "shard" in e})
    layers = resolved_layers or old.get("layers") or settings["layers"]
    index = {
        "format": INDEX_FORMAT, "model_id": model_id, "layers": layers, "requested_layers": settings["layers"],
        "tokens": settings["tokens"], "text": settings["text"], "conv_mode": settings["conv_mode"],
        "final_norm": settings["final_norm"],
        "tensors": {
            "layer.<L>": "(rows, hidden) hidden state L: 0 embeddings, i output of decoder layer i, num_layers "
                         "after the final norm (-1 requests that one)",
            "input_ids": "(rows,) int32 token ids", "image_mask": "(rows,) bool, True on image-token rows",
            "position": "(rows,) int32, index of the row's token in the input's unpadded prompt",
            **({"vision_embeds": "(image tokens, hidden) vision tower output (vision_offset/vision_length)"}
               if settings["save_vision"] else {})},
        "rows": "all non-pad tokens of each input" if settings["tokens"] == "all" else "image tokens only",
        "shards": used, "items": entries}
    atomic_write_bytes(os.path.join(out_dir, "index.json"), (json.dumps(index, ensure_ascii=False) + "\n").encode())
    winners = {fn for _, _, fn in done.values()}
    for fn in list_shards(out_dir, FEATURE_SHARD_RE):  # every entry superseded by a later run
        if fn not in winners:
            os.remove(os.path.join(out_dir, fn))
    return len(entries)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_features(out_dir: str, which: int | str) -> dict[str, torch.Tensor]:
    """Tensors of one input of an ``extract`` output, by position in the input or by id."""
    from safetensors import safe_open

    index = _read_json(os.path.join(out_dir, "index.json"))
    if index is None:
        raise FileNotFoundError(f"no index.json in {out_dir}")
    entries = index["items"]
    if isinstance(which, int):
        e = entries[which]
    else:
        e = next((x for x in entries if str(x["id"]) == str(which)), None)
        if e is None:
            raise KeyError(f"no input with id {which!r} in {out_dir}")
    if "error" in e:
        raise ValueError(f"input {e['id']!r} failed: {e['error']}")
    out = {}
    with safe_open(os.path.join(out_dir, e["shard"]), framework="pt") as f:
        for name in f.keys():
            if name == "vision_embeds":
                lo, n = e["vision_offset"], e["vision_length"]
            else:
                lo, n = e["offset"], e["length"]
            out[name] = f.get_slice(name)[lo:lo + n]
    return out
