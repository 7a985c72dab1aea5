"""Batch jobs behind ``python -m qwen_batched answer|extract``: one process or ``torchrun``.

Pipeline (both jobs)
    read inputs -> estimate tokens per item (image sizes from file headers + ``smart_resize``) -> split the
    pending items over the ranks (balanced by estimated tokens) -> group each rank's items into batches of
    similar length (sorted by estimated tokens inside a window) -> decode + preprocess batches in background
    threads while the model runs the previous one -> write results in small shards -> rank 0 merges.

Resumability
    Every shard is written to a temporary name and ``os.replace``-d into place, so a shard file on disk is
    always complete. Results are keyed per item (``question_id``, or the input line when ids are missing or
    repeated); a rerun collects the keys found in existing shards and only processes the rest. A crash loses
    at most the items not yet flushed to a shard; nothing is ever duplicated, because the final file is
    assembled from the shards (the newest shard wins for a key that occurs twice) in input order.

Distributed
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank initialises ``torch.distributed`` (nccl on CUDA, gloo
    otherwise, plus a gloo group for the small control messages), takes its share of the pending items,
    writes its own shards, and after a barrier rank 0 merges everything. Ranks must see the same output
    directory (one machine, or a shared filesystem across nodes).

Answers (``answer``)
    One JSON line per question, LLaVA ``model_vqa`` style::

        {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {...}}   (+ "error" on failure)

Features (``extract``)
    Per input (one image, or several for a ``.jsonl`` list, plus an optional text prompt), the hidden states
    of the requested decoder layers over **all non-pad tokens of that sample** (``--tokens image`` keeps only
    the image-token rows), stored as rows of safetensors shards: ``layer.<L>`` (rows, hidden),
    ``input_ids`` (rows,), ``image_mask`` (rows,) and ``position`` (rows,: index in the unpadded prompt).
    ``index.json`` maps each input, in input order, to ``{shard, offset, length, image_spans, ...}``;
    :func:`load_features` reads one input back.

Modules
    ``cli`` argparse and :func:`main`; ``answer`` / ``extract`` the two jobs, on the shared loop in ``job``;
    ``inputs`` question files, image lists, image decoding; ``estimate`` token estimates from image headers;
    ``schedule`` rank split and length-sorted batches; ``dist`` torchrun ranks, process groups, device;
    ``workers`` background decoding/preprocessing; ``batch_inputs`` slicing and moving prepared batches;
    ``results`` per-item results and model-failure retries; ``io`` atomic writes, shard files, the shard writer,
    the settings check; ``features`` the ``extract`` output (``index.json``, :func:`load_features`);
    ``model`` loading the model; ``progress`` the progress line.
"""
from .answer import AnswerJob, merge_answers, read_answer_shards, run_answer
from .batch_inputs import _slice_inputs  # noqa: F401 (used by tests)
from .cli import build_parser, main
from .dist import Dist, resolve_device
from .estimate import TEMPLATE_TOKENS, TokenEstimator, image_size_from_header
from .extract import ExtractJob, parse_layers, run_extract
from .features import INDEX_FORMAT, load_features, merge_features, read_feature_shards
from .inputs import IMAGE_EXTENSIONS, Item, decode_image, read_image_inputs, read_questions
from .io import (ANSWER_SHARD_RE, FEATURE_SHARD_RE, TMP_PREFIX, ShardWriter, atomic_write_bytes, check_settings,
                 list_shards, new_run_id, remove_stale_tmp)
from .job import Job
from .model import is_preset, load_model, model_id_of
from .progress import Progress
from .results import FailureGuard, Result, run_split
from .schedule import Plan, make_plan, plan_batches, split_balanced
from .workers import BatchLoader, LoadedBatch, prefetch

__all__ = [
    "ANSWER_SHARD_RE", "FEATURE_SHARD_RE", "IMAGE_EXTENSIONS", "INDEX_FORMAT", "TEMPLATE_TOKENS", "TMP_PREFIX",
    "AnswerJob", "BatchLoader", "Dist", "ExtractJob", "FailureGuard", "Item", "Job", "LoadedBatch", "Plan",
    "Progress", "Result", "ShardWriter", "TokenEstimator",
    "atomic_write_bytes", "build_parser", "check_settings", "decode_image", "image_size_from_header", "is_preset",
    "list_shards", "load_features", "load_model", "main", "make_plan", "merge_answers", "merge_features",
    "model_id_of", "new_run_id", "parse_layers", "plan_batches", "prefetch", "read_answer_shards",
    "read_feature_shards", "read_image_inputs", "read_questions", "remove_stale_tmp", "resolve_device",
    "run_answer", "run_extract", "run_split", "split_balanced",
]
