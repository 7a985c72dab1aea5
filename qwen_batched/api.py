"""``QwenBatchedVL``: the public model object (loading, image and video encoding, features, generation)."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import resolve_backend
from .batching import plan_ranges, run_ranges
from .caches import ModelCaches
from .config import ModelConfig, load_generation_eos
from .generation import generate_tokens
from .inputs import ModelInputs
from .outputs import FeatureOutput, GenerateOutput
from .rope import rope_index
from .text import TextModel, run_batch
from .tp import setup as setup_tp
from .validation import (check_budget, check_context, check_dtype, check_generate_args, checked_vision_inputs,
                         resolve_eos, resolve_layers, row_seeds, validate_inputs)
from .vision import VisionTransformer


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

        path = resolve_checkpoint(path, revision=revision, cache_dir=cache_dir)
        cfg = ModelConfig.from_json(path)
        eos = load_generation_eos(path)
        if eos:
            import dataclasses
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + eos)))
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
        others are converted to ``dtype`` (copies). transformers 5 builds a model from the published config with
        the text model in bf16 and the vision tower in fp32: such a mixed model is a ValueError without ``dtype=``,
        never silently upcast.
        """
        from .loading import convert_state_dict

        if not hasattr(hf_model, "named_parameters") or not hasattr(hf_model, "config"):
            raise TypeError(f"hf_model must be a transformers Qwen2_5_VLForConditionalGeneration, got {type(hf_model).__name__}")
        dtype = check_dtype(dtype)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        cfg = ModelConfig.from_dict(hf_model.config.to_dict())
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
        self.backend = resolve_backend(self.attn_backend, self.device, self.dtype)
        self.processor = load_processor(processor_path, self.cfg)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def _apply(self, fn, recurse=True):
        """After ``.to()`` / ``.half()`` ...: re-resolve the attention backend and drop device-bound caches."""
        out = super()._apply(fn, recurse)
        if self.model.embed_tokens.weight.device.type != "meta":
            self.backend = resolve_backend(self.attn_backend, self.device, self.dtype)
            self.caches.clear()
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
        return self._encode_cached(pixel_values, grids)

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

    def _encode_cached(self, pixel_values: torch.Tensor, grids: tuple) -> torch.Tensor:
        """encode_images through the cache: hits are looked up, misses encoded together in one call."""
        cache, mu = self.image_cache, self.cfg.vision.merge_unit
        keys = cache.keys(pixel_values, grids)
        rows = [t * h * w for t, h, w in grids]
        starts = [0, *itertools.accumulate(rows)]
        out = [cache.get(k) for k in keys]
        todo: dict[bytes, int] = {}  # missing key -> first image carrying it (in-batch duplicates once)
        for i, (k, hit) in enumerate(zip(keys, out)):
            if hit is None:
                todo.setdefault(k, i)
        cache.hits += len(keys) - sum(hit is None for hit in out)
        cache.misses += len(todo)
        if todo:
            first = list(todo.values())
            sel = torch.cat([torch.arange(starts[i], starts[i] + rows[i]) for i in first]).to(pixel_values.device)
            enc = self._vision(pixel_values.index_select(0, sel), tuple(grids[i] for i in first))
            fresh = dict(zip(todo, enc.split([rows[i] // mu for i in first])))
            for k, v in fresh.items():
                cache.put(k, v)
            out = [fresh[k] if hit is None else hit for k, hit in zip(keys, out)]
        return torch.cat(out)

    # ------------------------------------------------------------------ decoder: features and generation
    @torch.inference_mode()
    def extract_features(self, inputs: ModelInputs | None = None, /, *, input_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                         video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                         images=None, texts=None, videos=None, fps: float | list[float] | None = None,
                         rescale: bool | None = None, layers=None, final_norm: bool = True,
                         max_batch_tokens: int | None = None) -> FeatureOutput:
        """Decoder hidden states of a batch, in the reference's ``output_hidden_states`` convention.

        The batch: a ``ModelInputs`` (``model.processor.prepare(...)``), or its tensors as keywords (input_ids /
        attention_mask (B, L), any padding side; pixel_values + image_grid_thw; pixel_values_videos +
        video_grid_thw + second_per_grid_ts (None: 1 s, as the reference)), or ``images=`` / ``texts=`` /
        ``videos=`` (with ``fps=``, default 2.0, and ``rescale=``: see ``processor.preprocess_images``), which go
        through ``model.processor.prepare``.
        layers: indices to return (default all): 0 = embeddings, i = output of layer i, num_layers = after the
        final norm (before it when ``final_norm=False``); negative indices count from the end. Layers past the
        deepest requested one are not run.
        max_batch_tokens: cap on rows x longest row per forward; a larger batch runs as sub-batches (results in
        the original order, identical to one pass). A sub-batch that runs out of device memory is halved and retried.
        """
        layers = resolve_layers(layers, self.cfg.text.num_hidden_layers)
        if not isinstance(final_norm, bool):
            raise TypeError(f"final_norm must be a bool, got {type(final_norm).__name__}")
        budget = check_budget(max_batch_tokens)
        batch = self._door(inputs, dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                        image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                        video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts),
                           images, texts, videos, fps, rescale)
        lay, L = batch.layout, batch.input_ids.shape[1]

        def run(s: int, e: int):
            sub = batch.select_rows(range(s, e))
            lo, hi = lay.span(range(s, e))
            x = self._embed(sub)
            _, states = run_batch(self.model, x.embeds, x.position_ids, x.valid, rope=self.caches.rope(self.device),
                                  backend=self.backend, lengths=list(sub.layout.n_real), depth=max(layers),
                                  keep=layers, final_norm=final_norm)
            states = [F.pad(states[i], (0, 0, lo, L - hi)) for i in layers]
            return states, x.vision_embeds, x.video_embeds

        parts = [r for _, r in run_ranges(plan_ranges(lay.lengths, budget), run, self._free_memory)]
        hidden = tuple(torch.cat([p[0][j] for p in parts]) for j in range(len(layers)))
        vis = [p[1] for p in parts if p[1] is not None]
        vid = [p[2] for p in parts if p[2] is not None]
        ids = batch.input_ids
        return FeatureOutput(hidden_states=hidden, attention_mask=batch.attention_mask,
                             image_mask=ids == self.cfg.image_token_id, vision_embeds=torch.cat(vis) if vis else None,
                             layers=layers, video_mask=ids == self.cfg.video_token_id,
                             video_embeds=torch.cat(vid) if vid else None)

    def feature_step(self, batch_size: int, n_cameras: int, height: int, width: int, *, texts=None,
                     max_text_tokens: int = 32, layers=(-1,), compile: bool = False, cuda_graph: bool | None = None,
                     cameras=None):
        """A fixed-shape feature step for a control loop: ``step(frames, texts=None) -> FeatureOutput``.

        Built once for B samples of N cameras of H x W frames; a warm call reads nothing back from the device.
        The real tokens get ``extract_features(images=frames, texts=texts, layers=layers)``'s hidden states; the
        text is padded to ``max_text_tokens`` so every call returns (B, L, D). ``cameras``: names of the camera
        dict entries in order (default: the first dict's order). ``compile=True``: torch.compile(fullgraph=True)
        of the device part, captured as one CUDA graph on a GPU; ``cuda_graph=True`` captures the eager step (CUDA;
        default: with ``compile``). See ``qwen_batched.step``.
        """
        from .step import FeatureStep

        return FeatureStep(self, batch_size, n_cameras, height, width, texts=texts, max_text_tokens=max_text_tokens,
                           layers=layers, compile=compile, cuda_graph=cuda_graph, cameras=cameras)

    @torch.inference_mode()
    def generate(self, inputs: ModelInputs | None = None, /, *, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                 video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                 images=None, texts=None, videos=None, fps: float | list[float] | None = None,
                 rescale: bool | None = None, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None, seed: int | list[int] | None = None,
                 compile: bool = False, max_batch_tokens: int | None = None) -> GenerateOutput:
        """Generate for a whole batch: one prefill, then fixed-shape decode steps over a static KV cache.

        Inputs as for ``extract_features``. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
        ``seed``: an int (row b draws from (seed, b)) or one int per row; a row's sampled tokens depend only on its
        seed, never on the other rows of the batch or on ``max_batch_tokens`` splits; None draws a base seed from
        torch's global generator. eos_token_id: None = the checkpoint's EOS ids, an int or a list overrides, []
        never stops. A row stops after its EOS (later slots hold the pad id); the loop ends when all rows have
        stopped. compile=True runs the decode step through torch.compile (CUDA graphs on GPU; falls back to eager
        if compilation fails). max_batch_tokens caps rows x (longest prompt + max_new_tokens) per sub-batch, as in
        ``extract_features``.
        """
        check_generate_args(max_new_tokens, temperature, top_k, top_p, seed, compile)
        eos_ids = resolve_eos(eos_token_id, self.cfg)
        budget = check_budget(max_batch_tokens)
        batch = self._door(inputs, dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                        image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                        video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts),
                           images, texts, videos, fps, rescale)
        lay = batch.layout
        check_context(max(lay.lengths) + max_new_tokens, self.cfg, "prompt length + max_new_tokens")
        seeds = torch.tensor(row_seeds(seed, batch.batch_size), dtype=torch.int64, device=self.device)
        if self.tp is not None and seed is None:  # the drawn base seed may differ by rank: take the first rank's
            seeds = self.tp.from_first(seeds)

        def run(s: int, e: int):
            sub = batch.select_rows(range(s, e))
            x = self._embed(sub)
            return generate_tokens(
                self, x.embeds, x.position_ids, x.valid, lengths=list(sub.layout.n_real),
                max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                eos_ids=eos_ids, pad_id=self.cfg.pad_token_id, seeds=seeds[s:e], compile=compile,
                sync_every=4 if self.device.type == "cuda" else 1)

        ranges = plan_ranges(lay.lengths, budget, extra=max_new_tokens)
        parts = [r for _, r in run_ranges(ranges, run, self._free_memory)]
        seqs = torch.cat([p[0] for p in parts])
        lengths = torch.cat([p[1] for p in parts])
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
        if self.tp is not None:
            self.tp.check_same_inputs(inputs.input_ids, 0 if inputs.pixel_values is None else inputs.pixel_values.shape[0])
        return inputs

    def _encode_vision(self, rows: ModelInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Merged features of the images and of the videos of ``rows`` (each (n_tokens, D) or None). Images and
        videos go through the vision tower in one call (with the image cache on, images go through the cache)."""
        lay = rows.layout
        grids, vgrids = lay.image_grids, lay.video_grids
        if not vgrids:
            if not grids:
                return None, None
            if self.image_cache is not None:
                return self._encode_cached(rows.pixel_values, grids), None
            return self._vision(rows.pixel_values, grids), None
        if not grids:
            return None, self._vision(rows.pixel_values_videos, vgrids)
        if self.image_cache is not None:
            return self._encode_cached(rows.pixel_values, grids), self._vision(rows.pixel_values_videos, vgrids)
        pv = torch.cat([rows.pixel_values, rows.pixel_values_videos.to(rows.pixel_values.dtype)])
        both = self._vision(pv, grids + vgrids)
        n_img = rows.pixel_values.shape[0] // self.cfg.vision.merge_unit
        return both[:n_img], both[n_img:]

    def _embed(self, rows: ModelInputs) -> Embedded:
        """Token embeddings with the encoded images and videos scattered in, and 3-D positions."""
        ids, mask = rows.input_ids, rows.attention_mask
        embeds = self.model.embed_tokens(ids)  # (B, L, D)
        vision, video = self._encode_vision(rows)
        if vision is not None:
            vision = vision.to(embeds.dtype)  # (n_image_tokens, D)
            embeds = embeds.masked_scatter((ids == self.cfg.image_token_id)[..., None], vision)
        if video is not None:
            video = video.to(embeds.dtype)  # (n_video_tokens, D)
            embeds = embeds.masked_scatter((ids == self.cfg.video_token_id)[..., None], video)
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
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class Embedded:
    """A batch ready for the decoder."""
    embeds: torch.Tensor  # (B, L, D) token embeddings with the vision features scattered in
    position_ids: torch.Tensor  # (3, B, L) M-RoPE positions
    valid: torch.Tensor  # (B, L) bool, real tokens
    vision_embeds: torch.Tensor | None  # (n_image_tokens, D)
    video_embeds: torch.Tensor | None  # (n_video_tokens, D)
