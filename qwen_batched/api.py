"""``QwenBatchedVL``: the public model object (loading, image and video encoding, features, generation)."""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import resolve_backend
from .batching import plan_ranges, run_ranges
from .caches import ModelCaches
from .config import ModelConfig, load_generation_eos, with_generation_eos
from .generation import generate_tokens
from .inputs import ModelInputs, item_pixels
from .outputs import FeatureOutput, GenerateOutput
from .prefix import PrefixGroups, find_groups, probe_index, run_shared
from .rope import rope_index
from .text import TextModel, run_batch
from .tp import setup as setup_tp
from .validation import (check_budget, check_context, check_dtype, check_flag, check_generate_args,
                         checked_vision_inputs, resolve_eos, resolve_layers, row_seeds, validate_inputs)
from .vision import VisionTransformer, align_mlp

SHARE_PREFIX = True  # default of share_prefix: see bench/bench_prefix.py (README) for the measurements behind it


def _default_dtype(device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """The checkpoint's dtype on CUDA (bf16 for the published models), float32 elsewhere."""
    if device.type == "cuda" and cfg.torch_dtype:
        return getattr(torch, str(cfg.torch_dtype).replace("torch.", ""), torch.bfloat16)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class QwenBatchedVL(nn.Module):
    """Qwen2.5-VL for whole batches: ``visual`` (vision tower), ``model`` (decoder), ``lm_head``."""

    def __init__(self, cfg: ModelConfig, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attn_backend = attn_backend  # as asked; ``backend`` is what runs, resolved for the device and dtype
        self.backend = "sdpa"
        self.caches = ModelCaches(cfg)
        self.visual = VisionTransformer(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.processor = None  # set by the constructors below (BatchedImageProcessor)
        self.tp = None  # tp.TensorParallel when split across ranks (tp_size > 1)
        self.image_cache = None  # see enable_image_cache
        self.moves = 0  # .to() / .half() ... so far: what a feature step built before one would read is gone

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _empty(cls, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, attn_backend: str):
        resolve_backend(attn_backend, device, dtype)  # fail early on an unusable backend
        with torch.device("meta"):
            model = cls(cfg, attn_backend=attn_backend)
        return model

    @classmethod
    def from_config(cls, config_or_name: ModelConfig | str = "tiny", *, device=None, dtype=None, seed: int = 0,
                    attn_backend: str = "auto", tp_size: int = 1) -> "QwenBatchedVL":
        """A model with random weights (std 0.02 linears/embeddings, unit norms): demos, tests, benchmarks.

        tp_size > 1 splits it across the ranks of a process group (see ``qwen_batched.tp``): each rank draws the
        same full weights as one process would and keeps its slices.
        """
        if isinstance(config_or_name, str):
            cfg = ModelConfig.from_name(config_or_name)
        elif isinstance(config_or_name, ModelConfig):
            cfg = config_or_name.validate()
        else:
            raise TypeError(f"config_or_name must be a ModelConfig or a preset name, got {type(config_or_name).__name__}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = check_dtype(dtype) or _default_dtype(device, cfg)
        tp = setup_tp(tp_size, cfg, device, dtype)
        device = tp.device if tp else device
        model = cls._empty(cfg, device, dtype, attn_backend)
        full = model.state_dict()
        if tp:
            tp.apply(model)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        state = {}
        for name, p in full.items():  # materialise straight on the device, in the target dtype
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if p.dim() == 1:  # 1-D weights are norm scales, the rest biases
                t.fill_(1.0) if name.endswith(".weight") else t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=gen)
            state[name] = t if tp is None else tp.shard(name, t).clone()  # a rank keeps only its slice
        if cfg.tie_word_embeddings:
            emb = state["model.embed_tokens.weight"]
            state["lm_head.weight"] = emb if tp is None else tp.shard("lm_head.weight", emb)
        return model._take(state, processor_path=None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, device=None, dtype=None,
                        attn_backend: str = "auto", tp_size: int = 1) -> "QwenBatchedVL":
        """Load a checkpoint (``config.json`` + safetensors, single file or sharded): a directory, or a hub id
        (``"Qwen/Qwen2.5-VL-7B-Instruct"``) resolved as ``transformers`` does: the local hub cache first
        (``cache_dir``, default ``HF_HUB_CACHE``), downloaded at ``revision`` when missing unless ``HF_HUB_OFFLINE=1``.

        tp_size > 1 (under torchrun, or with a process group set up): split across tp_size ranks, each reading
        only its slices of the files (see ``qwen_batched.tp``); device 'cuda' means ``cuda:LOCAL_RANK``.
        """
        from .hub import resolve_checkpoint
        from .loading import load_state_dict

        check_dtype(dtype)  # before anything is downloaded or read
        path = resolve_checkpoint(path, revision=revision, cache_dir=cache_dir)
        cfg = with_generation_eos(ModelConfig.from_json(path), load_generation_eos(path))
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = check_dtype(dtype) or _default_dtype(device, cfg)
        tp = setup_tp(tp_size, cfg, device, dtype)
        device = tp.device if tp else device
        model = cls._empty(cfg, device, dtype, attn_backend)
        if tp:
            tp.apply(model)
        state = load_state_dict(path, model, device=device, dtype=dtype, select=tp.select if tp else None)
        return model._take(state, processor_path=path)

    @classmethod
    def from_hf(cls, hf_model, *, dtype=None, attn_backend: str = "auto") -> "QwenBatchedVL":
        """Wrap a loaded ``Qwen2_5_VLForConditionalGeneration``, sharing its tensors (no copy).

        The tensors are shared when they already have ``dtype`` (None: their own, which must then be one dtype);
        others are converted to ``dtype`` (copies), and in fp16/bf16 on CUDA the vision MLP's are padded copies
        (``vision.align_mlp``). transformers 5 builds a model from the published config with
        the text model in bf16 and the vision tower in fp32: such a mixed model is a ValueError without ``dtype=``,
        never silently upcast.
        """
        from .loading import convert_state_dict

        if not hasattr(hf_model, "named_parameters") or not hasattr(hf_model, "config"):
            raise TypeError(f"hf_model must be a transformers Qwen2_5_VLForConditionalGeneration, got {type(hf_model).__name__}")
        dtype = check_dtype(dtype)
        cfg = with_generation_eos(ModelConfig.from_dict(hf_model.config.to_dict()),
                                  getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None))
        params = list(hf_model.named_parameters())
        devices = {p.device for _, p in params}
        if len(devices) > 1:
            raise ValueError(f"hf_model's parameters are on several devices {sorted(map(str, devices))}; move it to "
                             "one device first (hf_model.to(device))")
        if dtype is None:
            parts: dict[str, set] = {"vision tower": set(), "text model and lm_head": set()}
            for name, p in params:
                parts["vision tower" if "visual." in name else "text model and lm_head"].add(p.dtype)
            found = set().union(*parts.values())
            if len(found) > 1:
                said = "; ".join(f"{part}: {', '.join(sorted(map(str, ds)))}" for part, ds in parts.items() if ds)
                raise ValueError(f"hf_model's parameters have mixed dtypes ({said}); pass dtype= (e.g. "
                                 "dtype=torch.bfloat16) to convert them to one, or load the model with one dtype "
                                 "(from_pretrained(..., dtype=torch.bfloat16))")
            dtype = found.pop()
        device = devices.pop()
        model = cls._empty(cfg, device, dtype, attn_backend)
        sd = {k: v.detach() for k, v in hf_model.state_dict(keep_vars=True).items()}
        return model._take(convert_state_dict(sd, model, device=device, dtype=dtype), processor_path=None)

    def _take(self, state: dict[str, torch.Tensor], processor_path: str | None) -> "QwenBatchedVL":
        """Adopt ``state`` (checked tensors) as the parameters, re-tie embeddings, freeze, attach the processor."""
        from .processor import load_processor

        self.load_state_dict(state, strict=True, assign=True)
        if self.cfg.tie_word_embeddings and self.tp is None:  # under TP lm_head is a view of its vocab slice
            self.lm_head.weight = self.model.embed_tokens.weight
        self.eval().requires_grad_(False)
        self._adapt()
        self.processor = load_processor(processor_path, self.cfg)
        return self

    def _adapt(self) -> None:
        """What depends on the device and dtype, decided once: the attention backend, and the vision MLP width
        (aligned to 64 units for the tensor cores in fp16/bf16 on CUDA, the config's width elsewhere)."""
        self.backend = resolve_backend(self.attn_backend, self.device, self.dtype)
        half = self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        align_mlp(self.visual, 64 if half else 1)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def _apply(self, fn, recurse=True):
        """After ``.to()`` / ``.half()`` ...: adapt to the new device and dtype (``_adapt``), drop device-bound caches
        and the image cache (its features were made in the old dtype, on the old device)."""
        before = [p.data_ptr() for p in self.parameters()]
        out = super()._apply(fn, recurse)
        if [p.data_ptr() for p in self.parameters()] != before:  # new weight tensors (a no-op .to() keeps them)
            self.moves = getattr(self, "moves", 0) + 1  # (_apply also runs inside __init__, before moves is set)
        if self.model.embed_tokens.weight.device.type != "meta":
            self._adapt()
            self.caches.clear()
            if getattr(self, "image_cache", None) is not None:
                self.image_cache.clear()
        return out

    # ------------------------------------------------------------------ vision
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, *,
                      return_pre_merger: bool = False) -> torch.Tensor:
        """Encode every image of a batch in one varlen pass.

        pixel_values: (sum t*h*w, C*T*P*P) patch rows as the processor emits them.
        image_grid_thw: (n_images, 3) int.
        Returns (sum t*h*w/4, out_hidden): images concatenated in input order, each in raster order. With
        ``return_pre_merger=True``: (sum t*h*w, hidden) ViT output before the merger, in input patch order.
        With the image cache enabled, only cache misses are encoded (duplicates in the batch once).
        """
        grids = checked_vision_inputs(pixel_values, image_grid_thw, self.cfg.vision)
        pixel_values = pixel_values.to(self.device)
        if self.image_cache is None or return_pre_merger:
            return self._vision(pixel_values, grids, return_pre_merger)
        return self._encode_unique(pixel_values, grids)[0]

    def _vision(self, pixel_values: torch.Tensor, grids: tuple, return_pre_merger: bool = False) -> torch.Tensor:
        """The vision tower on checked inputs with host grids; under tensor parallelism the images are split
        across the ranks and the features all-gathered."""
        def encode(pv: torch.Tensor, g: tuple) -> torch.Tensor:
            return self.visual(pv, self.caches.geometry(g, self.device, self.backend), self.backend, return_pre_merger)

        if self.tp is not None:
            return self.tp.encode_images(encode, pixel_values, grids, self.cfg.vision, self.dtype, return_pre_merger)
        return encode(pixel_values, grids)

    def enable_image_cache(self, max_bytes: int = 1 << 30) -> None:
        """Cache vision embeddings per image (keyed by pixel hash, grid, model), LRU bounded by ``max_bytes``."""
        from .image_cache import ImageEmbeddingCache

        self.image_cache = ImageEmbeddingCache(max_bytes, model_token=f"{id(self):x}")

    def disable_image_cache(self) -> None:
        self.image_cache = None

    def _encode_unique(self, pixel_values: torch.Tensor, grids: tuple, keys: Sequence[bytes | None] | None = None,
                       pixel_values_videos: torch.Tensor | None = None, video_grids: tuple = (),
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (and videos) through the vision tower, each distinct image once: images with equal content
        keys (``keys``, None where unknown; with the image cache on, missing keys are computed and hits are looked
        up) share one encoding. The images to encode and the videos go in one call. Returns (image features
        (n_image_tokens, D), video features or None)."""
        cache, mu = self.image_cache, self.cfg.vision.merge_unit
        keys = list(keys) if keys is not None else [None] * len(grids)
        if cache is not None:
            missing = [i for i, k in enumerate(keys) if k is None]
            for i, k in zip(missing, cache.keys(pixel_values, grids, missing)):
                keys[i] = k
        rows = [t * h * w for t, h, w in grids]
        out = [cache.get(k) for k in keys] if cache is not None else [None] * len(grids)
        todo: dict = {}  # content key (or the index of an image without one) -> first image to encode
        for i, (k, hit) in enumerate(zip(keys, out)):
            if hit is None:
                todo.setdefault(i if k is None else k, i)
        if cache is not None:
            cache.hits += sum(hit is not None for hit in out)
            cache.misses += len(todo)
        first = list(todo.values())
        pieces, enc_grids = [], []
        if first:
            pieces.append(item_pixels(pixel_values, grids, first))
            enc_grids += [grids[i] for i in first]
        if video_grids:
            pieces.append(pixel_values_videos.to(pixel_values.dtype))
            enc_grids += list(video_grids)
        enc = None
        if pieces:
            enc = self._vision(torch.cat(pieces) if len(pieces) > 1 else pieces[0], tuple(enc_grids))
        n_img = sum(rows[i] for i in first) // mu
        videos = enc[n_img:] if video_grids else None
        fresh = dict(zip(todo, enc[:n_img].split([rows[i] // mu for i in first]))) if first else {}
        if cache is not None:
            for k, v in fresh.items():
                cache.put(k, v)
        if first == list(range(len(grids))):  # every image encoded, in order: the features as they came
            return enc[:n_img], videos
        out = [fresh[i if k is None else k] if hit is None else hit for i, (k, hit) in enumerate(zip(keys, out))]
        return torch.cat(out), videos

    def _prefix_groups(self, batch: ModelInputs) -> PrefixGroups | None:
        """Rows of ``batch`` sharing a prefix (``prefix.find_groups``), or None when fewer than two rows hold an
        image or a row's mask has holes. One device read brings the ids and a few pixel values of each image;
        images whose ids and values agree are then fingerprinted in full (a second read, only then)."""
        lay = batch.layout
        if sum(n > 0 for n in lay.images_per_row) < 2 or lay.run_starts is None:
            return None  # (a mask with holes inside a row: the rows run unshared)
        pv, grids, ids = batch.pixel_values, lay.image_grids, batch.input_ids
        idx = torch.from_numpy(probe_index(grids, pv.shape[1])).to(pv.device)  # (n_images, PROBES)
        flat = np.array(torch.cat([ids.flatten().double(), pv.flatten()[idx.flatten()].double()]).tolist())
        host_ids = flat[:ids.numel()].astype(np.int64).reshape(ids.shape)
        probes = flat[ids.numel():].reshape(idx.shape)
        fp = self.image_cache if self.image_cache is not None else self.caches.fingerprints
        known = self.image_cache.keys(pv, grids) if self.image_cache is not None else None  # the cache needs them
        return find_groups(host_ids, lay, self.cfg, probes, lambda which: fp.keys(pv, grids, which),
                           known_keys=known)

    # ------------------------------------------------------------------ decoder: features and generation
    @torch.inference_mode()
    def extract_features(self, inputs: ModelInputs | None = None, /, *, input_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                         video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                         mm_token_type_ids: torch.Tensor | None = None, images=None, texts=None, videos=None,
                         fps: float | list[float] | None = None, rescale: bool | None = None, layers=None,
                         final_norm: bool = True, max_batch_tokens: int | None = None,
                         share_prefix: bool = SHARE_PREFIX) -> FeatureOutput:
        """Decoder hidden states of a batch, in the reference's ``output_hidden_states`` convention.

        The batch: a ``ModelInputs`` (``model.processor.prepare(...)``), or its tensors as keywords (input_ids /
        attention_mask (B, L), any padding side; pixel_values + image_grid_thw; pixel_values_videos +
        video_grid_thw + second_per_grid_ts (None: 1 s, as the reference); mm_token_type_ids as transformers'
        processor returns it, so its whole output can be passed), or ``images=`` / ``texts=`` /
        ``videos=`` (with ``fps=``, default 2.0, and ``rescale=``: see ``processor.preprocess_images``), which go
        through ``model.processor.prepare``.
        layers: indices to return (default all): 0 = embeddings, i = output of layer i, num_layers = after the
        final norm (before it when ``final_norm=False``); negative indices count from the end. Layers past the
        deepest requested one are not run.
        max_batch_tokens: cap on rows x longest row per forward; a larger batch runs as sub-batches (results in
        the original order, identical to one pass). A sub-batch that runs out of device memory is halved and retried.
        share_prefix: rows whose prompts begin with the same tokens and images (compared by content), up to the end
        of an image block, are grouped wherever they sit in the batch: each distinct image is encoded once, each
        shared prefix prefilled once and each row's remainder on top of it (``prefix.py``). The same results up to
        rounding; rows that share nothing run as without it.
        """
        with self._same_call() as box:
            layers = resolve_layers(layers, self.cfg.text.num_hidden_layers)
            if not isinstance(final_norm, bool):
                raise TypeError(f"final_norm must be a bool, got {type(final_norm).__name__}")
            check_flag(share_prefix, "share_prefix")
            budget = check_budget(max_batch_tokens)
            batch = box["batch"] = self._door(
                inputs, dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                             video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                             mm_token_type_ids=mm_token_type_ids),
                images, texts, videos, fps, rescale)
            box["call"] = repr(("extract_features", layers, final_norm, budget, share_prefix))
        lay, L = batch.layout, batch.input_ids.shape[1]
        groups = self._prefix_groups(batch) if share_prefix else None
        order = groups.order() if groups is not None else list(range(batch.batch_size))

        def run(s: int, e: int):
            rows, sub, sg = self._sub_batch(batch, groups, order[s:e])
            lo, hi = lay.span(rows)
            x = self._embed(sub, sg.image_keys if sg is not None else None)
            kw = dict(rope=self.caches.rope(self.device), backend=self.backend, depth=max(layers), keep=layers,
                      final_norm=final_norm)
            if sg is not None and sg.any and max(layers) > 0:  # layer 0 (the embeddings) runs no layer to share
                _, states = run_shared(self.model, x.embeds, x.position_ids, sg, sub.layout.first,
                                       sub.layout.lengths, **kw)
            else:
                _, states = run_batch(self.model, x.embeds, x.position_ids, x.valid, lengths=list(sub.layout.n_real),
                                      starts=sub.layout.run_starts, **kw)
            states = [F.pad(states[i], (0, 0, lo, L - hi)) for i in layers]
            return rows, states, x.vision_embeds, x.video_embeds

        ranges = plan_ranges([lay.lengths[r] for r in order], budget)
        parts = [r for _, r in run_ranges(ranges, run, self._free_memory)]
        done = [r for p in parts for r in p[0]]  # batch rows in the order they ran
        hidden = tuple(_in_batch_order(torch.cat([p[1][j] for p in parts]), done) for j in range(len(layers)))
        mu = self.cfg.vision.merge_unit
        vis = _items_in_batch_order([p[2] for p in parts], done, _tokens_per_row(lay.image_grids, lay.images_per_row, mu))
        vid = _items_in_batch_order([p[3] for p in parts], done, _tokens_per_row(lay.video_grids, lay.videos_per_row, mu))
        ids, real = batch.input_ids, batch.attention_mask.bool()
        return FeatureOutput(hidden_states=hidden, attention_mask=batch.attention_mask,
                             image_mask=(ids == self.cfg.image_token_id) & real, vision_embeds=vis, layers=layers,
                             video_mask=(ids == self.cfg.video_token_id) & real, video_embeds=vid)

    def feature_step(self, batch_size: int, n_cameras: int, height: int, width: int, *, texts=None,
                     max_text_tokens: int = 32, layers=(-1,), compile: bool = False, cuda_graph: bool | None = None,
                     cameras=None):
        """A fixed-shape feature step for a control loop: ``step(frames, texts=None) -> FeatureOutput``.

        Built once for B samples of N cameras of H x W frames; a warm call reads nothing back from the device.
        The real tokens get ``extract_features(images=frames, texts=texts, layers=layers)``'s hidden states; the
        text is padded to ``max_text_tokens`` so every call returns (B, L, D). ``cameras``: names of the camera
        dict entries in order (default: the first dict's order). ``cuda_graph`` (default: on CUDA): the step is
        replayed as one captured CUDA graph. ``compile=True``: torch.compile(fullgraph=True) of the device part
        (captured too on CUDA). See ``qwen_batched.step``.
        """
        from .step import FeatureStep

        return FeatureStep(self, batch_size, n_cameras, height, width, texts=texts, max_text_tokens=max_text_tokens,
                           layers=layers, compile=compile, cuda_graph=cuda_graph, cameras=cameras)

    @torch.inference_mode()
    def generate(self, inputs: ModelInputs | None = None, /, *, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                 video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, images=None, texts=None, videos=None,
                 fps: float | list[float] | None = None, rescale: bool | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, seed: int | list[int] | None = None,
                 compile: bool = False, max_batch_tokens: int | None = None,
                 share_prefix: bool = SHARE_PREFIX) -> GenerateOutput:
        """Generate for a whole batch: one prefill, then fixed-shape decode steps over a static KV cache.

        Inputs as for ``extract_features``. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
        ``seed``: an int (row b draws from (seed, b)) or one int per row; a row's sampled tokens depend only on its
        seed, never on the other rows of the batch or on ``max_batch_tokens`` splits; None draws a base seed from
        torch's global generator. eos_token_id: None = the checkpoint's EOS ids, an int or a list overrides, []
        never stops. A row stops after its EOS (later slots hold the pad id); the loop ends when all rows have
        stopped. On CUDA the decode step is captured as a CUDA graph and replayed once rows are still running a
        few steps in and enough steps are left to pay for the capture (one process; the graph is kept for the next
        call of the same shape); compile=True runs it through torch.compile instead (fused kernels, CUDA graphs;
        minutes to build). Either falls back to eager, with a warning, if it cannot be built. max_batch_tokens caps
        rows x (longest prompt + max_new_tokens) per sub-batch, as in ``extract_features``. share_prefix as in
        ``extract_features``: shared prefixes are prefilled once, each row's remainder on top, then decoding as
        usual (the same tokens).
        """
        with self._same_call() as box:
            check_generate_args(max_new_tokens, temperature, top_k, top_p, seed, compile)
            check_flag(share_prefix, "share_prefix")
            eos_ids = resolve_eos(eos_token_id, self.cfg)
            budget = check_budget(max_batch_tokens)
            batch = self._door(
                inputs, dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                             video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                             mm_token_type_ids=mm_token_type_ids),
                images, texts, videos, fps, rescale)
            lay = batch.layout
            check_context(max(lay.lengths) + max_new_tokens, self.cfg, "prompt length + max_new_tokens")
            box["batch"] = batch
            box["call"] = repr(("generate", max_new_tokens, float(temperature), top_k, float(top_p), eos_ids, seed,
                                compile, budget, share_prefix))
        seeds = torch.tensor(row_seeds(seed, batch.batch_size), dtype=torch.int64, device=self.device)
        if self.tp is not None and seed is None:  # the drawn base seed may differ by rank: take the first rank's
            seeds = self.tp.from_first(seeds)
        groups = self._prefix_groups(batch) if share_prefix else None
        order = groups.order() if groups is not None else list(range(batch.batch_size))

        def run(s: int, e: int):
            rows, sub, sg = self._sub_batch(batch, groups, order[s:e])
            x = self._embed(sub, sg.image_keys if sg is not None else None)
            prefill = None
            if sg is not None and sg.any:
                def prefill(cache):
                    return run_shared(self.model, x.embeds, x.position_ids, sg, sub.layout.first, sub.layout.lengths,
                                      rope=self.caches.rope(self.device), backend=self.backend, cache=cache)[0]
            row_seed = seeds[rows[0]:rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1)) else \
                seeds[torch.tensor(rows, device=seeds.device)]
            seqs, n_new = generate_tokens(
                self, x.embeds, x.position_ids, x.valid, lengths=list(sub.layout.n_real), starts=sub.layout.run_starts,
                max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                eos_ids=eos_ids, pad_id=self.cfg.pad_token_id, seeds=row_seed, compile=compile,
                sync_every=4 if self.device.type == "cuda" else 1, prefill=prefill)
            return rows, seqs, n_new

        ranges = plan_ranges([lay.lengths[r] for r in order], budget, extra=max_new_tokens)
        parts = [r for _, r in run_ranges(ranges, run, self._free_memory)]
        done = [r for p in parts for r in p[0]]
        seqs = _in_batch_order(torch.cat([p[1] for p in parts]), done)
        lengths = _in_batch_order(torch.cat([p[2] for p in parts]), done)
        tokenizer = getattr(self.processor, "tokenizer", None) if self.processor is not None else None
        texts_out = None
        if tokenizer is not None:
            rows = [s[:n] for s, n in zip(seqs.tolist(), lengths.tolist())]
            texts_out = list(tokenizer.batch_decode(rows, skip_special_tokens=True))
        return GenerateOutput(sequences=seqs, lengths=lengths, texts=texts_out)

    def validate(self, inputs: ModelInputs) -> ModelInputs:
        """Check a batch once and put it on the model's device, with its host-side ``BatchLayout``."""
        if not isinstance(inputs, ModelInputs):
            raise TypeError(f"inputs must be a ModelInputs (model.processor.prepare(...)), got {type(inputs).__name__}")
        return validate_inputs(inputs, self.cfg, self.device)

    @contextlib.contextmanager
    def _same_call(self):
        """Around a call's argument checks and the batch's validation (the body sets ``box["batch"]`` and
        ``box["call"]``, the repr of its arguments resolved, so that equal ones written otherwise agree): under
        tensor parallelism every rank then learns that every rank passed them with the same arguments and batch
        (``TensorParallel.agree``), so that a call failing or differing on one rank is an error on all of them,
        never a wait for a collective that rank will not join. Nothing without tensor parallelism."""
        box: dict = {}
        if self.tp is None:
            yield box
            return
        try:
            yield box
        except Exception as e:  # noqa: BLE001 - whatever stopped this rank, the others must hear of it
            self.tp.agree(None, "", e)  # (a failed rank's arguments are not compared)
        self.tp.agree(box["batch"], box["call"])

    def _door(self, inputs, tensors: dict, images, texts, videos, fps, rescale) -> ModelInputs:
        """Whatever form the batch came in -> one validated ``ModelInputs`` on the model's device."""
        given = [k for k, v in tensors.items() if v is not None]
        media = images is not None or texts is not None or videos is not None
        if inputs is not None:
            if not isinstance(inputs, ModelInputs):
                raise TypeError(f"inputs must be a ModelInputs (model.processor.prepare(...)), got "
                                f"{type(inputs).__name__}; pass tensors by keyword (input_ids=...)")
            if given or media:
                raise ValueError(f"pass either a ModelInputs or {'/'.join(given) or 'images/texts/videos'}=, not both")
        if fps is not None and videos is None:
            raise ValueError("fps= applies to videos= only (frames per second of the given clips); with "
                             "pixel_values_videos= pass second_per_grid_ts= (temporal_patch_size / fps per video)")
        if rescale is not None and not media:
            raise ValueError("rescale= applies to images=/videos= (how the processor reads pixel values); tensors "
                             "given as pixel_values= are already normalized")
        if media:
            if given:
                raise ValueError(f"pass either images=/texts=/videos= or {'/'.join(given)}=, not both")
            if self.processor is None:
                raise ValueError("images=/texts=/videos= need model.processor, which is None for this model; tokenize "
                                 "yourself and pass input_ids= (with pixel_values= and image_grid_thw= for images, "
                                 "pixel_values_videos= and video_grid_thw= for videos)")
            inputs = self.processor.prepare(images, texts, videos=videos, fps=2.0 if fps is None else fps,
                                            chat_template=True, padding_side="left", rescale=rescale,
                                            device=self.device)
        elif inputs is None:
            inputs = ModelInputs(**tensors)
        inputs = validate_inputs(inputs, self.cfg, self.device)
        return inputs

    @staticmethod
    def _sub_batch(batch: ModelInputs, groups: PrefixGroups | None, rows: list[int]):
        """(batch rows in run order, their ModelInputs, their prefix groups or None) for the rows ``rows``."""
        if groups is None:
            return rows, batch.select_rows(rows), None
        local, sub_groups = groups.restrict(rows)
        return local, batch.select_rows(local), sub_groups

    def _encode_vision(self, rows: ModelInputs, keys: Sequence[bytes | None] | None = None,
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Merged features of the images and of the videos of ``rows`` (each (n_tokens, D) or None). Images and
        videos go through the vision tower in one call (``_encode_unique``: with content ``keys`` of the images, or
        the image cache on, each distinct image once)."""
        lay = rows.layout
        if lay.image_grids:
            return self._encode_unique(rows.pixel_values, lay.image_grids, keys, rows.pixel_values_videos,
                                       lay.video_grids)
        if lay.video_grids:
            return None, self._vision(rows.pixel_values_videos, lay.video_grids)
        return None, None

    def _embed(self, rows: ModelInputs, keys: Sequence[bytes | None] | None = None) -> Embedded:
        """Token embeddings with the encoded images and videos scattered in, and 3-D positions."""
        ids, mask = rows.input_ids, rows.attention_mask
        embeds = self.model.embed_tokens(ids)  # (B, L, D)
        vision, video = self._encode_vision(rows, keys)
        real = mask.bool()  # a placeholder id at a pad position is a pad (validation counts the real ones only)
        if vision is not None:
            vision = vision.to(embeds.dtype)  # (n_image_tokens, D)
            embeds = embeds.masked_scatter(((ids == self.cfg.image_token_id) & real)[..., None], vision)
        if video is not None:
            video = video.to(embeds.dtype)  # (n_video_tokens, D)
            embeds = embeds.masked_scatter(((ids == self.cfg.video_token_id) & real)[..., None], video)
        position_ids, _ = rope_index(ids, mask, rows.image_grid_thw, image_token_id=self.cfg.image_token_id,
                                     spatial_merge_size=self.cfg.vision.spatial_merge_size,
                                     video_grid_thw=rows.video_grid_thw, video_token_id=self.cfg.video_token_id,
                                     second_per_grid_ts=rows.second_per_grid_ts,
                                     tokens_per_second=self.cfg.vision.tokens_per_second)
        return Embedded(embeds, position_ids, mask.bool(), vision, video)

    def _free_memory(self) -> None:
        """Called before a sub-batch that ran out of memory is retried as two halves."""
        if self.tp is not None:  # the other ranks are inside this sub-batch's collectives: they cannot follow
            raise RuntimeError("a sub-batch ran out of device memory under tensor parallelism, where a rank cannot "
                               "retry alone; pass a smaller max_batch_tokens")
        self.caches.decode = None  # a kept decode step's KV cache (and CUDA graph pool)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _in_batch_order(x: torch.Tensor, done: list[int]) -> torch.Tensor:
    """x (B, ...) whose i-th entry is batch row done[i] -> batch order."""
    if done == list(range(len(done))):
        return x
    inv = torch.empty(len(done), dtype=torch.long)
    inv[torch.tensor(done)] = torch.arange(len(done))
    return x.index_select(0, inv.to(x.device))


def _tokens_per_row(grids: tuple, per_row: tuple[int, ...], merge_unit: int) -> list[int]:
    starts = [0, *itertools.accumulate(per_row)]
    n = [t * h * w // merge_unit for t, h, w in grids]
    return [sum(n[starts[r]:starts[r + 1]]) for r in range(len(per_row))]


def _items_in_batch_order(parts: list[torch.Tensor | None], done: list[int], per_row: list[int]) -> torch.Tensor | None:
    """Vision tokens of sub-batches (rows in ``done`` order, per_row[r] tokens for batch row r) -> batch order."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    x = torch.cat(parts)
    if done == list(range(len(done))):
        return x
    at = dict(zip(done, itertools.accumulate([0] + [per_row[r] for r in done])))
    idx = np.concatenate([np.arange(at[r], at[r] + per_row[r]) for r in range(len(done))])
    return x.index_select(0, torch.from_numpy(idx).to(x.device))


@dataclass
class Embedded:
    """A batch ready for the decoder."""
    embeds: torch.Tensor  # (B, L, D) token embeddings with the vision features scattered in
    position_ids: torch.Tensor  # (3, B, L) M-RoPE positions
    valid: torch.Tensor  # (B, L) bool, real tokens
    vision_embeds: torch.Tensor | None  # (n_image_tokens, D)
    video_embeds: torch.Tensor | None  # (n_video_tokens, D)
