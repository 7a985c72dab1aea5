"""Estimated prompt tokens of an item, from image file headers and ``smart_resize`` (no decoding)."""
from __future__ import annotations

from .inputs import Item

# A chat prompt adds ~20 template tokens around the question; each image adds vision_start/end.
TEMPLATE_TOKENS = 24


def image_size_from_header(path: str) -> tuple[int, int]:
    """(height, width) as the image will be decoded (EXIF rotation applied), reading only the header."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - malformed EXIF: ignore it, as decoding does
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


class TokenEstimator:
    """Estimated prompt tokens of an item: image tokens after ``smart_resize`` plus text and template tokens.

    Only image headers are read. The resize bounds are the processor's (``min_pixels``/``max_pixels``).
    """

    def __init__(self, processor=None, cfg=None):
        v = getattr(cfg, "vision", None)
        self.factor = int(getattr(processor, "factor", 0) or
                          ((v.patch_size * v.spatial_merge_size) if v is not None else 28))
        self.min_pixels = int(getattr(processor, "min_pixels", 0) or 3136)
        self.max_pixels = int(getattr(processor, "max_pixels", 0) or 12845056)
        self.tokenizer = getattr(processor, "tokenizer", None)

    def resized(self, h: int, w: int) -> tuple[int, int]:
        from ..processor import smart_resize

        return smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)

    def image_tokens(self, path: str) -> int:
        h, w = image_size_from_header(path)
        rh, rw = self.resized(h, w)
        return (rh // self.factor) * (rw // self.factor)

    def text_tokens(self, text: str) -> int:
        if self.tokenizer is not None and hasattr(self.tokenizer, "encode"):
            try:
                return len(self.tokenizer.encode(text))
            except Exception:  # noqa: BLE001 - an estimate only
                pass
        return len(text.encode("utf-8")) // 3 + 1

    def __call__(self, item: Item) -> tuple[int, int]:
        """(estimated prompt tokens, estimated image tokens); unreadable images count as 0 (they will error)."""
        img = 0
        for p in item.images:
            try:
                img += self.image_tokens(p) + 2
            except Exception:  # noqa: BLE001 - reported when the item is decoded
                pass
        return img + self.text_tokens(item.text) + TEMPLATE_TOKENS, img
