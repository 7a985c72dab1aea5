"""Hub ids in ``from_pretrained``: resolved from a hub cache laid out as ``huggingface_hub`` lays it out, offline."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from tests.helpers import make_hf_model
from qwen_batched import QwenBatchedVL
from qwen_batched.hub import resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, src, commit: str = COMMIT, refs=("main",)):
    """``src``'s files as the hub cache holds them: blobs/<sha256>, snapshots/<commit>/<name> -> blob, refs/<ref>."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    os.makedirs(repo / "blobs", exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(repo / "refs", exist_ok=True)
    for name in sorted(os.listdir(src)):
        data = (src / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    src = tmp_path_factory.mktemp("ckpt")
    make_hf_model().save_pretrained(src)
    return src


def test_hub_id_loads_from_the_cache_offline(tmp_path, saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = hub_cache(tmp_path / "hub", "org/tiny-vl", saved)
    assert resolve_checkpoint("org/tiny-vl", cache_dir=tmp_path / "hub") == str(snap)
    assert resolve_checkpoint("org/tiny-vl", revision=COMMIT, cache_dir=str(tmp_path / "hub")) == str(snap)
    ours = QwenBatchedVL.from_pretrained("org/tiny-vl", cache_dir=tmp_path / "hub")
    ref = QwenBatchedVL.from_pretrained(saved)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resolve_checkpoint(saved) == str(saved)  # a directory is used as is


def test_hub_id_errors_name_the_id(tmp_path, saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    hub_cache(cache, "org/tiny-vl", saved)
    with pytest.raises(FileNotFoundError, match=r"'org/other' is not a local directory and it is not in the hub "
                                                r"cache .* HF_HUB_OFFLINE is set"):
        QwenBatchedVL.from_pretrained("org/other", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"'org/tiny-vl' .* at revision 'v2'"):
        resolve_checkpoint("org/tiny-vl", revision="v2", cache_dir=cache)
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_bytes((saved / "config.json").read_bytes())
    hub_cache(cache, "org/no-weights", cfg_only)
    with pytest.raises(FileNotFoundError, match="'org/no-weights' .* no config.json or safetensors weights"):
        resolve_checkpoint("org/no-weights", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "not" / "here"))
    with pytest.raises(ValueError, match="revision='main' applies to hub ids"):
        resolve_checkpoint(saved, revision="main")
    with pytest.raises(TypeError, match="name_or_path"):
        resolve_checkpoint(3)
    with pytest.raises(TypeError, match="revision"):
        resolve_checkpoint("org/tiny-vl", revision=5)
    with pytest.raises(TypeError, match="cache_dir"):
        resolve_checkpoint("org/tiny-vl", cache_dir=1.5)


def test_hub_id_downloads_when_online_and_not_cached(tmp_path, saved, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, revision, cache_dir, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        assert "*.safetensors" in allow_patterns and "tokenizer.json" in allow_patterns
        assert not any(p.endswith((".bin", ".pt", ".pth")) for p in allow_patterns)
        return str(hub_cache(tmp_path / "hub", repo_id, saved, refs=(revision,)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    path = resolve_checkpoint("org/tiny-vl", revision="v1", cache_dir=tmp_path / "hub")
    assert path.endswith(COMMIT) and os.path.isfile(os.path.join(path, "model.safetensors"))
    hub = str(tmp_path / "hub")
    assert calls == [("org/tiny-vl", "v1", hub, True), ("org/tiny-vl", "v1", hub, False)]

    def unreachable(repo_id, *, local_files_only=False, **kw):
        raise (LocalEntryNotFoundError if local_files_only else ConnectionError)("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(FileNotFoundError, match="'org/x' is not a local directory and could not be fetched from "
                                                "the hub: ConnectionError: no route to host"):
        resolve_checkpoint("org/x")
