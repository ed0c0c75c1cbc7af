"""Training data: packed pretraining text, SFT chats, preference pairs; deterministic, resumable batching.

Every example is a pair ``input_ids [T]`` / ``labels [T]`` already shifted (``labels[t]`` is the token
that should follow ``input_ids[t]``; ``IGNORE`` = -100 where no loss is taken), so one masked
cross-entropy serves pretraining and SFT. Preference examples keep the prompt and both replies.

The tokenizer is anything with ``encode(text, add_special_tokens=False)`` and
``apply_chat_template(messages, add_generation_prompt=...)`` (``ernie45.tokenizer.Tokenizer``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A malformed data file or record; the message names the file and line."""


# ----------------------------------------------------------------------------------------- reading
def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; DataError names file:line on bad JSON."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def read_texts(path: str) -> list[str]:
    """Documents of a pretraining file: ``.jsonl`` records with a ``text`` string, or a ``.txt`` file
    (one document per file)."""
    if path.endswith(".jsonl"):
        texts = []
        for n, obj in read_jsonl(path):
            text = obj.get("text")
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: a pretraining record needs a string field 'text', e.g. "
                                f'{{"text": "..."}}; got keys {sorted(obj)}')
            texts.append(text)
        return texts
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def _check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {list(ROLES)}, 'content': str}}; "
                            f"got {m!r:.120}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message; SFT trains on assistant replies only")
    return messages


# ----------------------------------------------------------------------------------------- encoding
def encode_chat_for_training(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered chat and, per token, whether it is assistant output to train on.

    The text comes from the tokenizer's own chat template (rendered on growing prefixes of the
    conversation); each span is encoded on its own so that the prompt part ends exactly where a
    generation prompt ends at inference ("...Assistant: "). Trained spans are the assistant reply and
    its closing ``<|end_of_sentence|>``.
    """
    spans: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError("the first message is from the assistant; a chat starts with a system or user message")
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the chat template does not render conversations as growing prefixes; "
                            "cannot locate assistant replies")
        spans += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids: list[int] = []
    train: list[bool] = []
    for text, is_reply in spans:
        if text:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            train += [is_reply] * len(piece)
    return ids, train


def shift(ids: list[int], train: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T-1], labels [T-1]) where labels[t] = ids[t+1] if that token is trained, else IGNORE."""
    x = torch.tensor(ids[:-1], dtype=torch.long)
    y = torch.tensor([t if keep else IGNORE for t, keep in zip(ids[1:], train[1:])], dtype=torch.long)
    return x, y


