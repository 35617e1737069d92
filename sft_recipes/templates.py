"""Chat templates: find them by name, path or inline text, render conversations, and say where the
assistant's turns are in the rendered text.

Turn boundaries come from the template itself, never from per-template code:
- with `{% generation %}` markers, the marked character spans;
- without them (a model's own template), by rendering prefixes: the assistant turn i is what
  `render(msgs[:i+1])` adds after `render(msgs[:i], add_generation_prompt=True)`, trailing
  whitespace excluded. A template that rewrites earlier turns breaks the prefix property and the
  row is refused, never guessed.
"""
from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from .errors import RecipeError

_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_META = re.compile(r"\{#-?\s*(end_of_turn|special_tokens):(.*?)-?#\}")


def _template_dir() -> Path:
    # Installed wheels carry the templates as package data; a source checkout has them at the root.
    try:
        return Path(resources.files("sft_recipes.chat_templates"))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "chat_templates"


class TurnError(ValueError):
    """The template can't be trusted on this row: args are (reason_key, detail)."""


def template_names() -> list[str]:
    return sorted(p.stem for p in _template_dir().glob("*.jinja"))


def load_template(spec: str | None, tokenizer) -> str:
    """`spec` is a shipped name, a `.jinja` path, inline Jinja, or `tokenizer`/None for the model's own."""
    if spec in (None, "", "tokenizer"):
        if not tokenizer.chat_template:
            raise RecipeError(
                "the tokenizer has no chat template; set `chat_template:` in the recipe to one of "
                f"{', '.join(template_names())}, a .jinja path, or inline Jinja")
        return tokenizer.chat_template
    if "{{" in spec or "{%" in spec:
        return spec
    shipped = _template_dir() / f"{spec}.jinja"
    if shipped.is_file():
        return shipped.read_text()
    path = Path(spec)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise RecipeError(f"chat_template: file not found: {spec}")
        return path.read_text()
    close = difflib.get_close_matches(spec, template_names(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(f"chat_template: unknown template '{spec}'.{hint} Known: {', '.join(template_names())}, "
                      "or give a .jinja path, inline Jinja, or `tokenizer`.")


def template_meta(source: str, tokenizer) -> dict:
    """The end-of-turn text and special tokens a shipped template declares in its header comments."""
    meta = {k: v.strip() for k, v in _META.findall(source)}
    end = meta.get("end_of_turn") or None
    if end == "eos_token":
        end = tokenizer.eos_token
    return {"end_of_turn": end, "special_tokens": meta.get("special_tokens", "").split()}


@lru_cache(maxsize=8)
def has_markers(source: str) -> bool:
    return bool(_MARKER.search(source))


def render(source: str, messages: list[dict], tools=None, *, add_generation_prompt=False, **specials) -> str:
    texts, _ = render_jinja_template([messages], tools=tools, chat_template=source,
                                     add_generation_prompt=add_generation_prompt, **specials)
    return texts[0]


def render_with_spans(source: str, messages: list[dict], tools=None, **specials):
    """Render a conversation; return (text, spans) with one (start, end) character span per assistant
    message, in order. Raises TurnError when the template can't be trusted on it."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    if has_markers(source):
        texts, indices = render_jinja_template([messages], tools=tools, chat_template=source,
                                               return_assistant_tokens_mask=True, **specials)
        spans = [(s, e) for s, e in indices[0] if e > s]
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        if len(spans) != n_assistant:
            raise TurnError("template_marks_wrong_turns",
                            f"{len(spans)} generation blocks for {n_assistant} assistant messages")
        return texts[0], spans
    return _spans_by_prefix(source, messages, tools, specials)


def _spans_by_prefix(source, messages, tools, specials):
    full = render(source, messages, tools, **specials)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(source, messages[:i], tools, add_generation_prompt=True, **specials)
        upto = render(source, messages[: i + 1], tools, **specials)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TurnError("template_rewrites_earlier_turns",
                            f"rendering up to message {i} is not a prefix of the whole conversation")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans
