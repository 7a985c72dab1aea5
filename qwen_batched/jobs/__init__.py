"""Batch jobs behind ``python -m qwen_batched answer|extract``: one process or ``torchrun``.

Pipeline (both jobs)
    read inputs (a bad line becomes an error result, never a guess) -> estimate tokens per item (image sizes from
    file headers) -> split the pending items over the ranks by estimated tokens -> batches of similar length ->
    decode + preprocess batches in background threads while the model runs the previous one -> write results in
    small atomically replaced shards -> rank 0 merges them in input order.

Resume
    Each result carries its item's key (its id, or its content and occurrence when it has none) and a digest of
    what the model sees (prompt, image paths, image files' size + mtime). A rerun redoes every item that is new,
    changed or failed, and keeps the rest. The output records the model's fingerprint and every setting that
    changes results; a run with another model or setting refuses to mix (``--overwrite`` discards). Sampling
    seeds are per item (from ``--seed`` and the key), so answers do not depend on batching, ranks or resumes.

Modules
    ``cli`` argparse and :func:`main`; ``run`` the shared loop (model identity, torchrun, plan, batch
    preparation, failure isolation, merge); ``answer`` and ``extract`` the two jobs (``extract`` also
    :func:`load_features`); ``io`` input lines, images, atomic shards, the output manifest, progress.
"""
from .answer import run_answer
from .cli import main
from .extract import load_features, run_extract

__all__ = ["main", "run_answer", "run_extract", "load_features"]
