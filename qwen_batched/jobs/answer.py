"""The ``answer`` job: one LLaVA ``model_vqa``-style answer line per question, in input order."""
from __future__ import annotations

import hashlib
import json
import os
import uuid

from .io import ANSWER_SHARD_RE, atomic_write_bytes, list_shards, read_questions
from .run import Job, Result

FORMAT = "qwen_batched.answers/2"


def item_seed(seed: int, key: str) -> int:
    """The sampling seed of one item: a stable 63-bit hash of the run's ``--seed`` and the item's key, so an
    answer depends neither on the batch it lands in, nor on the rank, nor on which run computes it."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "little") >> 1


def read_answer_shards(directory: str) -> dict[str, tuple[str, dict]]:
    """key -> (content digest, answer record), from every complete shard (the newest run wins)."""
    out: dict[str, tuple[str, dict]] = {}
    for fn in list_shards(directory, ANSWER_SHARD_RE):
        with open(os.path.join(directory, fn), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    out[d["key"]] = (d["digest"], d["answer"])
    return out


class AnswerJob(Job):
    kind = "answer"
    format = FORMAT
    shard_re = ANSWER_SHARD_RE
    shard_prefix = "answers"
    shard_ext = ".jsonl"

    def __init__(self, args, model=None):
        super().__init__(args, model)
        self.answers = os.path.abspath(args.answers)
        self.out_dir = os.path.abspath(args.shard_dir or self.answers + ".parts")
        self.extra_tokens = args.max_new_tokens
        self.elsewhere = "a new answers file (--answers NEW.jsonl, and a new --shard-dir if you set one)"
        self.sampling = args.temperature > 0
        if args.share_prefix:  # the questions about one image set: one rank, the same or neighbouring batches
            self.together = lambda item: tuple(item.images) or None
            self.image_cache_bytes = args.image_cache_mb << 20

    def read_items(self):
        a = self.args
        return read_questions(a.questions, a.image_folder, a.limit, a.extra_keys)

    def settings(self) -> dict:
        a, s = self.args, self.sampling
        return {"conv_mode": a.conv_mode, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
                "top_k": a.top_k if s else None, "top_p": a.top_p if s else None, "seed": a.seed if s else None}

    def read_done(self):
        return read_answer_shards(self.out_dir)

    def discard(self) -> None:
        if os.path.isfile(self.answers):
            os.remove(self.answers)

    def encode(self, key_digest, results: list[Result]) -> bytes:
        return "".join(json.dumps({"key": k, "digest": d, "answer": r.record}, ensure_ascii=False) + "\n"
                       for (k, d), r in zip(key_digest, results)).encode("utf-8")

    def _record(self, pos: int, text: str, meta: dict, error: str | None = None, answer_id: str | None = None) -> dict:
        it, a = self.items[pos], self.args
        meta = {"n_images": len(it.images), **meta, "conv_mode": a.conv_mode, "temperature": a.temperature,
                "max_new_tokens": a.max_new_tokens}
        if self.sampling and error is None:
            meta["seed"] = item_seed(a.seed, it.key)
        rec = {"question_id": it.qid, "prompt": it.text, "text": text, "answer_id": answer_id or uuid.uuid4().hex[:22],
               "model_id": self.model_id, "metadata": meta}
        if error is not None:
            rec["error"] = error
        return rec

    def error_result(self, pos: int, msg: str) -> Result:
        return Result(pos, self._record(pos, "", {"finish_reason": "error"}, error=msg))

    def run_batch(self, inputs, positions: list[int]) -> list[Result]:
        a = self.args
        eos = list(self.model.cfg.eos_token_ids)
        seeds = [item_seed(a.seed, self.items[p].key) for p in positions] if self.sampling else None
        out = self.model.generate(inputs.to(self.device, non_blocking=True), max_new_tokens=a.max_new_tokens,
                                  temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_token_id=eos,
                                  seed=seeds, max_batch_tokens=a.max_batch_tokens, share_prefix=a.share_prefix)
        n_prompt = inputs.attention_mask.sum(-1).tolist()
        seqs, lengths = out.sequences.tolist(), out.lengths.tolist()
        results = []
        for b, pos in enumerate(positions):
            gen = seqs[b][:int(lengths[b])]
            stop = bool(gen) and gen[-1] in eos
            text = out.texts[b] if out.texts is not None else self.model.processor.tokenizer.decode(gen)
            meta = {"image_sizes": self.image_sizes.get(pos, []), "n_prompt_tokens": int(n_prompt[b]),
                    "n_new_tokens": len(gen) - int(stop), "finish_reason": "stop" if stop else "length"}
            results.append(Result(pos, self._record(pos, text.strip(), meta)))
        return results

    def merge(self, stats) -> tuple[str, int]:
        """The answers file, in input order, from the shards (written atomically); bad lines get their error."""
        done = read_answer_shards(self.out_dir)
        lines, missing = [], []
        for pos, it in enumerate(self.items):
            if it.error is not None:
                aid = hashlib.sha256(f"{it.index}\x00{it.error}".encode()).hexdigest()[:22]
                rec = self._record(pos, "", {"finish_reason": "error"}, error=it.error, answer_id=aid)
            elif it.key in done and done[it.key][0] == it.digest:  # (the same weights: the manifest checked them)
                rec = {**done[it.key][1], "model_id": self.model_id}  # one name in the file, this run's
            else:
                missing.append(it)
                continue
            lines.append(rec)
        if missing:
            raise RuntimeError(f"{len(missing)} question(s) have no answer in {self.out_dir} (e.g. "
                               f"{missing[0].qid!r}); rerun the same command to finish them")
        os.makedirs(os.path.dirname(self.answers) or ".", exist_ok=True)
        atomic_write_bytes(self.answers, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode())
        return self.answers, sum("error" in r for r in lines)


def run_answer(args, model=None) -> int:
    """The ``answer`` job for parsed ``args``; ``model`` reuses a loaded model (its device wins)."""
    return AnswerJob(args, model).run()
