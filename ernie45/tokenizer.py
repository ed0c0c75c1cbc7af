"""SentencePiece tokenizer with ERNIE's special tokens, streaming detokenization and chat template.

Behaviour follows what transformers does with the official files (spec §4): `tokenizer.model` is run by
SentencePiece itself, special and added tokens (names and ids from `tokenizer_config.json`,
`special_tokens_map.json`, `added_tokens.json`) are split out of the text before SentencePiece sees it,
no BOS is added (`add_bos_token=False`), and each text segment is encoded on its own (`legacy=True`).

Decoding works on bytes: every id maps to the bytes it stands for (byte-fallback pieces such as
`<0xE4>` to that one byte, `▁` to a space), the bytes are joined and decoded as UTF-8. Streaming uses an
incremental UTF-8 decoder over the same bytes, so it holds back half a character until the rest arrives
and its text always equals the full decode.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re

import sentencepiece as spm

log = logging.getLogger(__name__)

TOKENIZER_MODEL = "tokenizer.model"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files override earlier ones
ADDED_TOKENS = "added_tokens.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' newer home of the template; wins over the config's
SPACE = "\u2581"  # SentencePiece's whitespace marker '▁'
# The named special tokens of ERNIE's tokenizer_config.json, in the order HF lists them.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token",
                "sys_start_token", "sys_end_token", "header_start_token", "header_end_token")
# The chat template's defaults when a config does not name cls/sep (the official template does the same).
DEFAULT_CLS, DEFAULT_SEP = "<|begin_of_sentence|>", "<|end_of_sentence|>"
CHAT_ROLES = ("system", "user", "assistant")


class TokenizerError(ValueError):
    """Tokenizer files that cannot be used; the message names the file and what to do."""


def _token_content(value) -> str | None:
    """A special token given as a string or as HF's AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class Tokenizer:
    """ERNIE 4.5 tokenizer: `encode`/`decode`, streaming `detokenizer`, `apply_chat_template`.

    Build it with `Tokenizer.from_pretrained(folder)`. Ids of special tokens are attributes
    (`bos_token_id`, `eos_token_id`, `pad_token_id`, `cls_token_id`, `sep_token_id`, None when absent).
    """

    def __init__(self, sp: spm.SentencePieceProcessor, config: dict, added_tokens: dict[str, int],
                 source: str = "<memory>"):
        self.sp = sp
        self.source = source
        self.config = config
        self.add_bos_token = bool(config.get("add_bos_token", False))  # spec §4: False for ERNIE
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.model_max_length = int(config.get("model_max_length") or 131072)
        self.chat_template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None

        # Added tokens: added_tokens.json plus HF's newer `added_tokens_decoder` {id: {content, special}}.
        added = dict(added_tokens)
        special_flag: dict[str, bool] = {}
        for sid, entry in (config.get("added_tokens_decoder") or {}).items():
            content = _token_content(entry)
            if content is not None:
                added[content] = int(sid)
                special_flag[content] = bool(entry.get("special", True)) if isinstance(entry, dict) else True
        n_sp = sp.get_piece_size()
        self.vocab_size = max([n_sp] + [i + 1 for i in added.values()])
        # Piece strings and types in bulk calls: one call per id would take ~0.4 s for ERNIE's 100k vocabulary.
        all_ids = list(range(n_sp))
        self._pieces: list[str] = sp.id_to_piece(all_ids)
        is_control, is_unknown = sp.is_control(all_ids), sp.is_unknown(all_ids)
        self._is_byte, self._is_unused = sp.is_byte(all_ids), sp.is_unused(all_ids)
        self._is_special_piece = [c or u for c, u in zip(is_control, is_unknown)]

        # Named special tokens; a config that names none falls back to the SentencePiece model's own.
        names: dict[str, str | None] = {k: _token_content(config.get(k)) for k in SPECIAL_KEYS}
        for key, sp_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
            if names[key] is None and sp_id >= 0:
                names[key] = sp.id_to_piece(sp_id)
        names["cls_token"] = names["cls_token"] or (DEFAULT_CLS if self._lookup(DEFAULT_CLS, added) else None)
        names["sep_token"] = names["sep_token"] or (DEFAULT_SEP if self._lookup(DEFAULT_SEP, added) else None)
        extra = [t for t in map(_token_content, config.get("additional_special_tokens") or []) if t]

        self.special_tokens: dict[str, str] = {}   # key ("bos_token", ...) -> content
        self._token_to_id: dict[str, int] = {}     # every token split out of text before SentencePiece
        special_ids: set[int] = set()
        for key, content in [*names.items(), *(("additional_special_tokens", t) for t in extra)]:
            if content is None:
                continue
            tid = self._lookup(content, added)
            if tid is None:
                log.warning("%s: special token %s=%r is neither in %s nor in added tokens; ignored",
                            source, key, content, TOKENIZER_MODEL)
                continue
            if key != "additional_special_tokens":
                self.special_tokens[key] = content
            self._token_to_id[content] = tid
            special_ids.add(tid)
        for content, tid in added.items():
            self._token_to_id.setdefault(content, tid)
            if special_flag.get(content, False):
                special_ids.add(tid)
        # Control and unknown pieces are skipped on decode like HF's special tokens. A control piece that
        # is not a named special token is NOT split out of text: SentencePiece never matches control
        # symbols, so '<mask:2>' in text stays characters (Baidu's Ernie4_5_Tokenizer and transformers 5
        # do the same).
        special_ids.update(i for i, special in enumerate(self._is_special_piece) if special)
        self.all_special_ids = frozenset(special_ids)
        for key in ("bos", "eos", "unk", "pad", "cls", "sep", "mask"):
            content = self.special_tokens.get(f"{key}_token")
            setattr(self, f"{key}_token", content)
            setattr(self, f"{key}_token_id", self._token_to_id.get(content) if content else None)
        # Chat turns end with sep (<|end_of_sentence|>); plain text ends with eos (</s>): stop on both (§4).
        self.stop_token_ids: list[int] = list(dict.fromkeys(
            i for i in (self.eos_token_id, self.sep_token_id) if i is not None))

        # Longest first, so that '<mask:10>' wins over a hypothetical '<mask:1>' prefix (HF uses a trie).
        tokens = sorted(self._token_to_id, key=len, reverse=True)
        self._split_re = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self._build_byte_table()

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.model` and the JSON files beside it from a checkpoint folder (any model name
        ``load_model`` takes: a folder, a file in one, or ``demo``; ``ernie45.resolve``)."""
        from ernie45 import resolve

        try:
            folder = resolve.checkpoint_folder(folder)
        except resolve.ModelNameError as e:
            raise TokenizerError(f"{e} (the tokenizer is the folder's {TOKENIZER_MODEL})") from None
        model_file = os.path.join(folder, TOKENIZER_MODEL)
        if not os.path.isfile(model_file):
            raise TokenizerError(f"{folder}: no {TOKENIZER_MODEL} here; copy the SentencePiece model and "
                                 f"tokenizer_config.json of the checkpoint into this folder")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(model_file)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file}: not a valid SentencePiece model ({str(e).strip()}); "
                                 f"the file is corrupt or truncated, copy it again") from None
        config: dict = {}
        for name in CONFIG_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                config.update({k: v for k, v in _read_json(path).items() if v is not None})
        path = os.path.join(folder, CHAT_TEMPLATE_FILE)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    config["chat_template"] = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{path}: cannot read the chat template ({e})") from None
        added: dict[str, int] = {}
        path = os.path.join(folder, ADDED_TOKENS)
        if os.path.isfile(path):
            for content, tid in _read_json(path).items():
                if not isinstance(tid, int) or tid < 0:
                    raise TokenizerError(f"{path}: token {content!r} has id {tid!r}; ids are integers >= 0")
                added[content] = tid
        return cls(sp, config, added, source=folder)

    def _lookup(self, content: str, added: dict[str, int]) -> int | None:
        """Id of a token: added tokens first, then the SentencePiece vocabulary (exact piece only)."""
        if content in added:
            return added[content]
        tid = self.sp.piece_to_id(content)
        return tid if self.sp.id_to_piece(tid) == content else None

    def _build_byte_table(self) -> None:
        """Bytes each id decodes to, and whether SentencePiece adds a dummy '▁' in front of text."""
        sp = self.sp
        table: list[bytes] = [b""] * self.vocab_size
        for i, piece in enumerate(self._pieces):
            if self._is_byte[i]:  # '<0xE4>' -> one raw byte; UTF-8 is reassembled when the bytes are joined
                table[i] = bytes([int(piece[3:-1], 16)])
            elif self._is_special_piece[i]:
                table[i] = piece.encode("utf-8")  # shown by name when specials are not skipped (as HF)
            elif not self._is_unused[i]:
                table[i] = piece.replace(SPACE, " ").encode("utf-8")
        for content, tid in self._token_to_id.items():
            table[tid] = content.encode("utf-8")
        self._bytes = table
        # With add_dummy_prefix, SentencePiece encodes "a" as "▁a" and strips that space when decoding
        # the start of a text. ERNIE's model has it off (HF: add_prefix_space=False), test models may not.
        first = sp.encode("a", out_type=str)
        self.add_dummy_prefix = bool(first) and first[0].startswith(SPACE)

    # ------------------------------------------------------------------------------- encode / decode
    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of a special/added token or an exact SentencePiece piece; None if unknown."""
        return self._token_to_id.get(token, self._lookup(token, {}))

    def id_to_token(self, token_id: int) -> str:
        """The piece or token string of one id (byte pieces stay as '<0xE4>')."""
        self._check_id(token_id)
        if token_id < self.sp.get_piece_size():
            return self.sp.id_to_piece(token_id)
        return self._bytes[token_id].decode("utf-8", errors="replace")

    def _check_id(self, token_id: int) -> None:
        if not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"token id {token_id!r} is not a non-negative integer")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special and added tokens written in the text become their ids.

        `add_special_tokens` adds BOS/EOS only where the config asks (`add_bos_token`, default False).
        """
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        pos = 0
        # Split out added tokens first (HF's trie split), then encode each plain segment on its own.
        for m in self._split_re.finditer(text) if self._split_re is not None else ():
            if m.start() > pos:
                ids.extend(self.sp.encode(text[pos:m.start()]))
            ids.append(self._token_to_id[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self.sp.encode(text[pos:]))
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _to_bytes(self, ids: list[int], skip_special_tokens: bool, at_start: bool) -> tuple[bytes, bool]:
        """Join the bytes of `ids`; returns (bytes, still_at_start) for the dummy-prefix rule."""
        out = bytearray()
        table, n, special = self._bytes, self.vocab_size, self.all_special_ids
        for i in map(int, ids):  # numpy or 0-d torch ids too (their hash would miss the special set)
            if not 0 <= i < n:  # padded embedding rows (vocab_size 103424 > tokenizer size): no text
                self._check_id(i)
                continue
            if skip_special_tokens and i in special:
                continue
            b = table[i]
            if at_start and b:
                # SentencePiece drops the dummy-prefix space of the first piece of a text.
                if self.add_dummy_prefix and b[:1] == b" " and i not in special:
                    b = b[1:]
                at_start = False
            out += b
        return bytes(out), at_start

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid or incomplete UTF-8 from byte pieces becomes U+FFFD."""
        data, _ = self._to_bytes(list(ids), skip_special_tokens, at_start=True)
        return data.decode("utf-8", errors="replace")

    def detokenizer(self, prompt_ids: list[int] | None = None,
                    skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A streaming decoder for tokens generated after `prompt_ids`."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    # ---------------------------------------------------------------------------------- chat template
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            **template_kwargs) -> str:
        """Render messages with the checkpoint's own `chat_template` (tokenizer_config.json or
        chat_template.jinja), sandboxed as transformers renders it (`ernie45.chat_template`); `tools`,
        `documents` and `template_kwargs` (e.g. `enable_thinking`) are template variables.

        Without a template in the checkpoint, ERNIE's base template (spec §4) is built in: `cls` + per
        message: system `content\\n`, user `User: content\\n`, assistant `Assistant: content<sep>`; then
        `Assistant: ` when `add_generation_prompt`. It renders no tools, so they are refused there.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if self.chat_template is not None:
            from ernie45.chat_template import render_chat_template

            msgs = []
            for i, msg in enumerate(messages):
                if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                    raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {msg!r:.80}")
                if isinstance(msg.get("content"), list):  # a text model: text parts become one string
                    msg = {**msg, "content": self._check_message(i, {**msg, "role": "user"})[1]}
                msgs.append(msg)
            return render_chat_template(self.chat_template, msgs, tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt,
                                        special_tokens=self.template_special_tokens(), **template_kwargs)
        if tools:
            raise ValueError("this checkpoint has no chat_template, and the built-in ERNIE base template renders "
                             "no tools; add a chat_template that renders `tools` to tokenizer_config.json")
        cls_token = self.cls_token or DEFAULT_CLS
        sep_token = self.sep_token or DEFAULT_SEP
        parts = [cls_token]
        for i, msg in enumerate(messages):
            role, content = self._check_message(i, msg)
            if role == "user":
                parts.append("User: " + content + "\n")
            elif role == "assistant":
                parts.append("Assistant: " + content + sep_token)
            else:
                parts.append(content + "\n")
        if add_generation_prompt:
            parts.append("Assistant: ")
        return "".join(parts)

    def template_special_tokens(self) -> dict:
        """The special tokens a template sees, as transformers' `special_tokens_map` (plus ERNIE's named ones)."""
        out: dict = dict(self.special_tokens)
        extra = [t for t in map(_token_content, self.config.get("additional_special_tokens") or []) if t]
        if extra:
            out["additional_special_tokens"] = extra
        return out

    @staticmethod
    def _check_message(i: int, msg) -> tuple[str, str]:
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role={role!r} is not supported; use one of {', '.join(CHAT_ROLES)}")
        content = msg.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text parts can be rendered
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}].content has a part {part!r}; only "
                                     "{'type': 'text', 'text': ...} parts are supported by a text model")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) has no text 'content' (got {content!r})")
        return role, content

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Token ids of the rendered conversation (encoded without adding BOS, spec §4)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_kwargs),
                           add_special_tokens=False)


class IncrementalDetokenizer:
    """Streaming decode of generated ids: `step(new_ids)` returns the new text, `text` holds all of it.

    A character split over byte-fallback pieces (`<0xE4><0xBD><0xA0>`) is emitted once complete, so the
    text is never cut mid-character; `finish()` flushes an incomplete tail as U+FFFD (as `decode` would).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True
        self._parts: list[str] = []  # joined on demand: `+=` on an attribute would copy the text every step
        if prompt_ids is not None and len(prompt_ids):
            # Generated text continues the prompt: no dummy-prefix stripping, and a character the prompt
            # left incomplete is finished by the first generated bytes. A UTF-8 character spans at most
            # 4 bytes, so the last 4 prompt ids hold any unfinished one; their own text is discarded.
            tail, _ = tokenizer._to_bytes(list(prompt_ids[-4:]), skip_special_tokens, at_start=False)
            self._utf8.decode(tail)
            self._at_start = False

    def step(self, new_ids: list[int]) -> str:
        """Text added by `new_ids` (possibly empty while a character is incomplete)."""
        data, self._at_start = self.tokenizer._to_bytes(list(new_ids), self.skip_special_tokens, self._at_start)
        new = self._utf8.decode(data)
        if new:
            self._parts.append(new)
        return new

    def finish(self) -> str:
        """Flush bytes still waiting for the rest of a character (as U+FFFD); returns that text."""
        new = self._utf8.decode(b"", final=True)
        if new:
            self._parts.append(new)
        return new

    @property
    def text(self) -> str:
        """Everything decoded so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a checkpoint folder, or None when it has no `tokenizer.model` (ids-only use)."""
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    if not os.path.isfile(os.path.join(folder, TOKENIZER_MODEL)):
        return None
    return Tokenizer.from_pretrained(folder)
