"""Render a checkpoint's own Jinja chat template the way transformers' `apply_chat_template` does.

Chat templates ship inside checkpoints (`tokenizer_config.json` "chat_template", or `chat_template.jinja`)
and are untrusted code, so they run in Jinja's `ImmutableSandboxedEnvironment` with the environment
transformers builds (`transformers/utils/chat_template_utils.py`): `trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}` block tag, a `tojson` filter that does not HTML-escape,
and the globals `raise_exception`, `strftime_now`, `dict`, `namespace`. The variables are those
transformers passes: `messages` (None-valued keys dropped; `reasoning_content` also exposed as
`thinking`), `tools`, `documents`, `add_generation_prompt`, the special tokens (`bos_token`,
`cls_token`, ...) and any extra keyword (`chat_template_kwargs` of the server), extras winning.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template could not be compiled or raised while rendering (`raise_exception` included)."""


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """Compile `source` once in a sandbox; errors name the template line."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; renders as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace without underscore attributes (no path to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class SafeDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=SafeDict(),
                       namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile (line {e.lineno}: {e.message})") from None


def _plain(value: Any) -> Any:
    """JSON-like data only (dicts, lists, scalars), copied: the template never sees the caller's objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def normalize_messages(messages: list[dict]) -> list[dict]:
    """transformers' normalisation: drop None-valued keys; reasoning under every name templates read."""
    out = []
    for msg in messages:
        msg = {k: v for k, v in _plain(msg).items() if v is not None}
        reasoning = next((msg[k] for k in REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render_chat_template(source: str, messages: list[dict], *, tools: list[dict] | None = None,
                         documents: list[dict] | None = None, add_generation_prompt: bool = False,
                         special_tokens: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The rendered prompt text. `special_tokens` (bos_token, cls_token, ...) are template variables;
    `kwargs` (chat_template_kwargs) override them. Template errors become ChatTemplateError."""
    import jinja2

    template = compile_template(source)
    variables = {**(special_tokens or {}), **_plain(kwargs)}
    try:
        return template.render(messages=normalize_messages(messages), tools=_plain(tools),
                               documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
    except (TypeError, KeyError, AttributeError) as e:  # e.g. content None concatenated to a str
        raise ChatTemplateError(f"the chat template cannot render these messages ({type(e).__name__}: {e})") from None
