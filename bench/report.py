"""Merge the benchmark JSON files of one run into bench/results/<device>-<date>.{json,md,png}.

Each input is ``{"meta": {...}, "rows": [{...}, ...]}`` (plus ``"scaling"`` rows from bench_vit.py). The
Markdown report has one table per benchmark with every column it measured; the PNG plots the vision tower's
speedup over the batched reference against image count and image size.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import fmt_mem, markdown_table  # noqa: E402

TITLES = {"processor": "Processor (images -> model inputs)", "vit": "Vision tower",
          "decoder": "Decoder: features and generation", "cache": "Per-image embedding cache (extract_features)",
          "parts": "Parts of the run (exit code 0 = passed; 124 = stopped by its time limit)",
          "step": "Real-time feature step",
          "profile": "Device-time profile (kernels per call, time per kernel class)",
          "prefix": "Shared prefixes: N images x k questions (generate, share_prefix on / off / transformers per sample)"}


def _readable(rows: list[dict]) -> list[dict]:
    """Byte counts under *mem* keys as MiB; dtype names without the ``torch.`` prefix."""
    out = []
    for r in rows:
        r = dict(r)
        for k, v in r.items():
            if "mem" in k and isinstance(v, int):
                r[k] = fmt_mem(v)
            elif isinstance(v, str) and v.startswith("torch."):
                r[k] = v[len("torch."):]
        out.append(r)
    return out


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (list, dict)):
                cols.append(k)
    return [(c, c.replace("_", " ")) for c in cols]


def _slug(device: str) -> str:
    return "cpu" if device.lower().startswith("cpu") else device.lower().replace("nvidia ", "").replace(" ", "-")


def plot(scaling: dict[str, list[dict]], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in scaling.items():
        imgs = [r for r in rows if r["sweep"] == "images"]
        size = [r for r in rows if r["sweep"] == "size"]
        axes[0].plot([r["n"] for r in imgs], [r["speedup"] for r in imgs], "o-", label=name)
        axes[1].plot([r["px"] for r in size], [r["speedup"] for r in size], "o-", label=name)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("images per batch (224x224)")
    axes[1].set_xlabel("image side, px (8 images)")
    for ax in axes:
        ax.set_ylabel("speedup vs transformers batched")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Vision tower: qwen_batched vs transformers (same inputs, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", required=True, help="directory of the run's JSON files (or a merged report JSON)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--command", default="bash bench/test_speed.sh", help="the command that produced the run")
    ap.add_argument("--prefix", default="", help="file name prefix, e.g. 'quick-' for bench/run_gpu.sh quick")
    args = ap.parse_args(argv)
    parts = {}
    if os.path.isfile(args.inputs):  # re-render a merged report
        with open(args.inputs) as fh:
            parts = json.load(fh)["benchmarks"]
    unreadable = []
    for f in sorted(glob.glob(os.path.join(args.inputs, "*.json"))):
        try:
            with open(f) as fh:
                parts[os.path.splitext(os.path.basename(f))[0]] = json.load(fh)
        except (OSError, ValueError) as e:  # one broken part must not cost the report of the others
            unreadable.append(f"{os.path.basename(f)} ({type(e).__name__})")
    if not parts:
        raise SystemExit(f"no benchmark JSON files in {args.inputs}")
    meta = next(iter(parts.values())).get("meta", {})
    device, date, commit = meta.get("device", args.device), meta.get("date", "?"), meta.get("commit", "?")
    lines = [f"# Speed report: {device}, {date}, commit {commit}", "", f"Command: `{args.command}`", ""]
    if device.lower().startswith("cpu"):
        lines += ["CPU figures: small real-geometry configs, float32; they show per-call overhead and batching, "
                  "not GPU throughput.", ""]
    lines += ["Medians after warm-up (CUDA-synchronised on GPU; repetitions per part as its command or meta says); "
              "baselines measured in the same run on the same inputs.", ""]
    if unreadable:
        lines += [f"Unreadable part results, left out: {', '.join(unreadable)}.", ""]
    scaling = {}
    for name, data in parts.items():
        m = data.get("meta", {})
        kind = name.split("-")[0]
        cfg = m.get("config", "")
        dtype = str(m.get("dtype", "")).replace("torch.", "")
        what = ", ".join(x for x in (cfg, dtype) if x)
        lines += [f"## {TITLES.get(kind, kind)}" + (f" ({what})" if what else ""), ""]
        rows = _readable(data.get("rows", []))
        if rows:
            lines += [markdown_table(rows, _columns(rows)), ""]
        for target, top in (data.get("top") or {}).items():
            lines += [f"### Top kernels: {target}", "", markdown_table(top, _columns(top)), ""]
        if data.get("scaling"):
            scaling[f"{cfg} {m.get('dtype', '')}".strip()] = data["scaling"]
            lines += ["### Scaling (images/s)", "", markdown_table(data["scaling"], _columns(data["scaling"])), ""]
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{args.prefix}{_slug(device)}-{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": {"device": device, "date": date, "commit": commit, "command": args.command},
                   "benchmarks": parts}, f, indent=2)
    if scaling and plot(scaling, base + ".png"):
        lines += [f"![vision speedup]({os.path.basename(base)}.png)", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {base}.json, {base}.md" + (", .png" if scaling else ""))


if __name__ == "__main__":
    main()
