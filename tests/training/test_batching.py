"""Encoding, padding and length bucketing (rtteval.training.batching)."""

import pytest
import torch

from rtteval.errors import DataError
from rtteval.training.batching import encode_texts, make_batches, pad_batch
from tests.helpers import toy_tokenizer_and_model


def test_pad_batch_masks_padding_in_labels():
    b = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    b = pad_batch([[1, 2, 3]], pad_id=0, loss_masks=[[0, 0, 1]])
    assert b["labels"].tolist() == [[-100, -100, 3]]


def test_make_batches_covers_every_sequence_once_and_is_deterministic():
    seqs = [[i] * (1 + i % 7) for i in range(50)]
    a = make_batches(seqs, 8, 0, seed=3)
    b = make_batches(seqs, 8, 0, seed=3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    firsts = sorted(int(x) for batch in a for x in batch["input_ids"][:, 0])
    assert firsts == list(range(50))
    # bucketing keeps padding small
    waste = sum(int((batch["attention_mask"] == 0).sum()) for batch in a)
    unbucketed = sum(
        int((batch["attention_mask"] == 0).sum())
        for batch in make_batches(seqs, 8, 0, seed=3, bucket=False)
    )
    assert waste < unbucketed


def test_encode_refuses_silent_truncation():
    _, texts, tok, _ = toy_tokenizer_and_model()
    ids = encode_texts(tok, texts[:2])
    assert ids[0][0] == tok.bos_token_id and ids[0][-1] == tok.eos_token_id
    with pytest.raises(DataError, match="over the model's maximum context of 3"):
        encode_texts(tok, ["a b c d e f g"], max_length=3)
