"""``FeatureStep``: decoder features for a control loop with fixed cameras, one fixed-shape call per step.

A robot policy calls the backbone every control step with the same cameras, the same frame size and an
instruction that rarely changes. ``model.feature_step(B, N, H, W)`` builds everything that depends only on
those shapes once: the resize target and bands, the vision geometry (window order, rotary tables, segment
plans), the prompt around the images, the image-token scatter index and the decoder's 3-D positions
and rotary tables. A warm call then reads nothing back from the device: frames in, features out, the same
shapes every call. On CUDA the step (preprocessing included) is captured as one CUDA graph by default: a
replay is one graph launch instead of one launch per kernel (``cuda_graph=False`` runs it eagerly). With
``compile=True`` the device part goes through ``torch.compile(fullgraph=True)`` first (fewer, fused kernels;
minutes to build instead of a capture's fraction of a second).

Token layout. ``extract_features`` puts a sample's images, then its text, in the user turn. Inside the step the
text slot is right-padded: ``[prefix and image blocks (P)][text (t)][suffix (S)][pad (T - t)]``, length
``L = P + T + S`` for ``T = max_text_tokens``. Real tokens then never see a pad under plain causal attention,
and each real token sits at the column it has with the longest text, so positions, rotary tables and the
attention pattern are the same every step (no mask, no per-step positions). The output puts the pads in front
of the text instead: ``[prefix and images][pad][text][suffix]``, so image tokens keep fixed columns and the last
token (the assistant prefix) is always at column ``L - 1``.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .attention import PACKED_BACKENDS, VarlenPlan
from .graphs import capture
from .lru import LRU
from .outputs import FeatureOutput
from .prompts import IMAGE_TOKEN, expand_image_tokens
from .rope import mrope_cos_sin, rope_index
from .text import PackedAttention
from .validation import check_context, check_flag, is_int, resolve_layers

_CACHE = 64  # distinct text tuples (and single texts x 16) kept tokenized, least recently used first out


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """The fixed token ids around the text: ``prefix`` (system turn, user turn start, every image block) and
    ``suffix`` (end of the user turn, assistant prefix); ``max_text`` ids fit between them."""
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    max_text: int

    @property
    def length(self) -> int:
        return len(self.prefix) + self.max_text + len(self.suffix)


class PromptTokens:
    """The processor's prompt for N images and one text, split into the fixed layout and the text's ids.

    Prompts are rendered and tokenized exactly as ``processor.prepare`` does (chat template, expanded image
    tokens, the tokenizer), so the ids equal ``extract_features(images=, texts=)``'s; a text's ids are cached.
    """

    def __init__(self, processor, n_images: int, tokens_per_image: int, max_text: int, image_token_id: int,
                 video_token_id: int):
        self.processor, self.n_images, self.tokens_per_image = processor, n_images, tokens_per_image
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        empty = self._encode("")
        vision_end = processor.vision_end_token_id
        cut = max((i for i, t in enumerate(empty) if t == vision_end), default=-1) + 1
        prefix, suffix = tuple(empty[:cut]), tuple(empty[cut:])
        if prefix.count(image_token_id) != n_images * tokens_per_image or image_token_id in suffix:
            raise ValueError("the chat template does not put the images before the text in one user turn; "
                             "feature_step needs that layout (the processor's default)")
        self.layout = PromptLayout(prefix, suffix, max_text)
        self._ids = LRU(16 * _CACHE)  # text -> its ids (tuple)

    def _encode(self, text: str) -> list[int]:
        proc = self.processor
        prompt = proc._render(text, self.n_images, True, None)  # the chat turn exactly as prepare() renders it
        prompt = expand_image_tokens(prompt, [self.tokens_per_image] * self.n_images)
        return list(proc.tokenizer.encode(prompt))

    def text_ids(self, text: str, where: str) -> tuple[int, ...]:
        """The ids of ``text`` between the fixed prefix and suffix (cached); ValueError if it does not fit."""
        return self._ids.get(text, lambda: self._text_ids(text, where))

    def _text_ids(self, text: str, where: str) -> tuple[int, ...]:
        if IMAGE_TOKEN in text:
            raise ValueError(f"{where} holds {IMAGE_TOKEN}; the step inserts the image blocks itself")
        full = self._encode(text)
        p, s = len(self.layout.prefix), len(self.layout.suffix)
        lay = self.layout
        if len(full) < p + s or tuple(full[:p]) != lay.prefix or tuple(full[len(full) - s:]) != lay.suffix:
            raise ValueError(f"{where}: its tokens merge with the prompt around it; use a text that starts and ends "
                             "on a token boundary")
        ids = tuple(full[p:len(full) - s])
        if self.image_token_id in ids or self.video_token_id in ids:
            raise ValueError(f"{where} holds image or video placeholder tokens")
        if len(ids) > self.layout.max_text:
            raise ValueError(f"{where} has {len(ids)} tokens, more than max_text_tokens={self.layout.max_text}")
        return ids


def _causal_sdpa(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention over (B, L): q (B, L, H, hd), k/v (B, L, Hkv, hd) -> (B, L, H*hd)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[-2] != k.shape[-2])
    return o.transpose(1, 2).flatten(-2)


@dataclasses.dataclass
class _Graph:
    """A captured CUDA graph of one step and its static buffers."""
    graph: torch.cuda.CUDAGraph
    frames: torch.Tensor  # (B, N, 3, H, W) input buffer
    ids: torch.Tensor  # (B, L)
    pad: torch.Tensor  # (B,)
    out: tuple  # (hidden states, attention mask, vision embeds), overwritten by every replay


class FeatureStep:
    """``step(frames, texts=None) -> FeatureOutput`` with fixed shapes; built by ``model.feature_step``.

    frames: (B, N, 3, H, W) uint8 (0..255) or floating (0..1) on the model's device, or a dict of N camera
    tensors (B, 3, H, W) in the order of ``cameras`` (LeRobot's ``observation.images.<camera>``).
    texts: one instruction for every row (a str) or one per row; None uses the construction's ``texts``.
    Returns ``hidden_states`` (one (B, L, D) per layer, zero at pads), ``attention_mask`` (B, L) long,
    ``image_mask`` (B, L) and ``vision_embeds`` (B*N*tokens_per_image, D), laid out as
    ``[prefix and images][pad][text][suffix]`` (module docstring). The real tokens carry the hidden states
    ``extract_features(images=frames, texts=texts)`` gives them.
    Checks are on metadata only (shape, dtype, device): pixel values are not read back, so floating frames must
    already be in 0..1. A step is bound to the model's device and dtype when it is built.
    """

    def __init__(self, model, batch_size: int, n_cameras: int, height: int, width: int, *, texts=None,
                 max_text_tokens: int = 32, layers=(-1,), compile: bool = False, cuda_graph: bool | None = None,
                 cameras=None):
        for name, v in (("batch_size", batch_size), ("n_cameras", n_cameras), ("height", height), ("width", width),
                        ("max_text_tokens", max_text_tokens)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        check_flag(compile, "compile")
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be None or a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and model.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {model.device}")
        if cuda_graph and model.tp is not None:  # a capture failing on one rank only would leave the others waiting
            raise ValueError("cuda_graph=True is not supported with tensor parallelism (tp_size > 1); leave it None")
        self.cameras = self._check_cameras(cameras, n_cameras)
        proc = model.processor
        if proc is None or proc.tokenizer is None:
            raise ValueError("feature_step needs model.processor with a tokenizer (a checkpoint's tokenizer.json) to "
                             "build the prompt")
        cfg, vcfg = model.cfg, model.cfg.vision
        self.layers = resolve_layers(layers, cfg.text.num_hidden_layers)
        self.model, self.compile = model, compile
        self.cuda_graph = model.device.type == "cuda" and model.tp is None if cuda_graph is None else cuda_graph
        self.batch_size, self.n_cameras, self.height, self.width = batch_size, n_cameras, height, width
        self.max_text_tokens = max_text_tokens
        self.image_size = proc.smart_resize(height, width)  # ValueError for an extreme aspect ratio
        device, dtype = model.device, model.dtype
        self.device, self.dtype = device, dtype
        self._moves = model.moves
        self.backend = model.backend
        B, N = batch_size, n_cameras

        # preprocessing: resize bands / taps and the normalisation for uint8 and float frames
        gh, gw = self.image_size[0] // vcfg.patch_size, self.image_size[1] // vcfg.patch_size
        self.tokens_per_image = gh * gw // vcfg.merge_unit
        resized = self.image_size != (height, width)
        tables = proc.resize_tables
        self._bands = tables.bands((height, width), self.image_size, device) if resized else None
        self._taps = [tables.taps(src, dst, device) if src != dst else None
                      for src, dst in ((height, self.image_size[0]), (width, self.image_size[1]))]
        self._norm = {scale: proc._norm(device, scale) for scale in (255.0, 1.0)}  # uint8 / float frames

        # vision tower: one geometry for the B*N same-size images (kept here even if the model's cache drops it)
        self._geo = model.caches.geometry(((1, gh, gw),) * (B * N), device, self.backend)

        # prompt: fixed layout, positions and rotary tables, image-token columns
        self.prompt = PromptTokens(proc, N, self.tokens_per_image, max_text_tokens, cfg.image_token_id,
                                   cfg.video_token_id)
        lay = self.prompt.layout
        P, L = len(lay.prefix), lay.length
        check_context(L, cfg, "feature_step length (prompt, images and max_text_tokens)")
        self.length, self._prefix_len = L, P
        ref = torch.tensor([lay.prefix + (cfg.pad_token_id,) * max_text_tokens + lay.suffix])  # (1, L)
        grids = torch.tensor([[1, gh, gw]] * N)
        pos, _ = rope_index(ref, None, grids, image_token_id=cfg.image_token_id,
                            spatial_merge_size=vcfg.spatial_merge_size)  # (3, 1, L)
        cos, sin = mrope_cos_sin(pos.to(device), *model.caches.rope(device), dtype)  # (1, L, hd)
        image_cols = torch.nonzero(ref[0] == cfg.image_token_id).flatten()  # (N*tokens_per_image,)
        self._image_index = (torch.arange(B)[:, None] * L + image_cols).flatten().to(device)  # into (B*L)
        self.image_mask = torch.zeros(B, L, dtype=torch.bool)
        self.image_mask[:, image_cols] = True
        self.image_mask = self.image_mask.to(device)
        self._cols = torch.arange(L, device=device)
        if self.backend in PACKED_BACKENDS:  # causal varlen over B equal segments: tokens packed (B*L)
            self._attn = PackedAttention(VarlenPlan.build([L] * B, device, self.backend), self.backend)
            self._cos, self._sin = (t.expand(B, L, -1).reshape(B * L, -1) for t in (cos, sin))
        else:
            self._attn = _causal_sdpa
            self._cos, self._sin = cos, sin

        self._texts = LRU(_CACHE)  # texts -> (ids (B, L), pads (B,)) on the device
        self._default = None if texts is None else self._resolve_texts(texts)
        if self._default is not None:
            self._text_tensors(self._default)  # tokenize (and check) the instruction now
        self._device_fn = torch.compile(self._forward, fullgraph=True) if compile else self._forward
        self._graphs: dict[torch.dtype, _Graph] = {}

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _check_cameras(cameras, n: int):
        if cameras is None:
            return None
        if isinstance(cameras, str) or not isinstance(cameras, (list, tuple)):
            raise TypeError(f"cameras must be a list of {n} camera names, got {cameras!r:.80}")
        if len(cameras) != n or len(set(cameras)) != n or not all(isinstance(c, str) for c in cameras):
            raise ValueError(f"cameras must be {n} distinct names (n_cameras={n}), got {list(cameras)!r:.200}")
        return tuple(cameras)

    def _check_tensor(self, x, where: str, shape: tuple[int, ...], layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor {layout}, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{where} must have shape {layout} = {shape} (fixed when the step was built), "
                             f"got {tuple(x.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"{where} must be uint8 (0..255) or floating point (0..1), got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{where} is on {x.device}, the model on {self.device}; move the frames to the "
                             "model's device")

    def _check_frames(self, frames) -> tuple[list[torch.Tensor] | torch.Tensor, tuple[str, ...] | None]:
        """-> (a (B, N, 3, H, W) tensor, or the N (B, 3, H, W) camera tensors in order; the camera order). Metadata
        checks only. The first dict fixes the order, once the whole call has passed its checks (the caller keeps
        it): a call that fails fixes nothing."""
        B, N, H, W = self.batch_size, self.n_cameras, self.height, self.width
        order = self.cameras
        if isinstance(frames, Mapping):
            if order is None:
                order = self._check_cameras(list(frames), N)
            if set(frames) != set(order):
                missing = [c for c in order if c not in frames]
                extra = [c for c in frames if c not in order]
                raise ValueError(f"frames must hold exactly the cameras {list(order)}; missing {missing}, "
                                 f"unexpected {extra}")
            cams = [frames[c] for c in order]
            for c, x in zip(order, cams):
                self._check_tensor(x, f"frames[{c!r}]", (B, 3, H, W), "(B, 3, H, W)")
            if len({x.dtype for x in cams}) > 1:
                raise ValueError(f"frames: the cameras must share one dtype, got {[str(x.dtype) for x in cams]}")
            return cams, order
        self._check_tensor(frames, "frames", (B, N, 3, H, W), "(B, N, 3, H, W)")
        return frames, order

    def _resolve_texts(self, texts) -> tuple[str, ...]:
        if texts is None:
            if self._default is None:
                raise ValueError("texts is required: give it to feature_step(texts=...) or to the call")
            return self._default
        if isinstance(texts, str):
            return (texts,) * self.batch_size
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a list of {self.batch_size} str, got {texts!r:.80}")
        if len(texts) != self.batch_size:
            raise ValueError(f"texts has {len(texts)} entries, the step has batch_size={self.batch_size}")
        return tuple(texts)

    @torch.inference_mode()  # at construction too: the compiled step sees one kind of tensor (no recompile)
    def _text_tensors(self, key: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) in the internal layout and pads per row (B,), on the device; cached per texts."""
        return self._texts.get(key, lambda: self._make_text_tensors(key))

    def _make_text_tensors(self, key: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.prompt.text_ids(t, f"texts[{i}]") for i, t in enumerate(key)]
        lay = self.prompt.layout
        ids = torch.full((self.batch_size, self.length), self.model.cfg.pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):  # host lists, once per new instruction
            ids[b, :self.length - (lay.max_text - len(row))] = torch.tensor(lay.prefix + row + lay.suffix)
        pad = torch.tensor([lay.max_text - len(r) for r in rows], dtype=torch.long)
        if self.device.type == "cuda":  # pinned + non_blocking: no stream sync
            ids, pad = (t.pin_memory().to(self.device, non_blocking=True) for t in (ids, pad))
        else:
            ids, pad = ids.to(self.device), pad.to(self.device)
        return ids, pad

    # ------------------------------------------------------------------ device work
    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, N, 3, H, W) -> patch rows (B*N*gh*gw, C*T*P*P) float32: the processor's own computation,
        with the resize tables held here."""
        x = frames.reshape(self.batch_size * self.n_cameras, 1, 3, self.height, self.width)
        mean, std = self._norm[255.0 if frames.dtype == torch.uint8 else 1.0]
        return self.model.processor._patch_rows(x, self.image_size, mean, std, taps=self._taps, bands=self._bands)

    def _forward(self, pixels: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor):
        """The device part: pixels (n_patches, C*T*P*P), ids (B, L), pad (B,) -> (hidden states, mask, vision)."""
        B, L, P = self.batch_size, self.length, self._prefix_len
        text = self.model.model
        vis = self.model.visual(pixels, self._geo, self.backend).to(self.dtype)  # (B*N*tokens_per_image, D)
        h = text.embed_tokens(ids).flatten(0, 1).index_copy(0, self._image_index, vis)  # (B*L, D)
        D = h.shape[-1]
        if self._attn is _causal_sdpa:
            h = h.view(B, L, D)
        _, states = text(h, self._cos, self._sin, self._attn, depth=max(self.layers), keep=self.layers)
        # internal [P][text][suffix][pad] -> output [P][pad][text][suffix]
        start = P + pad[:, None]  # (B, 1) first text column of the output
        src = torch.where(self._cols >= start, self._cols - pad[:, None], self._cols)  # (B, L)
        valid = (self._cols < P) | (self._cols >= start)  # (B, L)
        index, pads = src[..., None].expand(B, L, D), ~valid[..., None]
        hidden = tuple(states[i].view(B, L, D).gather(1, index).masked_fill(pads, 0) for i in self.layers)
        return hidden, valid.long(), vis

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def __call__(self, frames, texts=None) -> FeatureOutput:
        if self.model.moves != self._moves:  # new weight tensors, even back in the same dtype and device: a
            # captured graph would read the old ones
            raise ValueError(f"the model was moved or converted (.to(), .half(), ...) after this step was built "
                             f"for {self.dtype} on {self.device}; build a new step (model.feature_step(...))")
        frames, order = self._check_frames(frames)
        ids, pad = self._text_tensors(self._resolve_texts(texts))
        self.cameras = order  # every check passed
        if self.cuda_graph:
            out = self._replay(frames, ids, pad)
            if out is not None:
                return out
        if isinstance(frames, list):
            frames = torch.stack(frames, dim=1)  # (B, N, 3, H, W)
        return self._output(*self._device(self._pixels(frames), ids, pad))

    def _device(self, pixels: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor):
        """The device part, compiled when asked; a compilation that fails leaves the step eager, with a warning."""
        try:
            return self._device_fn(pixels, ids, pad)
        except Exception as e:
            if not self.compile or self._device_fn == self._forward:  # (a bound method: equal, never identical)
                raise
            warnings.warn(f"torch.compile of the feature step failed ({type(e).__name__}: {e}); running it eagerly")
            self._device_fn = self._forward
            return self._forward(pixels, ids, pad)

    def _output(self, hidden, mask, vis) -> FeatureOutput:
        return FeatureOutput(hidden_states=hidden, attention_mask=mask, image_mask=self.image_mask.clone(),
                             vision_embeds=vis, layers=self.layers)

    def _replay(self, frames, ids, pad) -> FeatureOutput | None:
        """CUDA graph: copy the inputs into the static buffers, replay the graph, copy the outputs out (a replay
        overwrites the previous outputs). None when the capture failed (the step then runs without a graph)."""
        dtype = frames[0].dtype if isinstance(frames, list) else frames.dtype
        g = self._graphs.get(dtype)
        if g is None:
            try:
                g = self._graphs[dtype] = self._capture(dtype, ids, pad)
            except Exception as e:
                warnings.warn(f"CUDA graph capture of the feature step failed ({type(e).__name__}: {e}); "
                              "running it without a graph")
                self.cuda_graph = False
                return None
        if isinstance(frames, list):
            for i, x in enumerate(frames):
                g.frames[:, i].copy_(x)
        else:
            g.frames.copy_(frames)
        g.ids.copy_(ids)
        g.pad.copy_(pad)
        g.graph.replay()
        hidden, mask, vis = g.out
        return self._output(tuple(h.clone() for h in hidden), mask.clone(), vis.clone())

    def _capture(self, dtype: torch.dtype, ids: torch.Tensor, pad: torch.Tensor) -> _Graph:
        """Capture preprocessing + the device part (``graphs.capture``; its warm-ups build kernels, compile)."""
        frames = torch.zeros(self.batch_size, self.n_cameras, 3, self.height, self.width, dtype=dtype,
                             device=self.device)
        ids, pad = ids.clone(), pad.clone()
        graph, out = capture(lambda: self._device(self._pixels(frames), ids, pad), self.device)
        return _Graph(graph, frames, ids, pad, out)

    def __repr__(self) -> str:
        return (f"FeatureStep(batch_size={self.batch_size}, n_cameras={self.n_cameras}, {self.height}x{self.width} "
                f"-> {self.image_size[0]}x{self.image_size[1]}, tokens={self.length} "
                f"(max_text_tokens={self.max_text_tokens}), layers={self.layers}, compile={self.compile}, "
                f"cuda_graph={self.cuda_graph}, "
                f"backend={self.backend!r})")
