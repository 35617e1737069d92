"""Every common SFT data format, converted to one conversation shape (`CANONICAL_FEATURES`).

Errors (RecipeError) are data that cannot mean what the user intended: a missing column or field,
a wrong type (output a number, content neither a string nor text parts), an unknown role, a
non-text part, a fractional loss weight, invalid tools JSON, no records. Drops (the row's `drop`
reason; the caller counts and removes them) are well-formed rows with nothing to learn:
`empty_response` (blank assistant turn), `empty_content` (blank user or tool turn),
`no_assistant_turn`, `empty_text`. Blank system prompts are simply left out.
"""
from __future__ import annotations

import json
from typing import NamedTuple

from datasets import Dataset, Features, List, Value

from .errors import RecipeError, data_error

ROLES = ("system", "user", "assistant", "tool")

CANONICAL_FEATURES = Features({
    "messages": List({"role": Value("string"), "content": Value("string"),
                      "input": Value("string"), "train": Value("bool")}),
    "tools": Value("string"),
    "text": Value("string"),
    "drop": Value("string"),
})

# format -> (required fields, optional fields); fields are canonical names that `columns:` maps.
_FIELDS = {
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "instruction": (("instruction", "response"), ("system",)),
    "sharegpt": (("conversations",), ("system", "tools")),
    "messages": (("messages",), ("tools",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
FORMATS = tuple(_FIELDS)

# Keys inside each message; tried in order, so ShareGPT turns written as {role, content} work too.
_MESSAGE_KEYS = {
    "sharegpt": {"role": ("from", "role"), "content": ("value", "content")},
    "messages": {"role": ("role", "from"), "content": ("content", "value")},
    "prompt_completion": {"role": ("role", "from"), "content": ("content", "value")},
}

_DEFAULT_ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool",
    "developer": "system",
}


class _Where(NamedTuple):
    """Where a value came from, so every error names file, record and the user's own field name."""
    source: str
    record: int
    names: dict

    def field(self, canonical: str) -> str:
        return self.names.get(canonical, canonical)

    def error(self, problem: str, field: str | None = None, hint: str | None = None) -> RecipeError:
        return data_error(self.source, problem, record=self.record, field=field, hint=hint)


# ---------------------------------------------------------------- detection

def detect_format(column_names, where, *, columns: dict | None = None) -> str:
    """The one format whose required columns (after the `columns:` mapping) are all present.

    `text` is the fallback: many structured datasets also carry a rendered `text` column.
    """
    present = set(column_names)
    columns = columns or {}

    def fits(fmt):
        return all(columns.get(f, f) in present for f in _FIELDS[fmt][0])

    matched = [f for f in FORMATS if f != "text" and fits(f)] or [f for f in ("text",) if fits(f)]
    if len(matched) == 1:
        return matched[0]
    if not matched:
        raise data_error(where, f"no known data format in columns [{', '.join(column_names)}]",
                         hint=f"Formats and their required columns: {_describe(FORMATS)}; rename "
                              "your columns, map them with `columns:`, or set `format:`")
    raise data_error(where, f"the columns fit several formats: {_describe(matched)}",
                     hint=f"Set `format:` to the one you mean ({' or '.join(matched)})")


def _describe(formats) -> str:
    return "; ".join(f"{f} ({', '.join(_FIELDS[f][0])})" for f in formats)


# ---------------------------------------------------------------- conversion

def convert(ds: Dataset | list, fmt: str, *, source, columns: dict | None = None,
            roles: dict | None = None, num_proc: int | None = None) -> Dataset:
    """Map `ds` (format `fmt`) to canonical rows; cached by fingerprint like any `Dataset.map`.

    `ds` may also be a list of record dicts: converted in memory, without Arrow types or cache.
    """
    source = str(source)
    if fmt not in _FIELDS:
        raise data_error(source, f"unknown format '{fmt}'",
                         hint=f"Use one of: {', '.join(FORMATS)}")
    if len(ds) == 0:
        raise data_error(source, "the dataset is empty (0 records)", hint="Check the file or split")
    column_names = _column_names(ds)
    names, keys = _resolve_columns(fmt, columns, column_names, source)
    kwargs = {"fmt": fmt, "source": source, "names": names, "keys": keys,
              "roles": _role_table(roles, source)}
    if isinstance(ds, list):
        batch = {c: [r.get(c) for r in ds] for c in names.values()}
        return Dataset.from_dict(_convert_batch(batch, range(len(ds)), **kwargs),
                                 features=CANONICAL_FEATURES)
    return ds.map(_convert_batch, batched=True, with_indices=True, num_proc=num_proc,
                  remove_columns=column_names, features=CANONICAL_FEATURES,
                  desc=f"Converting {fmt}", fn_kwargs=kwargs)


def _column_names(ds: Dataset | list) -> list[str]:
    if isinstance(ds, list):
        return list(dict.fromkeys(k for record in ds for k in record))
    return ds.column_names


def _resolve_columns(fmt, columns, column_names, source):
    """canonical field -> source column for the columns present, and the message keys to read."""
    columns = dict(columns or {})
    keys = dict(_MESSAGE_KEYS.get(fmt, {}))
    for key in ("role", "content"):
        if key in columns:
            if fmt not in _MESSAGE_KEYS:
                raise data_error(source, f"columns: '{key}' maps a message key, but format '{fmt}' "
                                 "has no message lists")
            keys[key] = (columns.pop(key),)
    required, optional = _FIELDS[fmt]
    for field in columns:
        if field not in required + optional:
            raise data_error(source, f"columns: unknown field '{field}' for format '{fmt}'",
                             hint=f"Its fields are: {', '.join(required + optional)}")
    found = ", ".join(column_names)
    for field in required:
        col = columns.get(field, field)
        if col not in column_names:
            raise data_error(source, f"missing required column '{col}' for format '{fmt}'",
                             hint=f"Columns found: {found}; rename it, map it with `columns:` "
                                  f"(e.g. columns: {{{field}: your_column}}), or set `format:`")
    for field, col in columns.items():
        if col not in column_names:
            raise data_error(source, f"columns: '{field}' is mapped to column '{col}', "
                             f"which is not in the data", hint=f"Columns found: {found}")
    names = {f: columns.get(f, f) for f in required + optional}
    return {f: c for f, c in names.items() if c in column_names}, keys


def _role_table(roles, source) -> dict:
    for name, role in (roles or {}).items():
        if role not in ROLES:
            raise data_error(source, f"roles: '{name}' is mapped to '{role}'",
                             hint=f"Map to one of: {', '.join(ROLES)}")
    return {**_DEFAULT_ROLES, **(roles or {})}


def _convert_batch(batch, indices, *, fmt, source, names, keys, roles):
    out = {name: [] for name in CANONICAL_FEATURES}
    convert_row = _CONVERTERS[fmt]
    for j, record in enumerate(indices):
        at = _Where(source, record, names)
        row = {field: batch[col][j] for field, col in names.items()}
        messages, tools, text = convert_row(row, at, keys, roles)
        out["messages"].append(messages)
        out["tools"].append(tools)
        out["text"].append(text)
        out["drop"].append(_drop_reason(messages, text))
    return out


def _drop_reason(messages, text) -> str | None:
    if text is not None:
        return None if text.strip() else "empty_text"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn"
    for m in messages:
        if not m["content"].strip():
            return "empty_response" if m["role"] == "assistant" else "empty_content"
    return None


# ---------------------------------------------------------------- one converter per format

def _alpaca(row, at, keys, roles):
    messages = []
    _add(messages, "system", _string(row, "system", at, required=False))
    history = row.get("history")
    if history is not None and not isinstance(history, list):
        raise at.error(f"expected a list of [user, assistant] pairs, got {_kind(history)}",
                       at.field("history"))
    for k, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise at.error("expected a [user, assistant] pair of strings",
                           f"{at.field('history')}[{k}]")
        _add(messages, "user", pair[0])
        _add(messages, "assistant", pair[1])
    instruction = _string(row, "instruction", at)
    extra = _string(row, "input", at, required=False)
    if extra is not None and extra.strip():
        _add(messages, "user", f"{instruction}\n\n{extra}", input=extra)
    else:
        _add(messages, "user", instruction)
    _add(messages, "assistant", _string(row, "output", at))
    return messages, None, None


def _instruction(row, at, keys, roles):
    messages = []
    _add(messages, "system", _string(row, "system", at, required=False))
    _add(messages, "user", _string(row, "instruction", at))
    _add(messages, "assistant", _string(row, "response", at))
    return messages, None, None


def _sharegpt(row, at, keys, roles):
    messages = []
    _add(messages, "system", _string(row, "system", at, required=False))
    messages += _chat(_required(row, "conversations", at), at, at.field("conversations"),
                      keys, roles)
    return messages, _tools(row.get("tools"), at), None


def _messages(row, at, keys, roles):
    messages = _chat(_required(row, "messages", at), at, at.field("messages"), keys, roles)
    return messages, _tools(row.get("tools"), at), None


def _prompt_completion(row, at, keys, roles):
    prompt = _side(row, "prompt", "user", at, keys, roles)
    for m in prompt:  # like TRL: only the completion is trained unless a message says otherwise
        if m["train"] is None:
            m["train"] = False
    return prompt + _side(row, "completion", "assistant", at, keys, roles), None, None


def _text(row, at, keys, roles):
    return [], None, _string(row, "text", at)


_CONVERTERS = {"alpaca": _alpaca, "instruction": _instruction, "sharegpt": _sharegpt,
               "messages": _messages, "prompt_completion": _prompt_completion, "text": _text}


# ---------------------------------------------------------------- shared pieces

def _add(messages, role, content, *, input=None, train=None):
    if role == "system" and (content is None or not content.strip()):
        return
    messages.append({"role": role, "content": content, "input": input, "train": train})


def _required(row, field, at):
    value = row.get(field)
    if value is None:
        raise at.error("missing required field", at.field(field),
                       hint="Every record needs it; fix or remove the record")
    return value


def _string(row, field, at, *, required=True):
    value = _required(row, field, at) if required else row.get(field)
    if value is not None and not isinstance(value, str):
        raise at.error(f"expected a string, got {_kind(value)}", at.field(field),
                       hint="Write it as a JSON string")
    return value


def _side(row, field, role, at, keys, roles):
    """A prompt or completion: a plain string (one `role` turn) or a list of messages."""
    value = _required(row, field, at)
    if isinstance(value, str):
        return [{"role": role, "content": value, "input": None, "train": None}]
    if isinstance(value, list):
        return _chat(value, at, at.field(field), keys, roles)
    raise at.error(f"expected a string or a list of messages, got {_kind(value)}", at.field(field))


def _chat(turns, at, field, keys, roles):
    if not isinstance(turns, list):
        raise at.error(f"expected a list of messages, got {_kind(turns)}", field)
    messages = []
    for k, turn in enumerate(turns):
        path = f"{field}[{k}]"
        if not isinstance(turn, dict):
            raise at.error(f"expected a message object, got {_kind(turn)}", path)
        role = _role(turn, at, path, keys["role"], roles)
        _add(messages, role, _content(turn, at, path, keys["content"]),
             train=_train(turn, at, path))
    return messages


def _first(turn, keys):
    """(key, value) for the first of `keys` the message has, else (keys[0], None)."""
    for key in keys:
        if turn.get(key) is not None:
            return key, turn[key]
    return keys[0], None


def _role(turn, at, path, keys, roles):
    key, value = _first(turn, keys)
    if value is None:
        raise at.error("missing role", f"{path}.{key}",
                       hint="If your messages keep it under another key, map it with "
                            "`columns: {role: your_key}`")
    if not isinstance(value, str):
        raise at.error(f"expected a role string, got {_kind(value)}", f"{path}.{key}")
    role = roles.get(value, roles.get(value.lower()))
    if role is None:
        raise at.error(f"unknown role '{value}'", f"{path}.{key}",
                       hint=f"Known roles: {', '.join(sorted(roles))}; map yours with the "
                            f"`roles:` option, e.g. roles: {{{value}: assistant}}")
    return role


def _content(turn, at, path, keys):
    key, value = _first(turn, keys)
    calls = turn.get("tool_calls")
    if value is None and not calls:
        raise at.error("missing content", f"{path}.{key}",
                       hint="If your messages keep it under another key, map it with "
                            "`columns: {content: your_key}`")
    text = _text_of(value, at, f"{path}.{key}") if value is not None else ""
    if calls:  # OpenAI-style calls become text, the same shape as ShareGPT's function_call turns
        calls_text = _tool_calls_text(calls, at, f"{path}.tool_calls")
        text = f"{text}\n{calls_text}" if text.strip() else calls_text
    return text


def _text_of(value, at, field):
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise at.error(f"expected a string or a list of text parts, got {_kind(value)}", field)
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind is not None:
            raise at.error(f"content part of type '{kind}' is not supported", f"{field}[{i}]",
                           hint="Only text parts can be trained on; remove the part")
        else:
            raise at.error("expected a text part {\"type\": \"text\", \"text\": ...}",
                           f"{field}[{i}]")
    return "".join(texts)  # what chat templates render: parts back to back


def _tool_calls_text(calls, at, field):
    if not isinstance(calls, list):
        raise at.error(f"expected a list of tool calls, got {_kind(calls)}", field)
    lines = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise at.error("expected a tool call with a function name", f"{field}[{i}]")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        lines.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
    return "\n".join(lines)


def _train(turn, at, path):
    train, weight = turn.get("train"), turn.get("weight")
    if train is not None:
        if not isinstance(train, bool):
            raise at.error(f"expected true or false, got {_kind(train)}", f"{path}.train")
        return train
    if weight is None:
        return None
    if not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise at.error(f"loss weight {weight!r} is not supported", f"{path}.weight",
                       hint="Fractional loss weights are not supported: use 0 (don't train this "
                            "message) or 1 (train it)")
    return bool(weight)


def _tools(value, at):
    """Tools as one JSON string; blank or empty lists mean no tools."""
    field = at.field("tools")
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise at.error(f"tools is not valid JSON ({e})", field) from None
        return value if parsed not in ([], None) else None
    if isinstance(value, (list, dict)):
        # Arrow fills keys one tool lacks but another has with null; those nulls are not the user's.
        value = _without_nulls(value)
        return json.dumps(value, ensure_ascii=False) if value else None
    raise at.error(f"expected a list of tools or a JSON string, got {_kind(value)}", field)


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
