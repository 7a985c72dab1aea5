"""``python -m qwen_batched answer|extract``: planning, shards and resume, bad items, torchrun, features.

The job machinery is first checked against a small fake model (fast, and it can record what it is given);
the end-to-end tests run the real random-weight tiny model in subprocesses, as a user would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from qwen_batched import jobs
from qwen_batched.jobs import io as jio
from qwen_batched.jobs import run as jrun
from qwen_batched.config import tiny_config
from qwen_batched.inputs import BatchLayout, ModelInputs
from tests.helpers import count_vision_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ================================================================================================ test data
def make_images(folder, sizes, seed=0):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = []
    for i, (w, h) in enumerate(sizes):
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        name = f"img{i:03d}.png"
        Image.fromarray(arr).save(os.path.join(folder, name))
        names.append(name)
    return names


def write_questions(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def dataset(tmp_path, n=12, missing=(), corrupt=(), multi=(), seed=0):
    """n questions over images of varied sizes; some missing, corrupt, or with two images."""
    folder = tmp_path / "images"
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(torch.randint(28, 160, (1,), generator=g)), int(torch.randint(28, 160, (1,), generator=g)))
             for _ in range(n)]
    names = make_images(str(folder), sizes, seed)
    for i in corrupt:
        with open(folder / names[i], "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not really a png")
    rows = []
    for i in range(n):
        img = "does-not-exist.png" if i in missing else names[i]
        if i in multi:
            img = [names[i], names[(i + 1) % n]]
        rows.append({"question_id": f"q{i}", "image": img, "text": f"What is shown in picture {i}?"})
    write_questions(tmp_path / "q.jsonl", rows)
    return str(tmp_path / "q.jsonl"), str(folder)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def strip_ids(rows):
    return [{k: v for k, v in r.items() if k != "answer_id"} for r in rows]


# ================================================================================================ fake model
@dataclasses.dataclass
class GenerateOutput:
    sequences: torch.Tensor
    lengths: torch.Tensor
    texts: list | None


@dataclasses.dataclass
class FeatureOutput:
    hidden_states: tuple
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    vision_embeds: torch.Tensor | None
    layers: tuple


class FakeTokenizer:
    def encode(self, s):
        return list(s.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class FakeProcessor:
    """Byte tokens; each image -> vision_start, (h/28)*(w/28) image tokens, vision_end; left padding."""

    def __init__(self, cfg, log):
        self.cfg, self.tokenizer, self.log = cfg, FakeTokenizer(), log
        self.started = threading.Event()

    def prepare(self, images, texts, chat_template=True, padding_side="left"):
        self.log.append(("prepare", threading.current_thread().name, [t for t in texts]))
        cfg = self.cfg
        rows, grids, pvs = [], [], []
        for imgs, text in zip(images, texts):
            ids = []
            for im in imgs:
                h, w = max(2, im.shape[1] // 28 * 2), max(2, im.shape[2] // 28 * 2)
                grids.append([1, h, w])
                pvs.append(torch.full((h * w, cfg.vision.patch_dim), float(im.float().mean())))
                ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
            rows.append(ids + list(text.encode()))
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), cfg.pad_token_id)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, L - len(r):] = torch.tensor(r)
            mask[b, L - len(r):] = 1
        layout = BatchLayout(first=tuple(L - len(r) for r in rows), last=(L - 1,) * len(rows),
                             n_real=tuple(len(r) for r in rows), image_grids=tuple(map(tuple, grids)), images_per_row=tuple(len(i) for i in images))
        return ModelInputs(ids, mask, None, torch.cat(pvs) if pvs else None, torch.tensor(grids) if grids else None,
                           images_per_sample=layout.images_per_row, layout=layout)


class FakeModel:
    """Answers "<image tokens>-<prompt tokens>[-<seed>]", independent of batching; can crash on cue."""

    def __init__(self, crash_after=None, fail_on=None):
        self.cfg = tiny_config()
        self.log = []
        self.processor = FakeProcessor(self.cfg, self.log)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.batches = []
        self.seeds = []
        self.crash_after, self.fail_on = crash_after, fail_on

    def _check(self, inputs):
        input_ids, attention_mask, pixel_values, image_grid_thw = (
            inputs.input_ids, inputs.attention_mask, inputs.pixel_values, inputs.image_grid_thw)
        n_img = int((input_ids == self.cfg.image_token_id).sum())
        n_feat = 0 if image_grid_thw is None else int(image_grid_thw.prod(-1).sum()) // 4
        assert n_img == n_feat and (pixel_values is None or pixel_values.shape[0] == n_feat * 4)
        if self.crash_after is not None and len(self.batches) >= self.crash_after:
            raise KeyboardInterrupt  # not an Exception: the run dies like a killed process
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()]
            if self.fail_on is not None and self.fail_on.encode() in bytes(int(i) for i in ids if i < 256):
                raise RuntimeError("simulated model failure")
            rows.append(ids)
        self.batches.append(input_ids.shape[0])
        return rows

    def generate(self, inputs, /, *, max_new_tokens=32, eos_token_id=None, seed=None, max_batch_tokens=None, **kw):
        self.log.append(("generate", threading.current_thread().name, inputs.batch_size))
        rows = self._check(inputs)
        assert seed is None or (isinstance(seed, list) and len(seed) == len(rows))
        self.seeds.append(seed)
        seqs, lens, texts = [], [], []
        for b, ids in enumerate(rows):
            s = f"{int((ids == self.cfg.image_token_id).sum())}-{len(ids)}" + ("" if seed is None else f"-{seed[b]}")
            toks = (list(s.encode()) + [eos_token_id[0]])[:max_new_tokens]
            lens.append(len(toks))
            texts.append(bytes(t for t in toks if t < 256).decode())
            seqs.append(toks + [self.cfg.pad_token_id] * (max_new_tokens - len(toks)))
        return GenerateOutput(torch.tensor(seqs), torch.tensor(lens), texts)

    def extract_features(self, inputs, /, *, layers=None, final_norm=True, max_batch_tokens=None):
        self._check(inputs)
        input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
        n = self.cfg.text.num_hidden_layers
        layers = tuple(i % (n + 1) for i in layers)
        base = input_ids.float()[..., None] * torch.arange(1, 5).float()
        hs = tuple((base + L) * attention_mask[..., None] for L in layers)
        return FeatureOutput(hs, attention_mask, input_ids == self.cfg.image_token_id, None, layers)


def run_fake(model, *argv):
    return jobs.main(["answer", "--model", "tiny", "--no-progress", *map(str, argv)], model=model)


# ================================================================================================ planning
def test_split_balanced_is_balanced_deterministic_and_complete():
    g = torch.Generator().manual_seed(0)
    costs = (torch.rand(203, generator=g) ** 3 * 4000 + 50).tolist()
    for world in (1, 2, 3, 8):
        parts = jrun.split_balanced(costs, world)
        assert sorted(i for p in parts for i in p) == list(range(len(costs)))
        assert all(p == sorted(p) for p in parts)
        loads = [sum(costs[i] for i in p) for p in parts]
        assert max(loads) - min(loads) <= max(costs) + 1e-6
        assert parts == jrun.split_balanced(costs, world)
    # by cost, not by count: one huge item is a rank's whole share
    assert jrun.split_balanced([1000, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]


def test_plan_batches_limits_and_padding():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(50, 3000, (300,), generator=g).tolist()
    order = list(range(300))
    batches = jrun.plan_batches(order, tokens, batch_size=8, max_batch_tokens=12000, window=100, extra_tokens=64)
    assert sorted(i for b in batches for i in b) == order
    for b in batches:
        assert len(b) <= 8
        assert len(b) == 1 or len(b) * (max(tokens[i] for i in b) + 64) <= 12000
    for w0 in range(0, 300, 100):  # batches never mix windows
        assert all(all(w0 <= i < w0 + 100 for i in b) or all(not w0 <= i < w0 + 100 for i in b) for b in batches)

    def padding(bs):
        return sum(len(b) * max(tokens[i] for i in b) - sum(tokens[i] for i in b) for b in bs)

    naive = [order[i:i + 8] for i in range(0, 300, 8)]
    sorted_b = jrun.plan_batches(order, tokens, batch_size=8, window=100)
    assert padding(sorted_b) < 0.3 * padding(naive)
    # an item over the budget alone is still scheduled, alone
    assert jrun.plan_batches([0, 1], [10, 10_000], batch_size=4, max_batch_tokens=100) == [[1], [0]]


def test_plan_batches_keeps_units_together():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(50, 3000, (60,), generator=g).tolist()
    order = list(range(60))
    unit = [i % 12 for i in order]  # 12 images, 5 questions each, spread over the input
    batches = jrun.plan_batches(order, tokens, batch_size=5, window=20, unit=unit)
    assert sorted(i for b in batches for i in b) == order
    # each image's questions fill one batch of 5, longest first; in a window (4 units), the longest unit first
    assert len(batches) == 12 and all(len({unit[i] for i in b}) == 1 for b in batches)
    assert all(b == sorted(b, key=lambda i: (-tokens[i], i)) for b in batches)
    for w in range(0, 12, 4):
        heads = [tokens[b[0]] for b in batches[w:w + 4]]
        assert heads == sorted(heads, reverse=True)
    # a batch size that does not divide the units: units stay contiguous, a window ends at a unit's end
    batches = jrun.plan_batches(order, tokens, batch_size=4, window=7, unit=unit)
    flat = [i for b in batches for i in b]
    for u in range(12):
        pos = sorted(flat.index(i) for i in order if unit[i] == u)
        assert pos == list(range(pos[0], pos[0] + 5))
    # identity units: the plan without units
    assert jrun.plan_batches(order, tokens, batch_size=8, window=20, unit=order) == \
        jrun.plan_batches(order, tokens, batch_size=8, window=20)


def test_make_plan_keeps_an_image_set_on_one_rank():
    items = [jio.Item(i, f"id:{i}", "d", i, [f"/img/{i % 5}.png"] if i % 7 else [], f"q{i}") for i in range(40)]
    est = lambda it: (100 + 10 * (it.index % 3), 0)  # noqa: E731

    class TwoRanks:
        world, replicas, enabled = 2, 2, True

        def __init__(self, rank):
            self.rank = self.replica = rank

        def all_gather(self, obj):
            return [obj, {i: est(items[i])[0] for i in range(len(items))}]

    together = lambda it: tuple(it.images) or None  # noqa: E731
    plans = [jrun.make_plan(items, list(range(40)), est, TwoRanks(r), batch_size=4, max_batch_tokens=None,
                            window=64, extra_tokens=8, threads=1, together=together) for r in (0, 1)]
    mine = [set(p[0]) for p in plans]
    assert mine[0] | mine[1] == set(range(40)) and not mine[0] & mine[1]
    for img in range(5):
        on = {r for r in (0, 1) for i in mine[r] if items[i].images == [f"/img/{img}.png"]}
        assert len(on) == 1, f"image {img} on ranks {on}"
    assert abs(len(mine[0]) - len(mine[1])) <= 10  # still balanced by cost
    for r in (0, 1):
        batches = plans[r][1]
        assert sorted(i for b in batches for i in b) == sorted(mine[r])


def test_token_estimate_from_headers(tmp_path):
    make_images(str(tmp_path), [(300, 200)])
    est = jrun.TokenEstimator(None, tiny_config())
    item = jio.Item(0, "k", "", 0, [str(tmp_path / "img000.png")], "hi")
    total, img = est(item)
    assert img == (196 // 28) * (308 // 28) + 2  # (h, w) = (200, 300) -> 196 x 308
    assert total > img
    assert est(jio.Item(0, "k", "", 0, [str(tmp_path / "missing.png")], "hi"))[1] == 0
    est = jrun.TokenEstimator(type("P", (), {"min_pixels": 3136, "max_pixels": 28 * 28 * 4, "factor": 28})())
    assert est(item)[1] == 1 * 2 + 2  # the processor's max_pixels bound applies: 28 x 56


def test_read_questions_keys_and_bad_lines(tmp_path):
    p = tmp_path / "q.jsonl"
    write_questions(p, [{"question_id": 7, "image": "a.png", "text": "<image>\nWhat?"},
                        "{not json", "", {"question_id": 7, "image": ["a.png", "b.png"], "text": "x"},
                        {"question_id": 9, "text": "no image"}, {"question_id": 10, "image": "a.png"},
                        {"question_id": 11, "image": "a.png", "txt": "typo"}, "[1, 2]",
                        {"image": "a.png", "text": "same"}, {"image": "a.png", "text": "same"},
                        {"question_id": 12, "image": "a.png", "text": "ok", "category": "conv"},
                        {"question_id": 1.5, "text": "float id"}, {"question_id": "7", "text": "a string id"}])
    items = jio.read_questions(str(p), "/data", extra_keys=("category",))
    assert [it.index for it in items] == list(range(12))
    assert items[0].text == "What?" and items[0].images == ["/data/a.png"] and items[0].key == "id:7"
    errors = {it.index: it.error for it in items if it.error}
    assert errors[1] == "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    assert errors[2].startswith("line 4: duplicate question_id 7 (first on line 1)")  # the second one is the error
    assert errors[4] == "line 6: no 'text' (the question to ask)"
    assert errors[5].startswith("line 7: unknown key 'txt' (did you mean 'text'?)") and "--extra-keys txt" in errors[5]
    assert errors[6].startswith("line 8: expected a JSON object") and "got a JSON list" in errors[6]
    assert errors[10].startswith("line 12: 'question_id' must be a string or an integer")
    assert set(errors) == {1, 2, 4, 5, 6, 10}
    assert items[3].key == "id:9" and items[3].images == [] and items[9].key == "id:12" and items[11].key == 'id:"7"'
    # without an id: keyed by content and occurrence, never by line number
    assert items[7].key.startswith("content:") and items[7].key.endswith("#0") and items[8].key.endswith("#1")
    assert items[7].digest == items[8].digest
    # the category key is an error unless accepted
    assert "unknown key 'category'" in jio.read_questions(str(p), "/data")[9].error


def test_item_keys_survive_inserted_lines_and_digests_follow_content(tmp_path):
    make_images(str(tmp_path), [(56, 56), (84, 56)])
    p = tmp_path / "q.jsonl"
    rows = [{"image": "img000.png", "text": "a"}, {"question_id": "x", "image": "img001.png", "text": "b"}]
    write_questions(p, rows)
    before = jio.read_questions(str(p), str(tmp_path))
    write_questions(p, [{"image": "img001.png", "text": "new"}] + rows)
    after = jio.read_questions(str(p), str(tmp_path))
    assert [it.key for it in after[1:]] == [it.key for it in before] and after[0].key not in {it.key for it in before}
    assert [it.digest for it in after[1:]] == [it.digest for it in before]
    os.utime(tmp_path / "img001.png", ns=(0, 123))  # the same path, another file: another digest
    assert jio.read_questions(str(p), str(tmp_path))[2].digest != before[1].digest
    assert jio.read_questions(str(p), str(tmp_path / "elsewhere"))[2].digest != before[1].digest


def test_progress_line():
    import io

    s = io.StringIO()
    p = jio.Progress(10, "answer", interval=0.0, stream=s)
    p.update(4)
    p.close()
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("answer: 4/10 [ 40.0%]") and "it/s" in lines[0] and "eta" in lines[0]
    assert lines[-1].startswith("answer: 4/10")


def test_atomic_write_never_leaves_a_partial_shard(tmp_path, monkeypatch):
    target = tmp_path / "answers-run00001-abcdef-r00000-000000.jsonl"
    jio.atomic_write_bytes(str(target), b"old\n")

    def disk_full(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        jio.atomic_write_bytes(str(target), b"new and longer\n")
    assert target.read_bytes() == b"old\n" and os.listdir(tmp_path) == [target.name]


# ============================================================================================ fake-model jobs
def test_answer_format_order_and_bad_items(tmp_path):
    q, folder = dataset(tmp_path, n=14, missing=(3,), corrupt=(6,), multi=(9,))
    with open(q, "a") as f:
        f.write("{broken\n")
    out = tmp_path / "a.jsonl"
    m = FakeModel()
    run_fake(m, "--questions", q, "--image-folder", folder, "--answers", out, "--batch-size", 4, "--shard-size", 3)
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == [f"q{i}" for i in range(14)] + [None]
    for r in rows:
        assert set(r) - {"error"} == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["model_id"] == "tiny" and len(r["answer_id"]) == 22
    errs = {r["question_id"]: r["error"] for r in rows if "error" in r}
    assert set(errs) == {"q3", "q6", None}
    assert errs["q3"].startswith(f"unreadable image {os.path.join(folder, 'does-not-exist.png')}: FileNotFoundError")
    assert errs["q6"].startswith(f"unreadable image {os.path.join(folder, 'img006.png')}: ")
    assert errs[None].startswith("line 15: not valid JSON")
    good = [r for r in rows if "error" not in r]
    for r in good:
        i = int(r["question_id"][1:])
        md = r["metadata"]
        assert r["prompt"] == f"What is shown in picture {i}?"
        assert md["finish_reason"] == "stop" and md["n_images"] == (2 if i == 9 else 1)
        n_img, n_prompt = map(int, r["text"].split("-"))
        assert md["n_prompt_tokens"] == n_prompt and md["n_new_tokens"] == len(r["text"])
        assert len(md["image_sizes"]) == md["n_images"]
    assert len(set(r["answer_id"] for r in rows)) == len(rows)
    assert max(m.batches) <= 4 and sum(m.batches) == len(good)


def test_batches_are_prepared_in_background_while_the_model_runs(tmp_path):
    q, folder = dataset(tmp_path, n=8)
    m = FakeModel()
    seen_while_generating = []
    orig = m.generate

    def slow_generate(inputs, **kw):
        # while the first batch is in the model, a worker thread must prepare the second one
        t_end = time.time() + 5
        while not seen_while_generating and time.time() < t_end and \
                sum(1 for e in m.log if e[0] == "prepare") < 2:
            time.sleep(0.005)
        seen_while_generating.append(sum(1 for e in m.log if e[0] == "prepare"))
        return orig(inputs, **kw)

    m.generate = slow_generate
    run_fake(m, "--questions", q, "--image-folder", folder, "--answers", tmp_path / "a.jsonl", "--batch-size", 2,
             "--workers", 2)
    prepare_threads = {e[1] for e in m.log if e[0] == "prepare"}
    generate_threads = {e[1] for e in m.log if e[0] == "generate"}
    assert generate_threads == {threading.main_thread().name}
    assert prepare_threads and threading.main_thread().name not in prepare_threads
    assert seen_while_generating[0] >= 2  # batch 2 was prepared during batch 1


def test_resume_after_crash_no_duplicates_no_losses(tmp_path):
    q, folder = dataset(tmp_path, n=20, missing=(4,))
    common = ["--questions", q, "--image-folder", folder, "--batch-size", 2, "--shard-size", 3, "--sort-window", 4]
    run_fake(FakeModel(), *common, "--answers", tmp_path / "ref.jsonl")
    out = tmp_path / "a.jsonl"
    crashing = FakeModel(crash_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_fake(crashing, *common, "--answers", out)
    parts = out.parent / (out.name + ".parts")
    shard_lines = [json.loads(line) for fn in os.listdir(parts) if fn.startswith("answers-")
                   for line in open(parts / fn)]
    assert 0 < len(shard_lines) < 20 and not out.exists()
    assert len({d["key"] for d in shard_lines}) == len(shard_lines)
    # a leftover temporary file (a shard write cut short) must be ignored
    (parts / ".tmp-answers-run00001-abcdef-r00000-000009.jsonl.1").write_text('{"key": "id:q0", "answ')
    second = FakeModel()
    run_fake(second, *common, "--answers", out)
    assert sum(second.batches) == 19 - sum(1 for d in shard_lines if "error" not in d["answer"])
    rows = read_jsonl(out)
    assert strip_ids(rows) == strip_ids(read_jsonl(tmp_path / "ref.jsonl"))
    assert len({r["answer_id"] for r in rows}) == 20
    # earlier answers are kept as they were (same answer_id), not recomputed; earlier errors are retried
    first = {d["answer"]["question_id"]: d["answer"]["answer_id"] for d in shard_lines if "error" not in d["answer"]}
    assert all(r["answer_id"] == first[r["question_id"]] for r in rows if r["question_id"] in first)
    # a third run has nothing for the model to do (the missing image fails again before it)
    third = FakeModel(crash_after=0)
    run_fake(third, *common, "--answers", out)
    assert third.batches == [] and strip_ids(read_jsonl(out)) == strip_ids(rows)


def test_settings_change_is_refused_and_overwrite_discards(tmp_path):
    q, folder = dataset(tmp_path, n=4)
    common = ["--questions", q, "--image-folder", folder, "--answers", tmp_path / "a.jsonl"]
    run_fake(FakeModel(), *common)
    with pytest.raises(SystemExit, match="max_new_tokens"):
        run_fake(FakeModel(), *common, "--max-new-tokens", 7)
    m = FakeModel()
    run_fake(m, *common, "--max-new-tokens", 7, "--overwrite")
    assert sum(m.batches) == 4 and all(r["metadata"]["max_new_tokens"] == 7 for r in read_jsonl(tmp_path / "a.jsonl"))
    # answers made on a GPU are not mixed with a CPU run's (its kernels round differently)
    path = tmp_path / "a.jsonl.parts" / "settings.json"
    settings = json.loads(path.read_text())
    assert settings["settings"]["device"] == "cpu"
    settings["settings"]["device"] = "cuda"
    path.write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match="device: 'cuda' -> 'cpu'"):
        run_fake(FakeModel(), *common, "--max-new-tokens", 7)


def test_failed_items_are_retried_and_the_summary_counts_the_files_errors(tmp_path, capsys):
    q, folder = dataset(tmp_path, n=6, missing=(2,))
    common = ["--questions", q, "--image-folder", folder, "--answers", tmp_path / "a.jsonl", "--batch-size", 3]
    # a model failure on one item: that item gets an error line, the rest of its batch still gets answers
    m = FakeModel(fail_on="picture 4")
    run_fake(m, *common)
    rows = {r["question_id"]: r for r in read_jsonl(tmp_path / "a.jsonl")}
    assert rows["q4"]["error"] == "RuntimeError: simulated model failure"
    assert rows["q2"]["error"].startswith(f"unreadable image {os.path.join(folder, 'does-not-exist.png')}: ")
    assert all("error" not in rows[f"q{i}"] for i in (0, 1, 3, 5))
    assert "6 inputs -> " in capsys.readouterr().err
    # the next run retries both failures: the model one succeeds, the missing file still fails, and the summary
    # counts the errors in the file, not only this run's
    m = FakeModel()
    run_fake(m, *common)
    rows = {r["question_id"]: r for r in read_jsonl(tmp_path / "a.jsonl")}
    assert m.batches == [1] and "error" not in rows["q4"] and "error" in rows["q2"]
    assert "; 1 with an error in it (1 failed in this run" in capsys.readouterr().err
    # once the file is there, a plain rerun answers it, and nothing else is redone
    before = rows
    os.replace(os.path.join(folder, "img000.png"), os.path.join(folder, "does-not-exist.png"))
    m = FakeModel()
    run_fake(m, *common)
    rows = {r["question_id"]: r for r in read_jsonl(tmp_path / "a.jsonl")}
    assert m.batches == [1] and "error" not in rows["q2"]
    assert all(rows[k] == before[k] for k in before if k not in ("q0", "q2"))  # finished answers are kept
    # q0's image moved away: q0 is computed again (and fails), its old answer is not kept
    assert rows["q0"]["error"].startswith("unreadable image")
    assert "; 1 with an error in it (1 failed in this run" in capsys.readouterr().err


def test_changed_questions_and_images_are_recomputed(tmp_path):
    q, folder = dataset(tmp_path, n=6)
    common = ["--questions", q, "--image-folder", folder, "--answers", tmp_path / "a.jsonl", "--batch-size", 4]
    run_fake(FakeModel(), *common)
    first = {r["question_id"]: r for r in read_jsonl(tmp_path / "a.jsonl")}
    lines = read_jsonl(q)
    lines[3]["text"] = "A longer question about picture 3, edited?"  # same question_id, new text
    lines.insert(0, {"image": lines[5]["image"], "text": "no id"})   # a new line without id, at the top
    write_questions(q, lines)
    make_images(str(tmp_path / "other"), [(84, 84)], seed=5)
    os.replace(tmp_path / "other" / "img000.png", os.path.join(folder, lines[2]["image"]))  # q1's file replaced
    m = FakeModel()
    run_fake(m, *common)
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert sum(m.batches) == 3 and [r["question_id"] for r in rows] == [None] + [f"q{i}" for i in range(6)]
    by_id = {r["question_id"]: r for r in rows}
    assert by_id["q3"]["prompt"] == lines[4]["text"] and by_id["q3"]["answer_id"] != first["q3"]["answer_id"]
    assert by_id["q1"]["metadata"]["image_sizes"] == [[84, 84]]
    assert all(by_id[k] == first[k] for k in ("q0", "q2", "q4", "q5"))


def test_another_model_in_the_same_folder_is_refused(tmp_path):
    from safetensors.torch import save_file

    q, folder = dataset(tmp_path, n=3)
    ckpt = tmp_path / "Qwen2.5-VL-7B-Instruct"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(300, generator=g)}
    save_file(weights, str(ckpt / "model.safetensors"))
    argv = ["answer", "--model", str(ckpt), "--questions", q, "--image-folder", folder, "--answers",
            str(tmp_path / "a.jsonl"), "--no-progress"]
    jobs.main(argv, model=FakeModel())
    # a fine-tune: same names, shapes and file size, other values, in a folder of the same name
    save_file({"a": weights["a"].clone().mul_(1.01), "b": weights["b"]}, str(ckpt / "model.safetensors"))
    with pytest.raises(SystemExit) as e:
        jobs.main(argv, model=FakeModel())
    msg = str(e.value)
    assert "another model or other settings" in msg and "model.safetensors differs" in msg
    assert "--overwrite" in msg and "--answers NEW.jsonl" in msg
    with pytest.raises(SystemExit, match=r"model.safetensors differs(.|\n)*temperature: 0\.0 -> 0\.5"):
        jobs.main([*argv, "--temperature", "0.5"], model=FakeModel())
    m = FakeModel()
    jobs.main([*argv, "--overwrite"], model=m)
    assert sum(m.batches) == 3 and len(read_jsonl(tmp_path / "a.jsonl")) == 3
    jobs.main(argv, model=FakeModel(crash_after=0))  # the same model again: nothing to do


def test_sampling_seeds_are_per_item(tmp_path):
    q, folder = dataset(tmp_path, n=7)
    lines = read_jsonl(q) + [{"image": read_jsonl(q)[0]["image"], "text": "no id"}]
    write_questions(q, lines)
    answers = {}
    for bs in (1, 3, 8):
        m = FakeModel()
        out = tmp_path / f"a{bs}.jsonl"
        run_fake(m, "--questions", q, "--image-folder", folder, "--answers", out, "--batch-size", bs,
                 "--temperature", 0.7, "--seed", 5, "--max-new-tokens", 64)
        assert max(m.batches) == bs
        answers[bs] = [(r["text"], r["metadata"]["seed"]) for r in read_jsonl(out)]
    assert answers[1] == answers[3] == answers[8]
    seeds = [s for _, s in answers[1]]
    assert len(set(seeds)) == 8 and all(0 <= s < 2 ** 63 for s in seeds)
    from qwen_batched.jobs.answer import item_seed
    assert seeds[0] == item_seed(5, "id:" + json.dumps("q0")) and item_seed(6, "id:0") != item_seed(5, "id:0")


def test_systematic_model_failure_stops_the_run(tmp_path):
    q, folder = dataset(tmp_path, n=10)
    m = FakeModel(fail_on="picture")
    with pytest.raises(RuntimeError, match="failed on 3 items in a row"):
        run_fake(m, "--questions", q, "--image-folder", folder, "--answers", tmp_path / "a.jsonl",
                 "--max-model-failures", 3, "--shard-size", 1)
    assert not (tmp_path / "a.jsonl").exists()


def test_extract_with_fake_model_index_and_rows(tmp_path):
    folder = tmp_path / "imgs"
    make_images(str(folder), [(56, 56), (84, 112), (140, 56)])
    (folder / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "feats"
    m = FakeModel()
    jobs.main(["extract", "--model", "tiny", "--images", str(folder), "--out", str(out), "--layers", "-1,2",
               "--text", "hi", "--shard-size", "2", "--batch-size", "2", "--no-progress"], model=m)
    index = json.load(open(out / "index.json"))
    assert [e["id"] for e in index["items"]] == ["broken.jpg", "img000.png", "img001.png", "img002.png"]
    assert index["layers"] == [4, 2] and "error" in index["items"][0]
    for i, e in enumerate(index["items"][1:], start=1):
        t = jobs.load_features(str(out), i)
        ids = t["input_ids"].long()
        assert e["length"] == len(ids) == e["n_prompt_tokens"]
        assert torch.equal(t["layer.2"], ids.float()[:, None] * torch.arange(1, 5) + 2)
        assert torch.equal(t["image_mask"], ids == m.cfg.image_token_id)
        assert e["n_image_tokens"] == int(t["image_mask"].sum()) and e["image_spans"] == [[1, 1 + e["n_image_tokens"]]]
        assert torch.equal(t["position"], torch.arange(len(ids), dtype=torch.int32))
    assert sorted(os.listdir(out)) == sorted(index["shards"] + ["index.json", "settings.json"])
    # a rerun has nothing to do; other layers into the same output are refused
    m2 = FakeModel(crash_after=0)
    jobs.main(["extract", "--model", "tiny", "--images", str(folder), "--out", str(out), "--layers", "-1,2",
               "--text", "hi", "--no-progress"], model=m2)
    assert m2.batches == [] and json.load(open(out / "index.json")) == index
    with pytest.raises(SystemExit, match="layers"):
        jobs.main(["extract", "--model", "tiny", "--images", str(folder), "--out", str(out), "--layers", "1",
                   "--text", "hi", "--no-progress"], model=m2)
    with pytest.raises(SystemExit, match="out of range"):  # checked before any work
        jobs.main(["extract", "--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "f2"),
                   "--layers", "-1,9", "--no-progress"], model=m2)
    # a rerun retries the broken file only, into a new shard; the index points at the newest entries
    make_images(str(tmp_path / "fix"), [(56, 56)])
    os.replace(tmp_path / "fix" / "img000.png", folder / "broken.jpg")
    m3 = FakeModel()
    jobs.main(["extract", "--model", "tiny", "--images", str(folder), "--out", str(out), "--layers", "-1,2",
               "--text", "hi", "--no-progress"], model=m3)
    index2 = json.load(open(out / "index.json"))
    assert m3.batches == [1] and "error" not in index2["items"][0] and index2["items"][1:] == index["items"][1:]
    assert jobs.load_features(str(out), "broken.jpg")["layer.4"].shape[1] == 4


# ================================================================================ real tiny model, end to end
def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _answer_argv(q, folder, out, *extra, model="tiny"):
    return ["answer", "--model", str(model), "--questions", q, "--image-folder", folder, "--answers", str(out),
            "--max-new-tokens", "12", "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def tiny():
    from qwen_batched import QwenBatchedVL

    return QwenBatchedVL.from_config("tiny", seed=0)


@pytest.fixture(scope="module")
def hub_tiny(tmp_path_factory):
    """A tiny checkpoint (directory, hub cache holding it as org/tiny-vl, the model loaded from the directory)."""
    from tests.helpers import make_hf_model
    from qwen_batched import QwenBatchedVL
    from test_hub import hub_cache

    src = tmp_path_factory.mktemp("ckpt")
    make_hf_model().save_pretrained(src)
    hub = tmp_path_factory.mktemp("hub")
    hub_cache(hub, "org/tiny-vl", src)
    return src, str(hub), QwenBatchedVL.from_pretrained(src)


def test_tiny_answers_match_direct_generate(tmp_path, tiny):
    q, folder = dataset(tmp_path, n=6, missing=(1,), multi=(4,))
    out = tmp_path / "a.jsonl"
    jobs.main(_answer_argv(q, folder, out, "--batch-size", 4), model=tiny)
    rows = read_jsonl(out)
    qs = read_jsonl(q)
    assert [r["question_id"] for r in rows] == [d["question_id"] for d in qs] and "error" in rows[1]
    for r, d in zip(rows, qs):
        if "error" in r:
            continue
        imgs = [jio.decode_image(os.path.join(folder, p)) for p in ([d["image"]] if isinstance(d["image"], str)
                                                                     else d["image"])]
        ref = tiny.generate(images=[imgs], texts=[d["text"]], max_new_tokens=12)
        n = int(ref.lengths[0])
        assert r["text"] == ref.texts[0].strip()
        assert r["metadata"]["n_new_tokens"] + (r["metadata"]["finish_reason"] == "stop") == n
        x = tiny.processor.prepare([imgs], [d["text"]], chat_template=True, padding_side="left")
        assert r["metadata"]["n_prompt_tokens"] == int(x.attention_mask.sum())


def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, tiny):
    q, folder = dataset(tmp_path, n=24, missing=(5,))
    flags = ("--batch-size", 2, "--shard-size", 2, "--workers", 1, "--sort-window", 4)
    ref = tmp_path / "ref.jsonl"
    jobs.main(_answer_argv(q, folder, ref, *flags), model=tiny)
    out = tmp_path / "a.jsonl"
    parts = tmp_path / "a.jsonl.parts"
    cmd = [sys.executable, "-m", "qwen_batched", *_answer_argv(q, folder, out, *flags)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if parts.is_dir() and sum(fn.startswith("answers-") for fn in os.listdir(parts)) >= 2:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists()
    shard_lines = [json.loads(line) for fn in sorted(os.listdir(parts)) if fn.startswith("answers-")
                   for line in open(parts / fn)]
    assert 2 <= len(shard_lines) < 24
    done_before = {d["answer"]["question_id"]: d["answer"]["answer_id"] for d in shard_lines}

    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(shard_lines)} already done, {24 - len(shard_lines)} to do" in rerun.stderr
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == [f"q{i}" for i in range(24)]  # none lost, none twice
    assert strip_ids(rows) == strip_ids(read_jsonl(ref))
    assert all(r["answer_id"] == done_before[r["question_id"]] for r in rows if r["question_id"] in done_before)


def test_torchrun_two_ranks_equal_single_process(tmp_path, hub_tiny):
    # the ranks load the model by hub id (HF_HUB_CACHE, offline); the single process from its directory
    # big images first: a split by line count would be unbalanced, the split by estimated tokens is not
    folder = tmp_path / "images"
    sizes = [(420, 420)] * 3 + [(56, 56 + 28 * (i % 4)) for i in range(13)]
    names = make_images(str(folder), sizes)
    rows = [{"question_id": i, "image": n, "text": f"Question {i}: what is it?"} for i, n in enumerate(names)]
    rows.insert(7, {"question_id": 99, "image": "missing.png", "text": "gone"})
    write_questions(tmp_path / "q.jsonl", rows)
    q = str(tmp_path / "q.jsonl")
    sampling = ("--shard-size", 3, "--temperature", 1.0, "--seed", 3)  # sampled answers, other batch sizes
    src, hub, model = hub_tiny
    single = tmp_path / "single.jsonl"
    jobs.main(_answer_argv(q, str(folder), single, "--batch-size", 4, *sampling, model=src), model=model)
    multi = tmp_path / "multi.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "qwen_batched",
           *_answer_argv(q, str(folder), multi, "--batch-size", 3, *sampling, model="org/tiny-vl")]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(HF_HUB_CACHE=hub, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                         timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("answer_id", "model_id")} for r in rows]
    assert read_jsonl(multi)[0]["model_id"] == "org/tiny-vl"
    assert strip(read_jsonl(multi)) == strip(read_jsonl(single))
    parts = tmp_path / "multi.jsonl.parts"
    per_rank = {0: [], 1: []}
    for fn in os.listdir(parts):
        m = jio.ANSWER_SHARD_RE.match(fn)
        if m:
            per_rank[int(m.group(3))] += [json.loads(line)["answer"]["question_id"] for line in open(parts / fn)]
    assert sorted(per_rank[0] + per_rank[1], key=str) == sorted([r["question_id"] for r in rows], key=str)
    big = {0, 1, 2}
    # the three big images are not all on one rank, and the rank with two of them has fewer questions
    n_big = {r: len(big & set(per_rank[r])) for r in per_rank}
    heavy = max(per_rank, key=lambda r: n_big[r])
    assert n_big[heavy] == 2 and len(per_rank[heavy]) < len(per_rank[1 - heavy])


def test_sampled_answers_do_not_depend_on_batching_or_resume(tmp_path, tiny):
    q, folder = dataset(tmp_path, n=6, multi=(2,))
    sampling = ("--temperature", 1.0, "--top-k", 50, "--seed", 11, "--max-new-tokens", 8)

    def answers(name, *flags):
        jobs.main(_answer_argv(q, folder, tmp_path / name, *sampling, *flags), model=tiny)
        return [(r["question_id"], r["text"], r["metadata"]["n_new_tokens"]) for r in read_jsonl(tmp_path / name)]

    ref = answers("bs1.jsonl", "--batch-size", 1)
    assert answers("bs6.jsonl", "--batch-size", 6) == ref
    assert answers("split.jsonl", "--batch-size", 6, "--max-batch-tokens", 300) == ref  # smaller batches
    answers("resumed.jsonl", "--batch-size", 4, "--limit", 3)
    assert answers("resumed.jsonl", "--batch-size", 4) == ref
    greedy = [r["text"] for r in read_jsonl(tmp_path / "bs1.jsonl")]
    jobs.main(_answer_argv(q, folder, tmp_path / "greedy.jsonl", "--max-new-tokens", 8), model=tiny)
    assert greedy != [r["text"] for r in read_jsonl(tmp_path / "greedy.jsonl")]
    other = answers("seed12.jsonl", "--batch-size", 6, "--seed", 12)
    assert other != ref


def test_shared_prefixes_same_answers_each_image_encoded_once(tmp_path, tiny):
    """Three questions per image, spread over the file and over batches of 4: with --share-prefix each image goes
    through the vision tower once (later batches take it from the image cache), the answers do not change."""
    folder = tmp_path / "images"
    names = make_images(str(folder), [(84, 56), (56, 56), (112, 84), (56, 84)])
    rows = [{"question_id": f"q{i}", "image": names[i % 4], "text": f"Question {i}: is there a dog?"}
            for i in range(12)]
    rows.insert(5, {"question_id": "multi", "image": [names[0], names[1]], "text": "Compare them."})
    write_questions(tmp_path / "q.jsonl", rows)
    q = str(tmp_path / "q.jsonl")
    calls = count_vision_rows(tiny)
    try:
        jobs.main(_answer_argv(q, str(folder), tmp_path / "off.jsonl", "--batch-size", 4, "--no-share-prefix"),
                  model=tiny)
        off_rows = sum(calls)
        calls.clear()
        jobs.main(_answer_argv(q, str(folder), tmp_path / "on.jsonl", "--batch-size", 4), model=tiny)
    finally:
        del tiny.visual.forward
    assert tiny.image_cache is None  # the job's cache is gone with the job
    assert strip_ids(read_jsonl(tmp_path / "on.jsonl")) == strip_ids(read_jsonl(tmp_path / "off.jsonl"))
    px = [(h // 28 * 2) * (w // 28 * 2) for w, h in [(84, 56), (56, 56), (112, 84), (56, 84)]]  # patch rows
    assert sum(calls) == sum(px)  # each distinct image once
    assert off_rows == 3 * sum(px) + px[0] + px[1]


def test_answer_with_a_hub_id_offline(tmp_path, hub_tiny, monkeypatch):
    src, hub, _ = hub_tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    q, folder = dataset(tmp_path, n=3)
    out = tmp_path / "a.jsonl"
    argv = ["answer", "--model", "org/tiny-vl", "--cache-dir", hub, "--questions", q, "--image-folder", folder,
            "--answers", str(out), "--max-new-tokens", "4", "--no-progress"]
    jobs.main(argv)
    rows = read_jsonl(out)
    assert len(rows) == 3 and all(r["model_id"] == "org/tiny-vl" and "error" not in r for r in rows)
    # the same files as a directory are the same model: nothing to redo (the file names this run's model)
    jobs.main([*argv[:2], str(src), *argv[3:]], model=FakeModel(crash_after=0))
    assert read_jsonl(out) == [dict(r, model_id=os.path.basename(src)) for r in rows]
    with pytest.raises(SystemExit, match="error: --model: 'org/missing' is not a local directory and it is not in "
                                         "the hub cache"):
        jobs.main([*argv[:2], "org/missing", *argv[3:]])


def test_extract_shards_match_extract_features(tmp_path, tiny):
    folder = tmp_path / "imgs"
    make_images(str(folder), [(56, 84), (140, 112), (30, 200), (224, 168)])
    (folder / "zz-broken.png").write_bytes(b"not an image")
    out = tmp_path / "feats"
    argv = ["extract", "--model", "tiny", "--images", str(folder), "--out", str(out), "--layers", "-1,2",
            "--text", "Describe it.", "--batch-size", "3", "--shard-size", "2", "--save-vision", "--no-progress"]
    jobs.main(argv, model=tiny)
    index = json.load(open(out / "index.json"))
    n_layers = tiny.cfg.text.num_hidden_layers
    assert index["layers"] == [n_layers, 2] and index["tokens"] == "all"
    assert [e["id"] for e in index["items"]] == ["img000.png", "img001.png", "img002.png", "img003.png",
                                                 "zz-broken.png"]
    assert "error" in index["items"][-1] and "shard" not in index["items"][-1]
    assert len(index["shards"]) >= 2
    for i, e in enumerate(index["items"][:4]):
        got = jobs.load_features(str(out), e["id"])
        img = jio.decode_image(os.path.join(folder, e["id"]))
        ref = tiny.extract_features(images=[[img]], texts=["Describe it."], layers=[-1, 2])
        valid = ref.attention_mask[0].bool()
        assert e["length"] == int(valid.sum()) == e["n_prompt_tokens"]
        for L, h in zip(ref.layers, ref.hidden_states):
            torch.testing.assert_close(got[f"layer.{L}"], h[0][valid], rtol=1e-4, atol=1e-4)
        assert torch.equal(got["image_mask"], ref.image_mask[0][valid])
        assert e["n_image_tokens"] == int(ref.image_mask[0].sum()) == got["vision_embeds"].shape[0]
        torch.testing.assert_close(got["vision_embeds"], ref.vision_embeds, rtol=1e-4, atol=1e-4)
        s, t = e["image_spans"][0]
        assert got["image_mask"][s:t].all() and int(got["image_mask"].sum()) == t - s
    # --tokens image keeps exactly the image-token rows
    out2 = tmp_path / "feats_img"
    jobs.main([*argv[:6], str(out2), *argv[7:], "--tokens", "image"], model=tiny)
    a, b = jobs.load_features(str(out), 1), jobs.load_features(str(out2), 1)
    assert torch.equal(b["layer.2"], a["layer.2"][a["image_mask"]]) and bool(b["image_mask"].all())
    assert torch.equal(b["position"], a["position"][a["image_mask"]])


def test_bench_answers_equal_transformers_generate_per_sample(capsys):
    # the benchmark's rows double as a parity check: the answer job on a transformers model's weights gives
    # the same greedy answers as transformers' own generate, one question at a time
    sys.path.insert(0, ROOT)
    from bench import bench_jobs

    threads = torch.get_num_threads()
    try:
        res = bench_jobs.main(["--n", "6", "--max-new-tokens", "6", "--batch-size", "4", "--skip-bs1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [r["method"].split(",")[0] for r in res] == ["jobs", "HF generate per sample"]
    assert res[-1]["same_answers"] == 1.0 and res[0]["new_tokens"] == res[1]["new_tokens"]
    assert "| questions/s |" in capsys.readouterr().out


def test_cli_help_shows_defaults_and_bad_options_are_refused(tmp_path, capsys):
    from qwen_batched.jobs.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["answer"].format_help()
    for piece in ("(default: 128)", "(default: 8)", "(default: chat)", "(default: category)"):
        assert piece in text
    q, folder = dataset(tmp_path, n=1)
    for flag, value in (("--batch-size", 0), ("--max-pixels", -5), ("--max-batch-tokens", 0)):
        with pytest.raises(SystemExit, match=f"{flag} must be >= 1"):
            run_fake(FakeModel(), "--questions", q, "--answers", tmp_path / "a.jsonl", flag, value)
    with pytest.raises(SystemExit, match="does not exist"):
        run_fake(FakeModel(), "--questions", tmp_path / "nope.jsonl", "--answers", tmp_path / "a.jsonl")
    for flag, value, said in (("--limit", -1, ">= 0"), ("--workers", -2, ">= 0"), ("--sort-window", 0, ">= 1"),
                              ("--max-model-failures", 0, ">= 1"), ("--prefetch", -1, ">= 0"),
                              ("--max-new-tokens", 0, "max_new_tokens must be an int >= 1"),
                              ("--temperature", -1, "temperature must be a number >= 0"),
                              ("--top-k", -5, "top_k must be an int >= 0"), ("--top-p", 0, "top_p must be in")):
        m = FakeModel()
        with pytest.raises(SystemExit, match=f"{flag}.*{said}"):  # before anything is read or run
            run_fake(m, "--questions", q, "--answers", tmp_path / "a.jsonl", flag, value)
        assert m.batches == [] and not (tmp_path / "a.jsonl").exists()


def test_extract_layers_checked_from_the_config_before_loading(tmp_path, monkeypatch):
    from qwen_batched.jobs import run as jrun_module

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jrun_module, "load_model", no_load)
    folder = tmp_path / "imgs"
    make_images(str(folder), [(56, 56)])
    with pytest.raises(SystemExit, match="out of range"):
        jobs.main(["extract", "--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "f"),
                   "--layers", "-1,9", "--no-progress"])
    assert not (tmp_path / "f" / "settings.json").exists()


def test_resumed_answers_carry_this_runs_model_id(tmp_path):
    """The same checkpoint under another name (a symlink, a hub id and its snapshot): the answers file names one."""
    q, folder = dataset(tmp_path, n=4)
    ckpt = tmp_path / "ckptA"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    os.symlink(ckpt, tmp_path / "ckptB")
    for name, extra in (("ckptA", ("--limit", 2)), ("ckptB", ())):
        jobs.main(["answer", "--model", str(tmp_path / name), "--questions", q, "--image-folder", folder,
                   "--answers", str(tmp_path / "a.jsonl"), "--no-progress", *map(str, extra)], model=FakeModel())
    assert {r["model_id"] for r in read_jsonl(tmp_path / "a.jsonl")} == {"ckptB"}


def test_load_features_rejects_bad_arguments(tmp_path):
    folder = tmp_path / "imgs"
    make_images(str(folder), [(56, 56)])
    out = tmp_path / "feats"
    jobs.main(["extract", "--model", "tiny", "--images", str(folder), "--out", str(out), "--no-progress"],
              model=FakeModel())
    assert jobs.load_features(out, 0)["input_ids"].shape == jobs.load_features(str(out), "img000.png")["input_ids"].shape
    with pytest.raises(IndexError, match="position 1 out of range"):
        jobs.load_features(out, 1)
    with pytest.raises(KeyError, match="no input with id 'x.png'"):
        jobs.load_features(out, "x.png")
    with pytest.raises(TypeError, match="which must be"):
        jobs.load_features(out, 1.0)
    with pytest.raises(TypeError, match="out_dir"):
        jobs.load_features(None, 0)
    with pytest.raises(FileNotFoundError, match="no index.json"):
        jobs.load_features(tmp_path, 0)


def test_a_model_passed_in_is_fingerprinted_by_its_weights(tmp_path, tiny):
    """jobs.main(argv, model=M): M's own weights identify the answers, not only --model (which M need not be)."""
    from qwen_batched import QwenBatchedVL

    q, folder = dataset(tmp_path, n=3)
    argv = _answer_argv(q, folder, tmp_path / "a.jsonl", "--workers", 0)
    jobs.main(argv, model=tiny)
    jobs.main(argv, model=tiny)  # the same model: resumed, nothing to do
    other = QwenBatchedVL.from_config("tiny", seed=1)
    with pytest.raises(SystemExit, match="another model or other settings"):
        jobs.main(argv, model=other)
    jobs.main([*argv, "--overwrite"], model=other)
    direct = other.generate(images=[[jio.decode_image(os.path.join(folder, r["image"]))] for r in read_jsonl(q)],
                            texts=[r["text"] for r in read_jsonl(q)], max_new_tokens=12).texts
    assert [r["text"] for r in read_jsonl(tmp_path / "a.jsonl")] == [t.strip() for t in direct]


