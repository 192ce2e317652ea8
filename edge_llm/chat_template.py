"""Chat templates: render a model's Jinja template exactly the way transformers 5 does.

Reference: ``transformers.utils.chat_template_utils`` (``_cached_compile_jinja_template``,
``render_jinja_template``). Same environment: ``ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`` with loop controls, a ``{% generation %}`` block (rendered as its body), the
``raise_exception`` and ``strftime_now`` globals and transformers' ``tojson`` (``ensure_ascii=False``,
optional ``indent``/``separators``/``sort_keys``). Messages are copied without their ``None`` values, and
reasoning given as ``reasoning_content``/``thinking``/``reasoning`` is visible under the first two, as
transformers does. Differences: tools must be JSON-schema dicts (no Python callables), and there is no
assistant-token mask or ``continue_final_message``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_llm.errors import TokenizerError
from edge_llm.own_files import not_own

#: Used when a model ships no chat template. One line per message, "Role: content", and a final
#: "Assistant:" when a reply is wanted:  "System: Be brief.\nUser: Hi\nAssistant:"
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` marks text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """A fresh copy made of dicts, lists and scalars, so a template never sees the caller's objects."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _normalize_messages(messages: Sequence[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    normalized = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"{source}: chat message {message!r} is not a dict; "
                "pass dicts like {'role': 'user', 'content': '...'}"
            )
        msg = {key: _plain(value) for key, value in message.items() if value is not None}
        reasoning = next((msg[key] for key in _REASONING_FIELDS if key in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        normalized.append(msg)
    return normalized


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    source: str = "chat template",
    **variables: Any,
) -> str:
    """Render ``template`` for ``messages``; ``variables`` (special token strings, flags such as
    ``enable_thinking``) are visible to the template. ``source`` names the template in errors.

    Any failure, including a template's own ``raise_exception(...)``, raises ``TokenizerError``.
    """
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TokenizerError(
                    f"{source}: tool {tool!r} is not a dict; pass tools as JSON schemas "
                    "({'type': 'function', 'function': {...}})"
                )
        tools = _plain(tools)
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=_normalize_messages(messages, source),
            tools=tools,
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(
            f"{source}: chat template has a syntax error at line {error.lineno}: "
            f"{_one_line(error.message or '')}; fix the template"
        ) from error
    except (jinja2.TemplateError, TypeError, ValueError) as error:
        raise TokenizerError(
            f"{source}: chat template failed: {_one_line(str(error))}; "
            "check the messages against what the template accepts"
        ) from error


def read_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The folder's chat templates by name ("default" first): chat_template.jinja and
    additional_chat_templates/*.jinja, else tokenizer_config.json's ``chat_template`` (a string, or a
    list of ``{name, template}``)."""
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for item in raw:
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                templates[item["name"]] = str(item.get("template", ""))
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = folder / "chat_template.jinja"
    if (folder / "additional_chat_templates").is_dir():
        files.update({p.stem: p for p in sorted((folder / "additional_chat_templates").glob("*.jinja"))})
    for name, file in list(files.items()):  # a template is read verbatim into the prompt: never through a link out
        if why := not_own(folder, file):
            logging.getLogger(__name__).warning("chat template %s not used: %s", file, why)
            del files[name]
    if files:  # template files win over the config's templates, as in transformers
        templates = {}
        for name, file in files.items():
            try:
                templates[name] = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{file}: unreadable ({error}); re-download it") from error
    return templates
