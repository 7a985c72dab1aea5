"""Tensor parallelism: 2 ranks (torchrun, gloo, CPU) against one process, plus the set-up errors.

The distributed part is one torchrun launch (``tests/tp_worker.py``) shared by the tests through a module
fixture; the rest runs in this process.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from qwen_batched import ModelInputs, QwenBatchedVL
from qwen_batched.tp import check_tp_size, split_images
from tests.helpers import build_batch, hf_config_dict, make_hf_model, model_inputs, rel_err, tiny_model_config

TOL = 1e-5
WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def rel_close(ours, ref, tol=TOL):
    err = rel_err(ours, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Checkpoints + batch, the one-process reference, and both ranks' outputs of one torchrun launch."""
    work = tmp_path_factory.mktemp("tp")
    cfg = tiny_model_config()
    make_hf_model(cfg).save_pretrained(work / "plain", max_shard_size="200KB")  # sharded: several files
    make_hf_model(dataclasses.replace(cfg, tie_word_embeddings=True), seed=5).save_pretrained(work / "tied")
    batch = build_batch(cfg)
    torch.save(batch, work / "batch.pt")
    write_questions(work)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, str(work)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (work / "stderr.txt").write_text(proc.stderr)
    ranks = [torch.load(work / f"rank{r}.pt") for r in range(2)]
    return work, batch, ranks


def write_questions(work):
    """Five questions over images of different sizes, one image missing."""
    from PIL import Image

    (work / "images").mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (w, h) in enumerate([(56, 84), (140, 112), (28, 28), (200, 120), (84, 56)]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(work / "images" / f"{i}.png")
        rows.append({"question_id": i, "image": f"{i}.png" if i != 2 else "missing.png", "text": f"What is {i}?"})
    (work / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def single(run):
    work, batch, _ = run
    return QwenBatchedVL.from_pretrained(work / "plain")


def test_every_layer_and_logits_match_one_process(run, single):
    _, batch, ranks = run
    feats = single.extract_features(**model_inputs(batch))
    logits = single.lm_head(feats.hidden_states[-1])
    for out in ranks:
        assert len(out["hidden"]) == len(feats.hidden_states) == single.cfg.text.num_hidden_layers + 1
        for ours, ref in zip(out["hidden"], feats.hidden_states):
            rel_close(ours, ref)
        rel_close(out["logits"], logits)
        assert out["logits"].shape == logits.shape
    for a, b in zip(ranks[0]["hidden"] + (ranks[0]["logits"],), ranks[1]["hidden"] + (ranks[1]["logits"],)):
        assert torch.equal(a, b)  # every rank holds the same result


def test_every_collective_is_waited(run):
    """A collective's result that nothing waits for (a greedy run's unused seeds) is a leak torch reports at exit."""
    stderr = (run[0] / "stderr.txt").read_text()
    assert "wait_tensor() is invoked" not in stderr, stderr[-3000:]


def test_vision_split_across_ranks_matches_one_process(run, single):
    _, batch, ranks = run
    pv, grid = batch["pixel_values"], batch["image_grid_thw"]
    ref = single.encode_images(pv, grid)
    pre = single.encode_images(pv, grid, return_pre_merger=True)
    one = single.extract_features(input_ids=batch["input_ids"][2:], attention_mask=batch["attention_mask"][2:],
                                  pixel_values=batch["pixels"][2], image_grid_thw=batch["grids"][2], layers=[-1])
    for out in ranks:
        rel_close(out["vision"], ref)
        rel_close(out["pre_merger"], pre)
        rel_close(out["vision_one"], one.hidden_states[0])  # one image: the second rank encodes none


def test_generation_matches_one_process(run, single):
    _, batch, ranks = run
    greedy = single.generate(**model_inputs(batch), max_new_tokens=6, eos_token_id=[]).sequences
    sampled = single.generate(**model_inputs(batch), max_new_tokens=6, eos_token_id=[], temperature=1.0, top_k=50,
                              seed=123).sequences
    for out in ranks:
        assert torch.equal(out["greedy"], greedy)
        assert torch.equal(out["sampled"], sampled)
    assert torch.equal(ranks[0]["unseeded"], ranks[1]["unseeded"])  # no seed: the first rank's draw
    from tests.tp_worker import SHARED_ROWS
    shared = single.validate(ModelInputs(**model_inputs(batch))).select_rows(SHARED_ROWS)
    hidden = single.extract_features(shared, layers=[-1], share_prefix=False).hidden_states[0]
    for out in ranks:  # shared prefixes under tensor parallelism: the tokens of the rows alone
        assert torch.equal(out["shared"], greedy[SHARED_ROWS])
        rel_close(out["shared_hidden"], hidden)
    config_model = QwenBatchedVL.from_config("tiny", seed=3)
    ref = config_model.generate(**model_inputs(batch), max_new_tokens=4, eos_token_id=[]).sequences
    assert all(torch.equal(out["config_logits"], ref) for out in ranks)


def test_budget_cache_and_tied_embeddings(run, single):
    work, batch, ranks = run
    feats = single.extract_features(**model_inputs(batch), layers=[2, -1])
    tied = QwenBatchedVL.from_pretrained(work / "tied")
    tied_logits = tied.lm_head(tied.extract_features(**model_inputs(batch), layers=[-1]).hidden_states[0])
    for out in ranks:
        for ours, ref in zip(out["budget"], feats.hidden_states):
            rel_close(ours, ref)
        rel_close(out["cached"], feats.hidden_states[1])
        assert out["cache_hits"] == 4  # the second call found all four images
        rel_close(out["tied_logits"], tied_logits)


def test_each_rank_holds_half_the_decoder(run, single):
    _, _, ranks = run
    full = sum(p.numel() * p.element_size() for p in single.model.layers.parameters())
    norms = sum(p.numel() * p.element_size() for n, p in single.model.layers.named_parameters() if "norm" in n)
    head = single.lm_head.weight.numel() * single.lm_head.weight.element_size()
    for out in ranks:
        assert out["layer_bytes"] == (full - norms) // 2 + norms  # norms replicated, everything else halved
        assert out["lm_head_bytes"] == head // 2
        assert out["heads"] == (2, 1)  # 4 heads, 2 KV heads -> 2 and 1 per rank (and the KV cache)


def test_bad_setups_are_clear_errors_on_every_rank(run, single):
    _, batch, ranks = run
    ref = single.extract_features(**model_inputs(batch), layers=[-1]).hidden_states[0]
    for out in ranks:
        assert "tp_size=4 must divide the world size 2" in out["err_world"]
        assert "one dtype" in out["err_dtype"]
        assert "one device type" in out["err_device"]
        assert "different inputs" in out["err_inputs"]
        assert "different arguments" in out["err_args"]
        assert "different inputs" in out["err_mask"]
        assert "different inputs" in out["err_pixel_order"]
        assert out["same_call_spelled_otherwise"] == "no error"  # layers [-1] and (4,) are one request
    assert "vocabulary" in ranks[1]["err_one_rank"] and "rank(s) [1]" in ranks[0]["err_one_rank"]
    for out in ranks:  # and the group still works
        rel_close(out["after_errors"], ref)


def test_answer_job_with_tp_size_2_writes_what_one_process_writes(run, single):
    from qwen_batched import jobs
    from tests.tp_worker import JOB_FLAGS

    work, _, ranks = run
    assert [out["job_rc"] for out in ranks] == [0, 0]
    jobs.main(["answer", "--model", str(work / "plain"), "--questions", str(work / "q.jsonl"), "--image-folder",
               str(work / "images"), "--answers", str(work / "answers-1.jsonl"), *JOB_FLAGS], model=single)

    def rows(name):
        lines = (work / name).read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "answer_id"} for x in lines]

    tp, one = rows("answers-tp.jsonl"), rows("answers-1.jsonl")
    assert [r["question_id"] for r in tp] == list(range(5)) and "error" in tp[2]
    assert tp == one
    shards = os.listdir(work / "answers-tp.jsonl.parts")
    assert shards and all("-r00000-" in f for f in shards if f.startswith("answers-"))  # the replica's first rank


