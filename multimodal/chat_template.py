"""Rendering a base's Jinja chat template the way Hugging Face ``transformers`` does.

A template shipped with a base (``tokenizer_config.json``, ``chat_template.jinja``, GGUF metadata) is
code from the internet: it runs in Jinja's immutable sandbox, so it can neither change the messages
nor reach Python internals. Models were fine-tuned on text rendered by ``transformers``; the ids only
match if the whitespace handling (``trim_blocks``, ``lstrip_blocks``), the helpers templates call
(``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape) and the variables
passed (``tools``/``documents`` as None, unset special tokens left undefined) are the same.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """A template that does not compile, or one that refused the conversation (``raise_exception``)."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` marks assistant text for training masks in some
    templates; for rendering it is transparent, but the tag must parse."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt must keep them as they are.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per template text (the app renders the same template every turn)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def _plain(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Copies as plain dicts, without keys whose value is None (templates print None as 'None'
    where they would skip a missing key; transformers drops them too)."""
    return [{k: v for k, v in dict(m).items() if v is not None} for m in messages]


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                bos_token: str | None, eos_token: str | None, **extra: Any) -> str:
    """The prompt text for ``messages`` ([{"role", "content"}, ...]). ``extra`` reaches the template as
    variables (``tools``, ``documents``, ``enable_thinking``, other special tokens...)."""
    variables: dict[str, Any] = {"tools": None, "documents": None}
    # an unset special token stays undefined (renders as ''), as in transformers' special_tokens_map
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    variables |= {name: value for name, value in specials.items() if value is not None}
    variables |= extra
    try:
        return compile_template(template).render(messages=_plain(messages),
                                                 add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
