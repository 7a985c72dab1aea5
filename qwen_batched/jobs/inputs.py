"""Reading the inputs of a job: question files and image lists become :class:`Item` objects; image decoding."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Item:
    """One unit of work: a question (answer job) or an input to embed (extract job)."""

    index: int                 # position in the input (output order)
    key: str                   # resume key, unique within the input
    qid: Any                   # the question_id / id as given
    images: list[str]          # absolute paths
    text: str
    error: str | None = None   # set when the input line itself is unusable


def _strip_image_placeholder(text: str) -> str:
    # LLaVA question files sometimes carry "<image>\n": the processor places the image tokens itself.
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip("\n")


def _resolve(path: str, folder: str | None) -> str:
    path = os.path.expanduser(str(path))
    if folder and not os.path.isabs(path):
        path = os.path.join(folder, path)
    return os.path.abspath(path)


def _finalize_keys(items: list[Item]) -> list[Item]:
    """Keys: the given id where ids are present and unique, the input line otherwise."""
    seen: dict[str, int] = {}
    for it in items:
        if it.qid is not None:
            k = str(it.qid)
            seen[k] = seen.get(k, 0) + 1
    for it in items:
        k = str(it.qid) if it.qid is not None else None
        it.key = f"id:{k}" if k is not None and seen[k] == 1 else f"line:{it.index}"
    return items


def read_questions(path: str, image_folder: str | None = None, limit: int | None = None) -> list[Item]:
    """Question lines ``{"question_id", "image" (path or list, relative to image_folder), "text"}``.

    Blank lines are skipped; an unparsable line becomes an item with ``error`` set (it gets an error answer).
    """
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            if limit is not None and len(items) >= limit:
                break
            idx = len(items)
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                items.append(Item(idx, "", None, [], "", error=f"line {lineno + 1}: invalid question line ({e})"))
                continue
            qid = d.get("question_id", d.get("id"))
            img = d.get("image", d.get("images"))
            imgs = [] if img is None else ([img] if isinstance(img, str) else list(img))
            text = d.get("text", d.get("question", d.get("prompt", "")))
            err = None
            if not isinstance(text, str):
                err, text = f"line {lineno + 1}: 'text' must be a string", str(text)
            if not all(isinstance(p, str) for p in imgs):
                err, imgs = f"line {lineno + 1}: 'image' must be a path or a list of paths", []
            items.append(Item(idx, "", qid, [_resolve(p, image_folder) for p in imgs],
                              _strip_image_placeholder(text), error=err))
    return _finalize_keys(items)


def read_image_inputs(spec: str, image_folder: str | None = None, text: str = "",
                      limit: int | None = None) -> list[Item]:
    """Inputs of the extract job.

    ``spec`` is a directory (every image file below it, sorted; id = relative path), a ``.jsonl`` file
    (``{"id", "image" (path or list), "text"?}``) or a text file with one image path per line (id = the path
    as written). Relative paths resolve against ``image_folder`` (default: the list file's directory).
    """
    items: list[Item] = []
    if os.path.isdir(spec):
        root = os.path.abspath(spec)
        rels = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in filenames:
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    rels.append(os.path.relpath(os.path.join(dirpath, fn), root))
        for rel in sorted(rels):
            items.append(Item(len(items), "", rel, [os.path.join(root, rel)], text))
    elif spec.endswith(".jsonl"):
        folder = image_folder or os.path.dirname(os.path.abspath(spec))
        for q in read_questions(spec, folder):
            q.text = q.text or text
            items.append(q)
    else:
        folder = image_folder or os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as f:
            for line in f:
                p = line.strip()
                if p and not p.startswith("#"):
                    items.append(Item(len(items), "", p, [_resolve(p, folder)], text))
    if limit is not None:
        items = items[:limit]
    return _finalize_keys(items)


def decode_image(path: str) -> torch.Tensor:
    """Decode to a (3, H, W) uint8 tensor (EXIF rotation applied, converted to RGB)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
