"""Data: SFT masking, packing, malformed records, deterministic resumable batches."""

from __future__ import annotations

import json

import pytest
import torch

from ernie45.train.data import (
    IGNORE,
    BatchSampler,
    DataError,
    PackedDataset,
    PreferenceDataset,
    SFTDataset,
    encode_chat_for_training,
    pad_batch,
)


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}]


def test_sft_labels_cover_exactly_the_assistant_replies(tok, tmp_path):
    ds = SFTDataset.from_file(_write(tmp_path / "c.jsonl", [{"messages": CHAT}]), tok, max_len=256)
    ex = ds[0]
    ids, train = encode_chat_for_training(tok, CHAT)
    # the whole rendered conversation, token for token
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(CHAT, add_generation_prompt=False)
    trained = ex["labels"][ex["labels"] != IGNORE].tolist()
    sep = tok.sep_token_id
    # targets are the two replies, each closed by <|end_of_sentence|>, and nothing else
    assert trained == tok.encode("Hello!") + [sep] + tok.encode("你好！") + [sep]
    assert tok.decode(trained, skip_special_tokens=False) == "Hello!<|end_of_sentence|>你好！<|end_of_sentence|>"
    # no user/system/role-label text is a target
    for text in ("Be brief", "Hi there", "User", "Assistant"):
        assert text not in tok.decode(trained)
    # each trained target is predicted from the position right before it
    pos = (ex["labels"] != IGNORE).nonzero()[:, 0]
    full = torch.tensor(ids)
    assert torch.equal(full[pos + 1], ex["labels"][pos])
    assert torch.equal(ex["input_ids"], full[:-1])


def test_prompt_span_matches_inference_prompt(tok):
    """The tokens before a reply are exactly what encode_chat(..., add_generation_prompt=True) gives."""
    ids, train = encode_chat_for_training(tok, CHAT[:3])
    first = train.index(True)
    assert ids[:first] == tok.encode_chat(CHAT[:2], add_generation_prompt=True)


def test_preference_dataset(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}])
    ex = PreferenceDataset.from_file(path, tok, max_len=64)[0]
    for key, reply in (("chosen", "Hi!"), ("rejected", "No.")):
        lab = ex[f"{key}_labels"]
        assert lab[lab != IGNORE].tolist() == tok.encode(reply) + [tok.sep_token_id]


@pytest.mark.parametrize("line,needle", [
    ('{"messages": [{"role": "user", "content": "hi"}]', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "message 0 must be"),
    ('{"msgs": []}', "'messages' must be a non-empty list"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_sft_records_name_file_and_line(tok, tmp_path, line, needle):
    path = _write(tmp_path / "bad.jsonl", [{"messages": CHAT}, "", line])
    with pytest.raises(DataError) as e:
        SFTDataset.from_file(path, tok, max_len=64)
    assert f"{path}:3:" in str(e.value) and needle in str(e.value)


def test_malformed_preference_and_pretrain_records(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'rejected' must be"):
        PreferenceDataset.from_file(path, tok, max_len=64)
    path = _write(tmp_path / "t.jsonl", [{"text": "ok"}, {"txt": "bad"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: a pretraining record needs a string field 'text'"):
        PackedDataset.from_files([path], tok, seq_len=4)
    with pytest.raises(DataError, match="no such data file"):
        PackedDataset.from_files([str(tmp_path / "missing.jsonl")], tok, seq_len=4)


def test_packing_keeps_every_token_and_separates_documents(tok, tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"text": "one two three"}, {"text": "four five"}])
    ds = PackedDataset.from_files([path], tok, seq_len=3)
    stream = tok.encode("one two three") + [tok.eos_token_id] + tok.encode("four five") + [tok.eos_token_id]
    assert ds.stream.tolist() == stream
    assert len(ds) == (len(stream) - 1) // 3
    for i in range(len(ds)):
        assert ds[i]["input_ids"].tolist() == stream[3 * i: 3 * i + 3]
        assert ds[i]["labels"].tolist() == stream[3 * i + 1: 3 * i + 4]


def test_pad_batch():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([6, 7, 8])},
             {"input_ids": torch.tensor([9]), "labels": torch.tensor([IGNORE])}]
    b = pad_batch(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 8], [IGNORE] * 3]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_an_epoch_visits_each_example_exactly_once():
    """Without replacement: when the batch size divides the dataset, each epoch is a permutation of it."""
    for n, b in [(12, 4), (7, 7), (30, 1)]:
        s = BatchSampler(n, b, seed=1)
        epochs = [sorted(i for _ in range(n // b) for i in s.next_indices()) for _ in range(3)]
        assert all(e == list(range(n)) for e in epochs), (n, b, epochs)


def test_sampler_resumes_to_the_same_batches():
    a = BatchSampler(10, 3, seed=4)
    seq = [a.next_indices() for _ in range(7)]  # crosses two epoch boundaries
    assert all(len(b) == 3 for b in seq)
    for epoch in (seq[0:3], seq[3:6]):  # 3 whole batches of 10 examples: 9 distinct ones, the 10th skipped
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 9 and set(flat) <= set(range(10)), epoch
    assert seq[:3] != seq[3:6]  # a new order each epoch
    b = BatchSampler(10, 3, seed=4)
    for _ in range(4):
        b.next_indices()
    c = BatchSampler(10, 3, seed=4)
    c.load_state_dict(b.state_dict())
    assert [c.next_indices() for _ in range(3)] == seq[4:7]
    with pytest.raises(DataError, match="resume on the same data"):
        BatchSampler(11, 3).load_state_dict(b.state_dict())
    with pytest.raises(DataError, match="fewer than batch_size"):
        BatchSampler(2, 3)