# ----------------------------------------------------------------------------------------- datasets
class PackedDataset:
    """Pretraining: every document's tokens followed by ``</s>``, concatenated into one stream and cut
    into windows of ``seq_len + 1`` tokens (no padding, no token lost between windows)."""

    def __init__(self, stream: torch.Tensor, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be positive")
        if stream.numel() < seq_len + 1:
            raise DataError(f"the corpus has {stream.numel()} tokens, fewer than one window of seq_len+1="
                            f"{seq_len + 1}; lower seq_len or add text")
        self.stream = stream
        self.seq_len = seq_len

    @classmethod
    def from_files(cls, paths: Sequence[str], tokenizer, seq_len: int, repeat: Sequence[int] | None = None,
                   eos_id: int | None = None) -> PackedDataset:
        """Tokenize every document of ``paths``; ``repeat[i]`` copies of file i (to balance languages)."""
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        ids: list[int] = []
        for i, path in enumerate(paths):
            doc_ids: list[int] = []
            for text in read_texts(path):
                doc_ids += tokenizer.encode(text, add_special_tokens=False) + [eos]
            ids += doc_ids * (repeat[i] if repeat else 1)
            log.info("%s: %d tokens x %d", path, len(doc_ids), repeat[i] if repeat else 1)
        return cls(torch.tensor(ids, dtype=torch.long), seq_len)

    def __len__(self) -> int:
        return (self.stream.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.stream[i * self.seq_len: (i + 1) * self.seq_len + 1]
        return {"input_ids": w[:-1], "labels": w[1:]}


class ExampleList:
    """A list of tokenized examples (dicts of tensors), one per JSONL record."""

    def __init__(self, examples: list[dict[str, torch.Tensor]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]


class SFTDataset(ExampleList):
    """Chats from JSONL records ``{"messages": [{"role", "content"}, ...]}``; loss on assistant tokens."""

    @classmethod
    def from_file(cls, path: str, tokenizer, max_len: int) -> SFTDataset:
        examples = []
        for n, obj in read_jsonl(path):
            messages = _check_messages(obj.get("messages"), f"{path}:{n}")
            ids, train = encode_chat_for_training(tokenizer, messages)
            if len(ids) > max_len + 1:
                log.warning("%s:%d: %d tokens, truncated to max_len=%d", path, n, len(ids), max_len)
                ids, train = ids[: max_len + 1], train[: max_len + 1]
            x, y = shift(ids, train)
            if bool((y == IGNORE).all()):
                raise DataError(f"{path}:{n}: no assistant token left after truncation to max_len={max_len}")
            examples.append({"input_ids": x, "labels": y})
        if not examples:
            raise DataError(f"{path}: no records")
        return cls(examples)


class PreferenceDataset(ExampleList):
    """Preference pairs from JSONL records ``{"prompt": str | messages, "chosen": str, "rejected": str}``.

    Each example holds the chosen and the rejected sequence (prompt + reply + ``<|end_of_sentence|>``)
    as shifted ``input_ids``/``labels`` whose labels cover the reply only.
    """

    @classmethod
    def from_file(cls, path: str, tokenizer, max_len: int) -> PreferenceDataset:
        examples = []
        for n, obj in read_jsonl(path):
            where = f"{path}:{n}"
            prompt = obj.get("prompt")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompt = _check_messages(prompt, where, need_assistant=False)
            ex = {}
            for key in ("chosen", "rejected"):
                reply = obj.get(key)
                if not isinstance(reply, str):
                    raise DataError(f"{where}: '{key}' must be the assistant reply as a string; got {reply!r:.80}")
                ids, train = encode_chat_for_training(tokenizer, prompt + [{"role": "assistant", "content": reply}])
                x, y = shift(ids[: max_len + 1], train[: max_len + 1])
                if bool((y == IGNORE).all()):
                    raise DataError(f"{where}: the prompt fills max_len={max_len}; no '{key}' token is left")
                ex[f"{key}_input_ids"], ex[f"{key}_labels"] = x, y
            examples.append(ex)
        if not examples:
            raise DataError(f"{path}: no records")
        return cls(examples)



# ----------------------------------------------------------------------------------------- batching
def pad_batch(items: list[dict[str, torch.Tensor]], pad_id: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-pad ``{prefix}input_ids`` / ``{prefix}labels`` to the longest: input_ids [B, T], labels [B, T]
    (IGNORE on padding), attention_mask [B, T]."""
    t = max(it[prefix + "input_ids"].numel() for it in items)
    b = len(items)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, it in enumerate(items):
        n = it[prefix + "input_ids"].numel()
        input_ids[i, :n] = it[prefix + "input_ids"]
        labels[i, :n] = it[prefix + "labels"]
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@dataclass
class BatchSampler:
    """Deterministic shuffled batches with a resumable position.

    Epoch e visits the examples in the order of ``randperm(n, generator=seed + e)``; the position
    (epoch, index) is all a checkpoint needs to continue with exactly the batches an uninterrupted
    run would have seen.
    """

    num_examples: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        if self.num_examples < self.batch_size:
            raise DataError(f"the dataset has {self.num_examples} examples, fewer than batch_size="
                            f"{self.batch_size}; lower batch_size or add data")
        self._perm: list[int] | None = None
        self._perm_epoch = -1

    def _order(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._perm = torch.randperm(self.num_examples, generator=g).tolist()
            else:
                self._perm = list(range(self.num_examples))
            self._perm_epoch = self.epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """Indices of the next batch (whole batches only; an epoch's remainder is skipped)."""
        if self.index + self.batch_size > self.num_examples:
            self.epoch, self.index = self.epoch + 1, 0
        out = self._order()[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_examples", self.num_examples) != self.num_examples:
            raise DataError(f"the checkpoint was taken on a dataset of {state['num_examples']} examples; this "
                            f"one has {self.num_examples}: resume on the same data and seq_len")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