def test_extract_text_only_input_beside_images_and_index_after_an_empty_resume(tmp_path, tiny):
    """--save-vision with a text-only input sharing a shard with an image input: load_features gives it zero vision
    rows. A resume that finds every input done still writes resolved layers into index.json."""
    make_images(str(tmp_path), [(84, 56)])
    write_questions(tmp_path / "in.jsonl", [{"id": "img", "image": "img000.png", "text": "Describe it."},
                                            {"id": "txt", "text": "A longer prompt with no image at all, only text."}])
    out = tmp_path / "out"
    argv = ["extract", "--model", "tiny", "--images", str(tmp_path / "in.jsonl"), "--out", str(out), "--layers",
            "-1,2", "--batch-size", "1", "--shard-size", "2", "--save-vision", "--no-progress"]
    jobs.main(argv, model=tiny)
    index = json.loads((out / "index.json").read_text())
    assert index["layers"] == [4, 2] and len(index["shards"]) == 1  # both inputs in one shard
    img, txt = jobs.load_features(str(out), "img"), jobs.load_features(str(out), "txt")
    assert img["vision_embeds"].shape[0] == 6 and txt["vision_embeds"].shape == (0, img["vision_embeds"].shape[1])
    os.remove(out / "index.json")  # as if the run died after its last shard, before the merge
    jobs.main(argv, model=tiny)
    assert json.loads((out / "index.json").read_text())["layers"] == [4, 2]
    argv2 = [*argv[:argv.index("--out") + 1], str(tmp_path / "out2"), *argv[argv.index("--out") + 2:]]
    jobs.main(argv2)  # the job loading the model itself; on the resume none is loaded (nothing left to do)
    os.remove(tmp_path / "out2" / "index.json")
    jobs.main(argv2)
    assert json.loads((tmp_path / "out2" / "index.json").read_text())["layers"] == [4, 2]


def test_extract_layers_of_a_model_passed_in_are_checked_against_it(tmp_path):
    """jobs.main(argv, model=M): --layers is checked against M, not against the config --model names."""
    from qwen_batched import QwenBatchedVL

    cfg = tiny_config()
    six = QwenBatchedVL.from_config(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=6)))
    folder = tmp_path / "imgs"
    make_images(str(folder), [(56, 56)])
    argv = ["extract", "--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "f"), "--layers", "6",
            "--no-progress"]
    jobs.main(argv, model=six)  # layer 6 exists in M (the tiny preset has 4)
    assert "layer.6" in jobs.load_features(str(tmp_path / "f"), 0)
    before = sorted(os.listdir(tmp_path / "f"))
    with pytest.raises(SystemExit, match="out of range"):  # refused before --overwrite discards anything
        jobs.main([*argv[:-2], "9", "--no-progress", "--overwrite"], model=six)
    assert sorted(os.listdir(tmp_path / "f")) == before
    jobs.main([*argv, "--workers", "0", "--prefetch", "0"], model=six)  # no background loading at all
