"""example.py runs end to end on the embedded default and on a checkpoint directory."""
import importlib.util
import os

import pytest

from tests.helpers import make_hf_model

_PATH = os.path.join(os.path.dirname(__file__), "..", "example.py")


def _example():
    spec = importlib.util.spec_from_file_location("example", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARGS = ["--batch", "2", "--cameras", "2", "--size", "84", "--new-tokens", "3", "--iters", "1"]


def test_example_default(capsys):
    _example().main(ARGS)
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert "image tokens per sample: [18, 18]" in out  # 2 cameras x (84/28)^2 merged tokens
    assert "frames/s" in out and "feature extraction throughput" in out
    lines = [l for l in out.splitlines() if "token ids:" in l]  # ids, not undecodable bytes of random weights
    assert len(lines) == 2 and all(l.split("token ids: ")[1].startswith("[") for l in lines)
    assert "text:" not in out


def test_example_checkpoint(tmp_path, capsys):
    make_hf_model().save_pretrained(tmp_path)
    _example().main(ARGS + ["--model", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"model: {tmp_path}" in out and "RANDOM WEIGHTS" not in out
    assert "generation (3 new tokens max, greedy)" in out and "token ids:" in out and "text:" in out


def test_example_rejects_bad_options():
    with pytest.raises(SystemExit):
        _example().main(["--batch", "0"])
