"""Command line of ``python -m qwen_batched answer|extract`` (argparse) and its entry point :func:`main`."""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

from ..validation import check_generate_args
from .answer import run_answer
from .extract import run_extract


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help (where there is one to show), examples kept as written."""

    def _get_help_string(self, action):
        if any(action.default is x for x in (None, False, "", argparse.SUPPRESS)) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _keys(spec: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in spec.split(",") if k.strip())


def _common_args(p: argparse.ArgumentParser, shard_size: int) -> None:
    p.add_argument("--model", "--model-path", dest="model", required=True,
                   help="checkpoint directory, hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct: the hub cache first, "
                        "downloaded unless HF_HUB_OFFLINE=1), or a preset name ('tiny', '3b', ...) for RANDOM weights")
    p.add_argument("--revision", default=None, help="hub id revision: branch, tag or commit (default: main)")
    p.add_argument("--cache-dir", default=None, help="hub cache directory (default: HF_HUB_CACHE)")
    p.add_argument("--image-folder", default=None, help="base directory of relative image paths")
    p.add_argument("--extra-keys", type=_keys, default="category",
                   help="comma-separated keys an input line may carry besides the documented ones (ignored); any "
                        "other key makes the line an error")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's on CUDA, float32 on CPU")
    p.add_argument("--conv-mode", default="chat", choices=["chat", "raw"],
                   help="chat: the model's chat template; raw: the text as is, images in front")
    p.add_argument("--min-pixels", type=int, default=None, help="resize bound per image (default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, default=None, help="resize bound per image (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8, help="most items per batch")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="cap on batch size x longest sequence, generated tokens included (batches are planned "
                        "from estimates; the model splits a batch that is over it)")
    p.add_argument("--sort-window", type=int, default=1024, help="items sorted by length within windows of this")
    p.add_argument("--shard-size", type=int, default=shard_size, help="items per shard file (resume granularity)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads decoding/preprocessing upcoming batches (0: inline)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="batches prepared ahead, each held in (pinned) memory (default: workers + 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the results already in the output (needed after changing the model or a setting)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--progress-all-ranks", action="store_true", help="a progress line from every rank")
    p.add_argument("--max-model-failures", type=int, default=8,
                   help="stop after this many items in a row fail inside the model (they are retried next run)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--dist-timeout", type=float, default=6 * 3600, help="torch.distributed timeout (s)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="ranks per model (tensor parallelism, for models larger than one GPU): under torchrun the "
                        "world is replicas x tp-size; each replica takes a share of the items, its first rank writes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_batched", formatter_class=_Formatter,
        description="Batched Qwen2.5-VL jobs (single process or torchrun).",
        epilog="""examples:
  python -m qwen_batched answer --model Qwen/Qwen2.5-VL-7B-Instruct --questions q.jsonl \\
      --image-folder images/ --answers answers.jsonl --batch-size 32
  torchrun --nproc-per-node=8 -m qwen_batched answer --model Qwen/Qwen2.5-VL-7B-Instruct ...   (same flags)
  python -m qwen_batched extract --model /ckpt/Qwen2.5-VL-3B-Instruct --images images/ --out feats/ \\
      --layers -1,12 --text "Describe the image."
  python -m qwen_batched answer --model tiny ...   (random weights: for trying the pipeline out)

Rerunning the same command resumes: finished items are kept; new, changed and failed items are (re)done; the
output is rebuilt. Results of another model or other settings are never mixed in (--overwrite discards them).""")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("answer", formatter_class=_Formatter,
                       help="answer a question file (LLaVA model_vqa-style answers jsonl)")
    a.add_argument("--questions", "--question-file", dest="questions", required=True,
                   help='jsonl: {"question_id", "image": path or list, "text"}')
    a.add_argument("--answers", "--answers-file", dest="answers", required=True, help="output jsonl")
    a.add_argument("--shard-dir", default=None, help="where shards go (default: ANSWERS.parts)")
    a.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=128,
                   help="most tokens generated per answer")
    a.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    a.add_argument("--top-k", type=int, default=0, help="0: off")
    a.add_argument("--top-p", type=float, default=1.0, help="1: off")
    a.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each question samples from its own seed derived from this and its id (or "
                        "content), so its answer does not depend on batch size, ranks or resumes")
    a.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="questions about the same images go to the same batches (and rank); each image is encoded "
                        "once and each shared prompt prefix prefilled once per batch (the answers are the same)")
    a.add_argument("--image-cache-mb", type=int, default=1024,
                   help="with --share-prefix: MiB of image embeddings kept for the questions in later batches")
    _common_args(a, shard_size=64)
    a.set_defaults(func=run_answer)

    e = sub.add_parser("extract", formatter_class=_Formatter,
                       help="write hidden states of chosen layers as safetensors shards + index.json")
    e.add_argument("--images", required=True, help='a directory, a .txt list of paths, or a .jsonl of '
                                                   '{"id", "image": path or list, "text"}')
    e.add_argument("--out", required=True, help="output directory (shards and index.json)")
    e.add_argument("--layers", default="-1", help="comma-separated decoder layers, e.g. -1,12")
    e.add_argument("--text", default="", help="prompt text of inputs that have none")
    e.add_argument("--tokens", default="all", choices=["all", "image"],
                   help="rows stored per input: all non-pad tokens, or only image tokens")
    e.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the stored hidden states (auto: the model's)")
    e.add_argument("--save-vision", action="store_true", help="also store the vision tower's image embeddings")
    e.add_argument("--no-final-norm", action="store_true", help="last layer without the final RMSNorm")
    _common_args(e, shard_size=32)
    e.set_defaults(func=run_extract)
    return parser


def _join_layers(argv: list) -> list:
    """``--layers -1,12`` -> ``--layers=-1,12`` (argparse would take "-1,12" for an option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--layers" and i + 1 < len(argv) and re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", str(argv[i + 1])):
            out.append(f"--layers={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None, model=None) -> int:
    """CLI entry point; ``model`` (optional) is used instead of loading ``--model`` (in-process callers)."""
    args = build_parser().parse_args(_join_layers(list(sys.argv[1:] if argv is None else argv)))
    if args.prefetch is None:
        args.prefetch = max(2, args.workers + 1)
    if getattr(args, "image_cache_mb", 0) < 0:
        raise SystemExit(f"error: --image-cache-mb must be >= 0, got {args.image_cache_mb}")
    for name, least in (("batch_size", 1), ("shard_size", 1), ("min_pixels", 1), ("max_pixels", 1),
                        ("max_batch_tokens", 1), ("sort_window", 1), ("prefetch", 0), ("max_model_failures", 1),
                        ("workers", 0), ("limit", 0)):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= {least}, got {value}")
    if args.command == "answer":  # before anything is read or loaded (else every item would fail in the model)
        try:
            check_generate_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, None, False)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"error: --{str(e).split(' ')[0].replace('_', '-')}: {e}") from None
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        raise SystemExit(f"error: --min-pixels {args.min_pixels} > --max-pixels {args.max_pixels}")
    src = args.questions if args.command == "answer" else args.images
    if not os.path.exists(src):
        raise SystemExit(f"error: {src} does not exist")
    return int(args.func(args, model=model) or 0)
