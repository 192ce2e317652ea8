"""Chat templates: render a model's Jinja template exactly the way transformers 5 does.

Reference: ``transformers.utils.chat_template_utils`` (``_cached_compile_jinja_template``,
``render_jinja_template``). Same environment: ``ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`` with loop controls, a ``{% generation %}`` block (rendered as its body), the
``raise_exception`` and ``strftime_now`` globals and transformers' ``tojson`` (``ensure_ascii=False``,
optional ``indent``/``separators``/``sort_keys``). Messages are copied without their ``None`` values, and
reasoning given as ``reasoning_content``/``thinking``/``reasoning`` is visible under the first two, as
transformers does. Differences: tools must be JSON-schema dicts (no Python callables), and there is no
assistant-token mask or ``continue_final_message``.

A template comes with the model, i.e. from a stranger, and Jinja's sandbox bounds what it may touch but
not how long it runs or how much it builds (two nested loops of 100,000 render 10^10 characters). Each
rendering therefore gets a ``_Budget``: every loop (each ``for`` is rewritten to iterate through
``_bounded_iter``), call, filter, attribute, subscript and operator checks a deadline; strings and lists a
template builds, and the text it writes, stay under a size in proportion to the conversation; numbers that
size things (``'x' * n``, ``center(n)``, ``'%9999999s'``, ``n ** m``) are refused when huge. Past a bound,
one TokenizerError line says which. (One operation already allowed, say joining a 1 MB list with a 1 MB
separator, runs to its end; every bound is far above what real templates do.)
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_llm.errors import TokenizerError
from edge_llm.formats.own_files import not_own
from edge_llm.limits import TEMPLATE_LOOP_ITEMS, TEMPLATE_OUTPUT_CHARS, TEMPLATE_SECONDS

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


class _TemplateLimit(SecurityError):
    """A rendering that went past one of its bounds."""


class _Budget:
    """What one rendering may spend: a deadline, loop iterations, and the length of any value or output."""

    def __init__(self, conversation_chars: int) -> None:
        self.chars = TEMPLATE_OUTPUT_CHARS + 4 * conversation_chars
        self.deadline = time.monotonic() + TEMPLATE_SECONDS + conversation_chars / 1e6
        self.items = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"it ran past {TEMPLATE_SECONDS:g} s")

    def item(self) -> None:
        self.items += 1
        if self.items > TEMPLATE_LOOP_ITEMS:
            raise _TemplateLimit(f"its loops ran more than {TEMPLATE_LOOP_ITEMS:,} times")
        if not self.items % 1024:
            self.tick()

    def sized(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.chars:
            raise _TemplateLimit(f"it built a value of more than {self.chars:,} items")
        return value

    def numbers(self, values: Iterable[Any]) -> None:
        for v in values:
            if isinstance(v, int) and abs(v) > self.chars:
                raise _TemplateLimit(f"it asked for a size of {v:,}")
            if isinstance(v, str) and _WIDE_FORMAT.search(v):
                raise _TemplateLimit("it formats a field millions of characters wide")


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")
# a width or precision of 7 digits or more in a %-format or str.format spec
_WIDE_FORMAT = re.compile(r"%[-+ #0]*\d{7,}|%[-+ #0]*\d*\.\d{7,}|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")
_SEQUENCES = (str, list, tuple)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every hook it offers spending the current rendering's ``_Budget``."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        budget.tick()
        if operator == "*" and isinstance(left, _SEQUENCES) != isinstance(right, _SEQUENCES):
            seq, n = (left, right) if isinstance(left, _SEQUENCES) else (right, left)
            if isinstance(n, int) and len(seq) * n > budget.chars:
                raise _TemplateLimit(f"it repeats a value {n:,} times")
        if operator == "**" and isinstance(right, int) and abs(right) > 256 and left not in (0, 1, -1):
            raise _TemplateLimit(f"it raises a number to the power {right:,}")
        if operator == "%" and isinstance(left, str):
            budget.numbers([left, *(right if isinstance(right, tuple) else [right])])
        return budget.sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        budget = _BUDGET.get()
        budget.tick()
        budget.numbers([*args, *kwargs.values()])
        return budget.sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _BUDGET.get()
        budget.tick()
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            budget.numbers([obj])  # the format string's field widths
        return budget.sized(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _BUDGET.get()
        budget.tick()
        return budget.sized(super().getitem(obj, argument))


def _bounded_filter(function: Any) -> Any:
    """A filter (called directly by compiled templates, not through the environment) that spends the budget."""

    @functools.wraps(function)  # keeps jinja_pass_arg: environment/context filters still get theirs
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.tick()
        budget.numbers([*args[1:], *kwargs.values()])
        return budget.sized(function(*args, **kwargs))

    return bounded


def _bounded_iter(iterable: Any) -> Iterator[Any]:
    """What every ``for`` of a template iterates through: each item counts against the budget."""
    budget = _BUDGET.get()
    for item in iterable:
        budget.item()
        yield item


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["_bounded_iter"] = _bounded_iter
    del env.globals["lipsum"]  # lorem ipsum by the paragraph: a size knob and nothing a chat needs
    tree = env.parse(template)
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name("_bounded_iter", "load"), [loop.iter], [], None, None)
    return env.from_string(tree)


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
    messages = _normalize_messages(messages, source)
    documents, variables = _plain(documents), _plain(variables)
    budget = _Budget(len(json.dumps([messages, tools, documents, variables], default=str)))
    token = _BUDGET.set(budget)
    try:
        compiled = _compile(template)
        out, size = [], 0
        for chunk in compiled.generate(messages=messages, tools=tools, documents=documents,
                                       add_generation_prompt=add_generation_prompt, **variables):  # fmt: skip
            size += len(chunk)
            if size > budget.chars:
                raise _TemplateLimit(f"it wrote more than {budget.chars:,} characters")
            out.append(chunk)
            budget.tick()
        return "".join(out)
    except _TemplateLimit as error:
        raise TokenizerError(
            f"{source}: chat template stopped: {error}; the model's template is broken or hostile, "
            "pass another one"
        ) from None
    except (RecursionError, MemoryError) as error:
        raise TokenizerError(
            f"{source}: chat template failed: {type(error).__name__} ({_one_line(str(error))[:100]}); "
            "the model's template is broken or hostile, pass another one"
        ) from None
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(
            f"{source}: chat template has a syntax error at line {error.lineno}: "
            f"{_one_line(error.message or '')}; fix the template"
        ) from error
    except (jinja2.TemplateError, TypeError, ValueError) as error:
        raise TokenizerError(
            f"{source}: chat template failed: {_one_line(str(error))[:300]}; "
            "check the messages against what the template accepts"
        ) from error
    finally:
        _BUDGET.reset(token)


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
