"""Rewards for online post-training (UPO): verifiers, a user callable, a reward model; combined with weights.

A reward function takes ``(prompt, completion, record)`` - the prompt text, the sampled completion text
and the prompt's JSONL record (all its fields) - and returns a float. The recipe lists them under
``upo.rewards``; each entry is a mapping with ``type`` and ``weight`` (default 1.0):

- ``exact``: 1.0 when the completion (whitespace-stripped; ``casefold`` optional) equals the record's
  ``field`` (default ``answer``), else 0.0.
- ``numeric``: the last number in the completion is within ``tolerance`` (absolute) or ``rel_tolerance``
  of the record's ``field`` -> 1.0, else 0.0 (no number: 0.0).
- ``json_schema``: 1.0 when the completion parses as JSON and validates against ``schema`` (inline
  mapping) or the schema in the record's ``schema_field``; 0.5 when it parses but does not validate; 0.0
  otherwise (``jsonschema`` does the validation).
- ``regex``: 1.0 when ``pattern`` matches (``fullmatch: true`` for the whole stripped completion).
- ``python``: ``function: "package.module:name"`` or ``"path/to/file.py:name"``, called as
  ``fn(prompt, completion, record)``; ``kwargs`` (a mapping) are passed as keyword arguments.
- ``model``: an ernie45 checkpoint folder with a scalar head (:class:`RewardModel`); scores a batch of
  prompt + completion token sequences at once.

The total is ``sum(weight_i * r_i)``; each component is reported on its own in the metrics.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

RewardFn = Callable[[str, str, dict], float]
TYPES = ("exact", "numeric", "json_schema", "regex", "python", "model")
HEAD_FILE = "reward_head.safetensors"

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


# ----------------------------------------------------------------------------------------- verifiers
def exact_match(completion: str, answer: Any, casefold: bool = False) -> float:
    a, b = completion.strip(), str(answer).strip()
    if casefold:
        a, b = a.casefold(), b.casefold()
    return float(a == b)


def numeric_match(completion: str, answer: Any, tolerance: float = 0.0, rel_tolerance: float = 0.0) -> float:
    """1.0 when the last number in ``completion`` is within the tolerances of ``answer`` (a number or a
    numeric string)."""
    found = _NUMBER.findall(completion.replace(",", ""))
    if not found:
        return 0.0
    got, want = float(found[-1]), float(answer)
    if not math.isfinite(got):
        return 0.0
    return float(abs(got - want) <= max(tolerance, rel_tolerance * abs(want)))


def json_schema_match(completion: str, schema: dict | None) -> float:
    """1.0 valid JSON matching ``schema`` (any JSON when None), 0.5 JSON that does not match, else 0.0."""
    try:
        value = json.loads(completion.strip())
    except (json.JSONDecodeError, ValueError):
        return 0.0
    if schema is None:
        return 1.0
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return 0.5
    return 1.0


def regex_match(completion: str, pattern: re.Pattern, fullmatch: bool = False) -> float:
    return float((pattern.fullmatch(completion.strip()) if fullmatch else pattern.search(completion)) is not None)


def load_callable(spec: str) -> Callable:
    """``"package.module:name"`` (imported) or ``"path/to/file.py:name"`` (loaded from the file)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward function {spec!r}: give 'package.module:function' or 'path/to/file.py:function'")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise ValueError(f"reward function {spec!r}: no such file {mod_name}")
        s = importlib.util.spec_from_file_location(f"_ernie45_reward_{abs(hash(os.path.abspath(mod_name)))}",
                                                   mod_name)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"reward function {spec!r}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {mod_name} has no callable {attr!r}")
    return fn


