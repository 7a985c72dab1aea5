"""The ``answer`` job: one LLaVA ``model_vqa``-style answer line per question, in input order."""
from __future__ import annotations

import json
import os
import uuid

from .batch_inputs import _field, _model_inputs
from .inputs import Item, read_questions
from .io import ANSWER_SHARD_RE, atomic_write_bytes, list_shards
from .job import Job
from .model import model_id_of
from .results import Result


def read_answer_shards(directory: str) -> dict[str, tuple[dict, bool]]:
    """key -> (answer record, retry flag), from every complete shard (the newest run wins)."""
    out: dict[str, tuple[dict, bool]] = {}
    for fn in list_shards(directory, ANSWER_SHARD_RE):
        with open(os.path.join(directory, fn), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    out[d["key"]] = (d["answer"], bool(d.get("retry", False)))
    return out


class AnswerJob(Job):
    """``answer``: one LLaVA-style answer line per question, in input order."""

    kind = "answer"
    shard_re = ANSWER_SHARD_RE
    shard_prefix = "answers"
    shard_ext = ".jsonl"

    def __init__(self, args, model=None):
        super().__init__(args, model)
        self.answers = os.path.abspath(args.answers)
        self.out_dir = os.path.abspath(args.shard_dir or self.answers + ".parts")
        self.extra_tokens = args.max_new_tokens

    def read_items(self) -> list[Item]:
        return read_questions(self.args.questions, self.args.image_folder, self.args.limit)

    def settings(self) -> dict:
        a = self.args
        return {"job": "answer", "model": model_id_of(a.model), "conv_mode": a.conv_mode, "temperature": a.temperature,
                "top_k": a.top_k, "top_p": a.top_p, "max_new_tokens": a.max_new_tokens,
                "seed": a.seed if a.temperature > 0 else None}

    def read_done(self):
        return read_answer_shards(self.out_dir)

    def encode(self, results: list[Result]) -> bytes:
        return "".join(json.dumps({"key": r.key, "answer": r.record, **({"retry": True} if r.retry else {})},
                                  ensure_ascii=False) + "\n" for r in results).encode("utf-8")

    def _record(self, pos: int, text: str, meta: dict, error: str | None = None) -> dict:
        it, a = self.items[pos], self.args
        rec = {"question_id": it.qid, "prompt": it.text, "text": text, "answer_id": uuid.uuid4().hex[:22],
               "model_id": self.model_id,
               "metadata": {"n_images": len(it.images), **meta, "conv_mode": a.conv_mode,
                            "temperature": a.temperature, "max_new_tokens": a.max_new_tokens}}
        if error is not None:
            rec["error"] = error
        return rec

    def error_result(self, pos: int, msg: str, retry: bool) -> Result:
        return Result(pos, self.items[pos].key, self._record(pos, "", {"finish_reason": "error"}, error=msg), retry)

    def run_batch(self, inputs, positions: list[int]) -> list[Result]:
        a, cfg = self.args, self.model.cfg
        eos = list(cfg.eos_token_ids)
        seed = None if a.temperature <= 0 else a.seed + positions[0]
        out = self.model.generate(**_model_inputs(inputs, self.device), max_new_tokens=a.max_new_tokens,
                                  temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_token_id=eos, seed=seed)
        mask = _field(inputs, "attention_mask")
        n_prompt = mask.sum(-1).tolist()
        seqs, lengths, texts = (_field(out, k) for k in ("sequences", "lengths", "texts"))
        seqs, lengths = seqs.tolist(), lengths.tolist()
        results = []
        for b, pos in enumerate(positions):
            gen = seqs[b][:int(lengths[b])]
            stop = bool(gen) and gen[-1] in eos
            text = texts[b] if texts is not None else self.processor.tokenizer.decode(gen)
            meta = {"image_sizes": self.sizes.get(pos, []), "n_prompt_tokens": int(n_prompt[b]),
                    "n_new_tokens": len(gen) - int(stop), "finish_reason": "stop" if stop else "length"}
            results.append(Result(pos, self.items[pos].key, self._record(pos, text.strip(), meta)))
        return results

    def merge(self, stats) -> str:
        merge_answers(self.items, self.out_dir, self.answers)
        return self.answers


def merge_answers(items: list[Item], shard_dir: str, answers: str) -> int:
    """Assemble the final answers file, in input order, from the shards (written atomically)."""
    done = read_answer_shards(shard_dir)
    missing = [it for it in items if it.key not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} question(s) have no answer in {shard_dir} (e.g. "
                           f"{missing[0].qid!r}); rerun the same command to finish them")
    os.makedirs(os.path.dirname(answers) or ".", exist_ok=True)
    data = "".join(json.dumps(done[it.key][0], ensure_ascii=False) + "\n" for it in items)
    atomic_write_bytes(answers, data.encode("utf-8"))
    return len(items)


def run_answer(args, model=None) -> int:
    """The ``answer`` job for parsed ``args``; ``model`` reuses a loaded model (its device wins)."""
    return AnswerJob(args, model).run()
