"""The decode step compiles as one static-shape graph (fullgraph=True) and gives the eager tokens."""
import warnings

import torch

from qwen_batched import QwenBatchedVL


def test_compiled_decode_equals_eager():
    m = QwenBatchedVL.from_config("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], compile=True)
        again = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], compile=True)
    fallbacks = [str(w.message) for w in caught if "decode step failed" in str(w.message)]
    assert not fallbacks, fallbacks
    assert torch.equal(first.sequences, ref.sequences) and torch.equal(again.sequences, ref.sequences)
    assert m.caches.decode is not None  # the compiled step is kept for the next call of the same shape
