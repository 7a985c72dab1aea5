"""Shared fixtures: the tiny random-weight reference model, ours sharing its tensors, and a mixed batch."""
import pytest

from qwen_batched import QwenBatchedVL
from tests.helpers import build_batch, make_hf_model


@pytest.fixture(scope="module")
def models():
    """(transformers reference, ours via from_hf) with the same tensors."""
    hf = make_hf_model()
    return hf, QwenBatchedVL.from_hf(hf)


@pytest.fixture(scope="module")
def batch(models):
    """Left-padded: text only; three images of different sizes; one 392x392 image."""
    return build_batch(models[1].cfg)
