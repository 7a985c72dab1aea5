"""One rank of the tensor-parallel test (launched by tests/test_tp.py under torchrun, gloo, 2 processes).

argv: work directory holding ``plain/`` and ``tied/`` checkpoints, ``batch.pt`` and a question file ``q.jsonl``
over ``images/``. Writes ``rank{r}.pt``: every output the test compares with one process, and the message of each
bad set-up's error; and ``answers-tp.jsonl`` from the answer job.
"""
import dataclasses
import sys

import torch
import torch.distributed as dist

from qwen_batched import ModelInputs, QwenBatchedVL, jobs
from qwen_batched.config import tiny_config


SHARED_ROWS = [1, 2, 1, 0, 1, 2]
JOB_FLAGS = ("--max-new-tokens", "8", "--no-progress", "--batch-size", "2", "--temperature", "1.0", "--seed", "3",
             "--workers", "0")


def error_of(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def storage_bytes(module: torch.nn.Module) -> int:
    return sum(p.untyped_storage().nbytes() for p in module.parameters())


def main(work: str) -> None:
    batch = torch.load(f"{work}/batch.pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    out = {}

    model = QwenBatchedVL.from_pretrained(f"{work}/plain", tp_size=2)  # starts the gloo group from torchrun's env
    rank = dist.get_rank()
    feats = model.extract_features(**inputs)
    out["hidden"] = feats.hidden_states
    out["logits"] = model.lm_head(feats.hidden_states[-1])
    out["vision"] = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    out["pre_merger"] = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"], return_pre_merger=True)
    one = {k: v[2:] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}  # one image: ranks 0 / 1
    out["vision_one"] = model.extract_features(**one, pixel_values=batch["pixels"][2],
                                               image_grid_thw=batch["grids"][2], layers=[-1]).hidden_states[0]
    out["greedy"] = model.generate(**inputs, max_new_tokens=6, eos_token_id=[]).sequences
    out["sampled"] = model.generate(**inputs, max_new_tokens=6, eos_token_id=[], temperature=1.0, top_k=50,
                                    seed=123).sequences
    torch.manual_seed(rank)  # no seed: the ranks must still agree
    out["unseeded"] = model.generate(**inputs, max_new_tokens=6, eos_token_id=[], temperature=1.0).sequences
    out["budget"] = model.extract_features(**inputs, layers=[2, -1], max_batch_tokens=64).hidden_states
    repeated = model.validate(ModelInputs(**inputs)).select_rows(SHARED_ROWS)  # rows sharing their image blocks
    out["shared"] = model.generate(repeated, max_new_tokens=6, eos_token_id=[], share_prefix=True).sequences
    out["shared_hidden"] = model.extract_features(repeated, layers=[-1], share_prefix=True).hidden_states[0]
    model.enable_image_cache()
    model.extract_features(**inputs, layers=[1])
    out["cached"] = model.extract_features(**inputs, layers=[-1]).hidden_states[0]
    out["cache_hits"] = model.image_cache.hits
    out["layer_bytes"] = storage_bytes(model.model.layers)
    out["lm_head_bytes"] = storage_bytes(model.lm_head)
    a = model.model.layers[0].self_attn
    out["heads"] = (a.n_heads, a.n_kv)
    other = dict(inputs, input_ids=inputs["input_ids"].roll(rank, 1))  # rank 1 passes a different batch
    out["err_inputs"] = error_of(lambda: model.extract_features(**other))
    bad_ids = inputs["input_ids"].clone()
    bad_ids[0, -1] = model.cfg.text.vocab_size if rank == 1 else bad_ids[0, -1]  # rejected by rank 1 only
    out["err_one_rank"] = error_of(lambda: model.extract_features(**dict(inputs, input_ids=bad_ids)))
    out["err_args"] = error_of(lambda: model.generate(**inputs, max_new_tokens=3 + rank, eos_token_id=[]))
    mask = inputs["attention_mask"].clone()
    first = int(mask[0].nonzero()[0])
    mask[0, first] = 0 if rank == 1 else 1  # the same ids, another mask
    out["err_mask"] = error_of(lambda: model.extract_features(**dict(inputs, attention_mask=mask)))
    pixels = inputs["pixel_values"].clone()
    if rank == 1:  # the same values in another order (patch rows of the first image reversed)
        n0 = int(inputs["image_grid_thw"][0].prod())
        pixels[:n0] = pixels[:n0].flip(0)
    out["err_pixel_order"] = error_of(lambda: model.extract_features(**dict(inputs, pixel_values=pixels)))
    out["same_call_spelled_otherwise"] = error_of(lambda: model.extract_features(
        **inputs, layers=[-1] if rank == 0 else (model.cfg.text.num_hidden_layers,)))
    out["after_errors"] = model.extract_features(**inputs, layers=[-1]).hidden_states[0]  # nobody left waiting

    tied = QwenBatchedVL.from_pretrained(f"{work}/tied", tp_size=2)
    out["tied_logits"] = tied.lm_head(tied.extract_features(**inputs, layers=[-1]).hidden_states[0])
    out["config_logits"] = QwenBatchedVL.from_config("tiny", tp_size=2, seed=3).generate(
        **inputs, max_new_tokens=4, eos_token_id=[]).sequences

    cfg = tiny_config()
    four_kv = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_key_value_heads=4))
    out["err_world"] = error_of(lambda: QwenBatchedVL.from_config(four_kv, tp_size=4))
    out["err_dtype"] = error_of(lambda: QwenBatchedVL.from_config(
        "tiny", tp_size=2, dtype=torch.float32 if rank == 0 else torch.bfloat16))
    out["err_device"] = error_of(lambda: QwenBatchedVL.from_config(
        "tiny", tp_size=2, device="cpu" if rank == 0 else "meta"))
    # the answer job with one tensor-parallel replica of 2 ranks (the process group is already up)
    out["job_rc"] = jobs.main(["answer", "--model", f"{work}/plain", "--questions", f"{work}/q.jsonl",
                               "--image-folder", f"{work}/images", "--answers", f"{work}/answers-tp.jsonl",
                               "--tp-size", "2", *JOB_FLAGS])
    torch.save(out, f"{work}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