# ---------------------------------------------------------------------------------------------- in-process
def test_job_ranks_form_replicas_of_tp_size(monkeypatch):
    from qwen_batched.jobs.run import Dist

    monkeypatch.setenv("WORLD_SIZE", "4")
    for rank, replica, writes in ((0, 0, True), (1, 0, False), (2, 1, True), (3, 1, False)):
        monkeypatch.setenv("RANK", str(rank))
        d = Dist(tp_size=2)
        assert (d.replicas, d.replica, d.writes) == (2, replica, writes)
    with pytest.raises(SystemExit, match="--tp-size 3 must be >= 1 and divide the number of ranks 4"):
        Dist(tp_size=3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--tp-size 2 must"):
        Dist(tp_size=2)



def test_tp_size_checked_against_the_model_before_anything():
    cfg = tiny_model_config()  # 4 heads, 2 KV heads
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="tp_size must be an int >= 1"):
            check_tp_size(bad, cfg)
    with pytest.raises(ValueError, match="must divide num_key_value_heads=2"):
        check_tp_size(4, cfg)
    odd = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=321))
    with pytest.raises(ValueError, match="vocab_size"):
        check_tp_size(2, odd)
    assert check_tp_size(2, cfg) == 2


def test_no_process_group_is_a_clear_error(monkeypatch, tmp_path):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="launch under torchrun"):
        QwenBatchedVL.from_config("tiny", tp_size=2)
    cfg = tiny_model_config()
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))  # no weights at all
    with pytest.raises(RuntimeError, match="launch under torchrun"):
        QwenBatchedVL.from_pretrained(tmp_path, tp_size=2)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        QwenBatchedVL.from_pretrained(tmp_path, tp_size=4)


def test_split_images_balances_patches_in_order():
    assert split_images([16, 96, 96, 784], 2) == [0, 3, 4]
    assert split_images([100, 100, 100, 100], 2) == [0, 2, 4]
    assert split_images([100, 100, 100, 100], 4) == [0, 1, 2, 3, 4]
    assert split_images([50], 2) == [0, 1, 1]  # fewer images than ranks: a rank gets none
    assert split_images([10, 10, 10], 1) == [0, 3]


def test_out_of_memory_is_not_retried_under_tp():
    """One rank halving a sub-batch alone would desynchronise the group's collectives: raise instead."""
    from qwen_batched.batching import run_ranges

    def oom(s, e):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    model = QwenBatchedVL.from_config("tiny")
    assert run_ranges([(0, 2)], lambda s, e: (s, e), model._free_memory) == [((0, 2), (0, 2))]
    model.tp = object()  # stands for a TensorParallel: only its presence matters here
    with pytest.raises(RuntimeError, match="smaller max_batch_tokens"):
        run_ranges([(0, 2)], oom, model._free_memory)