# ----------------------------------------------------------------------------------------- reward model
class RewardModel(nn.Module):
    """An ernie45 causal LM's decoder plus a scalar head: score = head(final hidden state of the last
    token). The folder is a normal checkpoint (config.json, *.safetensors) plus ``reward_head.safetensors``
    holding ``weight`` [1, H] (and optionally ``bias`` [1]); :meth:`save` writes one."""

    def __init__(self, lm: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.lm, self.head = lm, head

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> RewardModel:
        from safetensors.torch import load_file

        from ernie45.loading import load_model

        path = os.path.join(folder, HEAD_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{folder}: no {HEAD_FILE}; a reward model folder is an ernie45 checkpoint plus "
                             f"{HEAD_FILE} with 'weight' [1, hidden_size] (RewardModel.save writes one)")
        lm = load_model(folder, dtype=dtype, device=device, progress=False)
        t = load_file(path)
        hidden = lm.config.hidden_size
        if "weight" not in t or tuple(t["weight"].shape) != (1, hidden):
            raise ValueError(f"{path}: 'weight' must have shape [1, {hidden}] (the model's hidden_size); got "
                             f"{tuple(t['weight'].shape) if 'weight' in t else 'no such tensor'}")
        head = nn.Linear(hidden, 1, bias="bias" in t, dtype=dtype, device=device)
        with torch.no_grad():
            head.weight.copy_(t["weight"])
            if "bias" in t:
                head.bias.copy_(t["bias"].reshape(1))
        rm = cls(lm, head).eval()
        for p in rm.parameters():
            p.requires_grad_(False)
        return rm

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        from ernie45.loading import save_model
        from ernie45.utils import atomic_path

        save_model(self.lm, folder)
        tensors = {"weight": self.head.weight.detach().contiguous().cpu()}
        if self.head.bias is not None:
            tensors["bias"] = self.head.bias.detach().contiguous().cpu()
        with atomic_path(os.path.join(folder, HEAD_FILE)) as tmp:
            save_file(tensors, tmp)

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> torch.Tensor:
        """Scores of token sequences (right-padded into one batch), fp32 [N]."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("RewardModel.score needs non-empty token sequences")
        dev = self.head.weight.device
        t = max(len(s) for s in sequences)
        ids_NT = torch.zeros(len(sequences), t, dtype=torch.long, device=dev)
        mask_NT = torch.zeros_like(ids_NT)
        for i, s in enumerate(sequences):
            ids_NT[i, :len(s)] = torch.tensor(s, device=dev)
            mask_NT[i, :len(s)] = 1
        hidden_NTH = self.lm(ids_NT, attention_mask=mask_NT, compute_logits=False).hidden_states
        last_NH = hidden_NTH[torch.arange(len(sequences), device=dev), mask_NT.sum(-1) - 1]
        return self.head(last_NH.to(self.head.weight.dtype)).float()[:, 0]


# ----------------------------------------------------------------------------------------- the set
@dataclass
class RewardSpec:
    """One entry of ``upo.rewards`` (see the module docstring)."""

    type: str
    weight: float = 1.0
    name: str | None = None
    """Metrics name (default: the type, numbered when repeated)."""
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> RewardSpec:
        if not isinstance(raw, dict) or "type" not in raw:
            raise ValueError(f"{where}: a reward is a mapping with 'type' (one of {list(TYPES)}), e.g. "
                             f"{{type: exact, field: answer, weight: 1.0}}; got {raw!r:.100}")
        raw = dict(raw)
        kind = raw.pop("type")
        if kind not in TYPES:
            raise ValueError(f"{where}: type={kind!r}: choose one of {list(TYPES)}")
        weight = raw.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ValueError(f"{where}: weight={weight!r} must be a number")
        allowed = {"exact": {"field", "casefold"}, "numeric": {"field", "tolerance", "rel_tolerance"},
                   "json_schema": {"schema", "schema_field"}, "regex": {"pattern", "fullmatch"},
                   "python": {"function", "kwargs"}, "model": {"path", "dtype"}}[kind]
        name = raw.pop("name", None)
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} for a {kind!r} reward; known: {sorted(allowed)}")
        need = {"regex": "pattern", "python": "function", "model": "path"}.get(kind)
        if need and need not in raw:
            raise ValueError(f"{where}: a {kind!r} reward needs {need!r}")
        if kind == "regex":
            try:
                re.compile(raw["pattern"])
            except re.error as e:
                raise ValueError(f"{where}: pattern {raw['pattern']!r} is not a valid regex ({e})") from None
        return cls(kind, float(weight), name, raw)


class Rewards:
    """The recipe's rewards, built once (callables imported, patterns compiled, a reward model loaded)."""

    def __init__(self, specs: list[RewardSpec], tokenizer: Any = None, device: str = "cpu") -> None:
        if not specs:
            raise ValueError("upo.rewards is empty: list at least one reward (see ernie45.train.rewards)")
        self.specs, self.tokenizer = specs, tokenizer
        self.names: list[str] = []
        self._fns: list[Any] = []
        counts: dict[str, int] = {}
        for s in specs:
            counts[s.type] = counts.get(s.type, 0) + 1
            self.names.append(s.name or (s.type if counts[s.type] == 1 else f"{s.type}{counts[s.type]}"))
            self._fns.append(self._build(s, device))
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"upo.rewards: names {self.names} repeat; give each a distinct 'name'")

    @classmethod
    def from_config(cls, raw: list, tokenizer: Any = None, device: str = "cpu") -> Rewards:
        return cls([RewardSpec.from_dict(r, f"upo.rewards[{i}]") for i, r in enumerate(raw)], tokenizer, device)

    @staticmethod
    def _build(s: RewardSpec, device: str) -> Any:
        o = s.options
        if s.type == "exact":
            f, cf = o.get("field", "answer"), bool(o.get("casefold", False))
            return lambda p, c, rec: exact_match(c, _field(rec, f), cf)
        if s.type == "numeric":
            f, tol, rtol = o.get("field", "answer"), float(o.get("tolerance", 0.0)), float(o.get("rel_tolerance", 0.0))
            return lambda p, c, rec: numeric_match(c, _field(rec, f), tol, rtol)
        if s.type == "json_schema":
            schema, sf = o.get("schema"), o.get("schema_field")
            return lambda p, c, rec: json_schema_match(c, _field(rec, sf) if sf else schema)
        if s.type == "regex":
            pat, full = re.compile(o["pattern"]), bool(o.get("fullmatch", False))
            return lambda p, c, rec: regex_match(c, pat, full)
        if s.type == "python":
            fn, kw = load_callable(o["function"]), dict(o.get("kwargs") or {})
            return lambda p, c, rec: fn(p, c, rec, **kw)
        from ernie45.utils import resolve_dtype

        return RewardModel.from_pretrained(o["path"], resolve_dtype(o.get("dtype", "float32")), device)

    def __call__(self, prompts: list[str], completions: list[str], records: list[dict],
                 sequences: list[list[int]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total rewards [N] (fp32) and each component [N] by name. ``sequences`` (prompt + completion token
        ids) feed a reward model."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for spec, name, fn in zip(self.specs, self.names, self._fns):
            if isinstance(fn, RewardModel):
                if sequences is None:
                    raise ValueError("a 'model' reward needs the token sequences")
                r = fn.score(sequences).cpu()
            else:
                vals = []
                for p, c, rec in zip(prompts, completions, records):
                    v = fn(p, c, rec)
                    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                        raise ValueError(f"reward {name!r} returned {v!r} for completion {c!r:.60}; a reward "
                                         "is a finite float")
                    vals.append(float(v))
                r = torch.tensor(vals, dtype=torch.float32)
            parts[name] = r
            total += spec.weight * r
        return total, parts


def _field(record: dict, name: str) -> Any:
    if name not in record:
        raise ValueError(f"the reward reads field {name!r}, which this prompt record lacks (keys {sorted(record)}); "
                         "add it to the prompts file or set the reward's 'field'")
    return record[name]
