"""A model's tool calls read back out of the text it generated, and scored against the calls the data holds.

Reading tries, in order:
1. the tokenizer's own response parser (`tokenizer.parse_response`, transformers 5.x), where the tokenizer
   carries a `response_template` (or the older `response_schema`);
2. the call syntaxes our shipped templates print: `<tool_call>` blocks (chatml), a `[TOOL_CALLS]` list
   (mistral), or JSON call objects one per line after the content (llama3's `parameters`, the others'
   `arguments`);
3. else the text is the answer, with no calls.
Calls come back in the canonical shape of `formats` (`{"type": "function", "function": {"name",
"arguments": {...}}}`), so a parsed call compares with a reference call as data.
"""
from __future__ import annotations

import json
import re

from .errors import RecipeError
from .messages import read_call

_OPEN, _CLOSE, _MISTRAL = "<tool_call>", "</tool_call>", "[TOOL_CALLS]"
_SPACE = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


# ---------------------------------------------------------------- reading
def parse(text: str, tokenizer=None, *, prompt: str = "", tools=None) -> dict:
    """{"content": the answer text, "tool_calls": canonical calls or None} for a generated `text`; `prompt`
    is what generation continued (the tokenizer's parser needs it), `tools` what it was offered."""
    if tokenizer is not None and (getattr(tokenizer, "response_template", None)
                                  or getattr(tokenizer, "response_schema", None)):
        parsed = _parse_with_tokenizer(text, tokenizer, prompt, tools)
        if parsed is not None:
            return parsed
    return parse_text(text)


def _parse_with_tokenizer(text, tokenizer, prompt, tools):
    try:
        message = tokenizer.parse_response(text, prefix=prompt, tools=tools)
        calls = [read_call(c, "response") for c in message.get("tool_calls") or []]
    except (RecipeError, ValueError, TypeError, KeyError):  # text its parser can't read: try ours
        return None
    return {"content": message.get("content") or "", "tool_calls": calls or None}


def parse_text(text: str) -> dict:
    """The syntaxes our shipped templates print (see the module docstring). Calls are all or nothing: a call
    cut short or malformed leaves the whole text as the answer, so no half call is scored as made."""
    if _OPEN in text:
        calls = _tagged(text)
        if calls:
            return _reply(text[:text.index(_OPEN)], calls)
    if _MISTRAL in text:
        head, _, tail = text.partition(_MISTRAL)
        listed = _decode(tail, 0)[0]
        calls = [_call(c) for c in listed] if isinstance(listed, list) else []
        if calls and all(calls):
            return _reply(head, calls)
    lines = text.rstrip().split("\n")
    first = len(lines)
    while first > 0 and _line_call(lines[first - 1]):
        first -= 1
    if first < len(lines):
        return _reply("\n".join(lines[:first]), [_line_call(line) for line in lines[first:]])
    return {"content": text, "tool_calls": None}


def _tagged(text: str) -> list | None:
    """The calls of the `<tool_call>` blocks, each read with a JSON decoder, so that a `</tool_call>` inside an
    argument does not end its block; None unless every block holds one whole call."""
    calls, at = [], text.find(_OPEN)
    while at >= 0:
        value, end = _decode(text, at + len(_OPEN))
        end = _SPACE.match(text, end).end()
        call = _call(value)
        if call is None or not text.startswith(_CLOSE, end):
            return None
        calls.append(call)
        at = text.find(_OPEN, end + len(_CLOSE))
    return calls


def _decode(text: str, start: int):
    """(the JSON value at `start`, spaces skipped, and where it ends), or (None, start)."""
    try:
        return _DECODER.raw_decode(text, _SPACE.match(text, start).end())
    except ValueError:
        return None, start


def _reply(content: str, calls: list) -> dict:
    return {"content": content.rstrip(), "tool_calls": calls}


def _line_call(line: str) -> dict | None:
    """The call a line holds as one JSON object and nothing else, or None."""
    try:
        return _call(json.loads(line))
    except ValueError:
        return None


def _call(value) -> dict | None:
    """A parsed call object in the canonical shape, or None. It must name its arguments (`arguments` or
    `parameters`): a JSON answer that merely has a `name` is no call."""
    fn = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(fn, dict) or not ({"arguments", "parameters"} & fn.keys()):
        return None
    try:
        return read_call(value, "response")
    except RecipeError:
        return None


# ---------------------------------------------------------------- scoring
def call_key(call: dict) -> str:
    """A call as comparable text: its name and arguments as JSON with sorted keys, so key order does not
    count and values do (`7` is not `"7"`, and `7` is not `7.0`)."""
    fn = call["function"]
    return json.dumps([fn["name"], fn["arguments"]], sort_keys=True, ensure_ascii=False)


def same_calls(predicted, reference) -> bool:
    """The same calls, in any order: exact names and arguments."""
    return bool(predicted) and sorted(map(call_key, predicted)) == sorted(map(call_key, reference))


def tool_call_accuracy(predictions: list, references: list) -> dict:
    """The share of turns whose reference is a tool call that the model answered with exactly those calls.
    `predictions`: the parsed calls (None: it made none); `references`: the data's calls for each turn."""
    scores = [float(same_calls(p, r)) for p, r in zip(predictions, references)]
    return {"tool_call_accuracy": sum(scores) / len(scores) if scores else None, "tool_call_accuracy_scores": scores}
