"""Tokenizers behind one small interface: ``encode``, ``encode_batch``, ``decode``, ``batch_decode``, ``token_to_id``.

* :class:`JsonTokenizer` loads a checkpoint's ``tokenizer.json`` with the ``tokenizers`` library.
* :class:`ByteTokenizer` is the tiny preset's vocabulary, built in code: ids 0..255 are bytes, then the Qwen
  special tokens (``config.TINY_SPECIAL_TOKENS``) get ids 256.. in that order.

Special tokens written in the text (``<|im_start|>``, ``<|image_pad|>``, ...) are recognised as whole tokens.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

from .config import TINY_SPECIAL_TOKENS


def _as_id_lists(ids) -> list[list[int]]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [list(map(int, seq)) for seq in ids]


class ByteTokenizer:
    """Byte-level vocabulary: bytes are ids 0..255, special tokens 256.. (the tiny preset's ids)."""

    def __init__(self, special_tokens: Sequence[str] = TINY_SPECIAL_TOKENS):
        self.special_tokens = tuple(special_tokens)
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(self.special_tokens)}
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._special_to_id.get(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens`` is accepted for interface parity; this vocabulary adds none."""
        ids: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:  # odd pieces are the separators: special tokens
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out, buf = [], bytearray()
        for i in map(int, ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens and 256 <= i < self.vocab_size:
                out.append(self.special_tokens[i - 256])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in _as_id_lists(sequences)]


class JsonTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers`` format) loaded with the ``tokenizers`` library.

    ``add_special_tokens`` applies the file's post-processor template as ``transformers`` does by default
    (Qwen's adds nothing: no BOS/EOS).
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.special_tokens = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "JsonTokenizer":
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("loading tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from e
        return cls(Tokenizer.from_file(os.fspath(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch(_as_id_lists(sequences), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | os.PathLike) -> JsonTokenizer:
    """Load ``tokenizer.json`` from a file path or a checkpoint directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    return JsonTokenizer.from_file(path)
