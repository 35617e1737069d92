"""Every common SFT data format, converted to one conversation shape (`CANONICAL_FEATURES`).

A canonical message is `{role, content, input, train, reasoning_content, tool_calls, name,
tool_call_id, inline_reasoning}`; a field a message lacks is null. `inline_reasoning` keeps the exact text
an answer's `<think>` block took in the data (`content` is what follows it), so a template can be given
the turn as the user wrote it. What a message holds beyond its text (reasoning,
tool calls, the results that answer them) is read by `messages`; this module finds the format, the
columns and the turns. Tool calls, `tools` and per-row `chat_template_kwargs` are stored as JSON
text: their arguments and schemas are arbitrary JSON, which Arrow cannot hold as typed columns.

A row whose structure cannot mean what the user intended (a missing or mistyped field, an unknown
role, a non-text part, a fractional loss weight, invalid tools or tool calls, a tool result with no
call, reasoning that is unclosed, duplicated or on a non-assistant message) is dropped as `malformed`,
its error (record, field, problem, what to do) kept in `detail`; one odd row never sinks a file, and
`strict` makes the first the error. Other drops (the row's `drop` reason; the caller counts and removes
them) are well-formed rows with nothing to learn or a call the row's own tools do not define:
`empty_response`, `empty_content`, `no_assistant_turn`, `empty_text`, `unknown_tool`. What concerns the
whole file (unknown format, missing columns, no records) stays a RecipeError. Blank system prompts are
simply left out. Fields the data layer does not use are listed per row in `unused` and reported by name
and count, never dropped silently.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from datasets import Dataset, Features, List, Value

from .errors import RecipeError, Where, data_error, kind_of
from .messages import (CALL_ROLES, REASONING_KEYS, call_of, calls_of, kwargs_of, link_tool_results, reasoning_of,
                       split_reasoning, tools_of)

ROLES = ("system", "user", "assistant", "tool")

MESSAGE_FEATURES = {"role": Value("string"), "content": Value("string"), "input": Value("string"),
                    "train": Value("bool"), "reasoning_content": Value("string"),
                    "tool_calls": Value("string"), "name": Value("string"), "tool_call_id": Value("string"),
                    "inline_reasoning": Value("string")}
CANONICAL_FEATURES = Features({
    "messages": List(MESSAGE_FEATURES),
    "tools": Value("string"),
    "chat_template_kwargs": Value("string"),
    "text": Value("string"),
    "drop": Value("string"),
    "detail": Value("string"),
    "unused": List(Value("string")),
})

_CHAT = ("tools", "chat_template_kwargs")  # optional row fields of every conversational format
# format -> (required fields, optional fields); fields are canonical names that `columns:` maps.
_FIELDS = {
    "alpaca": (("instruction", "output"), ("input", "system", "history", "reasoning", *_CHAT)),
    "instruction": (("instruction", "response"), ("system", "reasoning", *_CHAT)),
    "sharegpt": (("conversations",), ("system", *_CHAT)),
    "messages": (("messages",), _CHAT),
    "prompt_completion": (("prompt", "completion"), _CHAT),
    "text": (("text",), ()),
}
FORMATS = tuple(_FIELDS)

# Keys inside each message; tried in order, so ShareGPT turns written as {role, content} work too.
_MESSAGE_KEYS = {
    "sharegpt": {"role": ("from", "role"), "content": ("value", "content")},
    "messages": {"role": ("role", "from"), "content": ("content", "value")},
    "prompt_completion": {"role": ("role", "from"), "content": ("content", "value")},
}
# Message keys read besides role and content; any other key is reported as unused.
_READ = {"train", "weight", "loss_weight", "tool_calls", "function_call", "name", "tool_call_id", *REASONING_KEYS}

_DEFAULT_ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool",
    "developer": "system",
}


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
              "roles": _role_table(roles, source),
              "unused": [c for c in column_names if c not in names.values()]}
    if isinstance(ds, list):
        batch = {c: [r.get(c) for r in ds] for c in column_names}
        return Dataset.from_dict(_convert_batch(batch, range(len(ds)), **kwargs),
                                 features=CANONICAL_FEATURES)
    if not isinstance(ds, Dataset):
        return _convert_records(ds, column_names, kwargs)
    return ds.map(_convert_batch, batched=True, with_indices=True, num_proc=num_proc,
                  remove_columns=column_names, features=CANONICAL_FEATURES,
                  desc=f"Converting {fmt}", fn_kwargs=kwargs)


def _convert_records(records, column_names, kwargs, chunk=10_000) -> Dataset:
    """Records read one at a time (`sources.Records`) converted a chunk at a time into an Arrow file in the
    datasets cache, then memory-mapped like any loaded file; the same file and options reuse it."""
    from datasets import config
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import Hasher
    from datasets.utils.tqdm import tqdm

    key = Hasher.hash([records.fingerprint, column_names, kwargs, Path(__file__).read_text()])
    path = Path(config.HF_DATASETS_CACHE) / "sft_recipes" / f"records-{key}.arrow"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part")  # renamed when complete: a crash leaves no half file
        records_left = iter(records)
        with ArrowWriter(features=CANONICAL_FEATURES, path=str(part)) as writer, \
                tqdm(total=len(records), unit=" rows", desc=f"Converting {kwargs['fmt']}") as bar:
            for start in itertools.count(0, chunk):
                rows = list(itertools.islice(records_left, chunk))
                if not rows:
                    break
                batch = {c: [r.get(c) for r in rows] for c in column_names}
                writer.write_batch(_convert_batch(batch, range(start, start + len(rows)), **kwargs))
                bar.update(len(rows))
            writer.finalize()
        os.replace(part, path)
    return Dataset.from_file(str(path))


def _column_names(ds) -> list[str]:
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


def _convert_batch(batch, indices, *, fmt, source, names, keys, roles, unused):
    out = {name: [] for name in CANONICAL_FEATURES}
    convert_row = _CONVERTERS[fmt]
    for j, record in enumerate(indices):
        at = Where(source, record, names)
        row = {field: batch[col][j] for field, col in names.items()}
        seen = [c for c in unused if batch[c][j] is not None]
        try:
            messages, text = convert_row(row, at, keys, roles, seen)
            tools = tools_of(row.get("tools"), at) if fmt != "text" else None
            kwargs = kwargs_of(row.get("chat_template_kwargs"), at)
            drop, detail = _drop_reason(messages, text, tools), None
        except RecipeError as e:  # one odd row is dropped with its reason, never the whole file
            messages, text, tools, kwargs, seen = [], None, None, None, []
            drop, detail = "malformed", str(e).removeprefix(f"{source}, ")
        out["messages"].append(messages)
        out["tools"].append(tools and json.dumps(tools, ensure_ascii=False))
        out["chat_template_kwargs"].append(kwargs)
        out["text"].append(text)
        out["drop"].append(drop)
        out["detail"].append(detail)
        out["unused"].append(list(dict.fromkeys(seen)))
    return out


def _drop_reason(messages, text, tools) -> str | None:
    if text is not None:
        return None if text.strip() else "empty_text"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn"
    for m in messages:
        if not m["content"].strip() and not m["tool_calls"]:
            return "empty_response" if m["role"] == "assistant" else "empty_content"
    if tools:  # a call to a function the row's own tools do not define would teach a made-up API
        known = {t["function"]["name"] for t in tools}
        if any(c["function"]["name"] not in known for m in messages if m["tool_calls"]
               for c in json.loads(m["tool_calls"])):
            return "unknown_tool"
    return None


# ---------------------------------------------------------------- one converter per format

def _alpaca(row, at, keys, roles, unused):
    messages = []
    _add(messages, "system", _string(row, "system", at, required=False))
    history = row.get("history")
    if history is not None and not isinstance(history, list):
        raise at.error(f"expected a list of [user, assistant] pairs, got {kind_of(history)}",
                       at.field("history"))
    for k, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise at.error("expected a [user, assistant] pair of strings",
                           f"{at.field('history')}[{k}]")
        _add(messages, "user", pair[0])
        _add_answer(messages, pair[1], None, at, f"{at.field('history')}[{k}][1]")
    instruction = _string(row, "instruction", at)
    extra = _string(row, "input", at, required=False)
    if extra is not None and extra.strip():
        _add(messages, "user", f"{instruction}\n\n{extra}", input=extra)
    else:
        _add(messages, "user", instruction)
    _add_answer(messages, _string(row, "output", at), _string(row, "reasoning", at, required=False),
                at, at.field("output"))
    return messages, None


def _instruction(row, at, keys, roles, unused):
    messages = []
    _add(messages, "system", _string(row, "system", at, required=False))
    _add(messages, "user", _string(row, "instruction", at))
    _add_answer(messages, _string(row, "response", at), _string(row, "reasoning", at, required=False),
                at, at.field("response"))
    return messages, None


def _sharegpt(row, at, keys, roles, unused):
    messages = []
    _add(messages, "system", _string(row, "system", at, required=False))
    messages += _chat(_required(row, "conversations", at), at, at.field("conversations"),
                      keys, roles, unused, row)
    return link_tool_results(messages, at, at.field("conversations")), None


def _messages(row, at, keys, roles, unused):
    messages = _chat(_required(row, "messages", at), at, at.field("messages"), keys, roles, unused, row)
    return link_tool_results(messages, at, at.field("messages")), None


def _prompt_completion(row, at, keys, roles, unused):
    prompt = _side(row, "prompt", "user", at, keys, roles, unused)
    for m in prompt:  # like TRL: only the completion is trained unless a message says otherwise
        if m["train"] is None:
            m["train"] = False
    messages = prompt + _side(row, "completion", "assistant", at, keys, roles, unused)
    return link_tool_results(messages, at, "prompt"), None


def _text(row, at, keys, roles, unused):
    return [], _string(row, "text", at)


_CONVERTERS = {"alpaca": _alpaca, "instruction": _instruction, "sharegpt": _sharegpt,
               "messages": _messages, "prompt_completion": _prompt_completion, "text": _text}


# ---------------------------------------------------------------- shared pieces

def _add(messages, role, content, *, input=None, train=None, reasoning=None, calls=None, name=None,
         call_id=None, inline=None):
    if role == "system" and (content is None or not content.strip()):
        return
    messages.append({"role": role, "content": content, "input": input, "train": train,
                     "reasoning_content": reasoning,
                     "tool_calls": json.dumps(calls, ensure_ascii=False) if calls else None,
                     "name": name, "tool_call_id": call_id, "inline_reasoning": inline})


def _add_answer(messages, content, reasoning, at, field, **extra):
    """An assistant message, its reasoning taken out of the text when the text carries it."""
    written = content
    content, inline = split_reasoning(content, at, field)
    if reasoning is not None and inline is not None and reasoning.strip() != inline.strip():
        raise at.error("reasoning is given both in a field and inside the text, and they differ", field,
                       hint="Keep one of them")
    reasoning = reasoning if reasoning is not None else inline
    # A `<think>` block's exact text (the answer is what follows it); Sky-T1's markers are not kept.
    think = inline is not None and written.lstrip().startswith("<think>") and written.endswith(content)
    block = written[: len(written) - len(content)] if think else None
    _add(messages, "assistant", content, reasoning=reasoning if reasoning and reasoning.strip() else None,
         inline=block if reasoning and reasoning.strip() else None, **extra)


def _required(row, field, at):
    value = row.get(field)
    if value is None:
        raise at.error("missing required field", at.field(field),
                       hint="Every record needs it; fix or remove the record")
    return value


def _string(row, field, at, *, required=True):
    value = _required(row, field, at) if required else row.get(field)
    if value is not None and not isinstance(value, str):
        raise at.error(f"expected a string, got {kind_of(value)}", at.field(field),
                       hint="Write it as a JSON string")
    return value


def _side(row, field, role, at, keys, roles, unused):
    """A prompt or completion: a plain string (one `role` turn) or a list of messages."""
    value = _required(row, field, at)
    if isinstance(value, str):
        messages = []
        (_add_answer(messages, value, None, at, at.field(field)) if role == "assistant"
         else _add(messages, role, value))
        return messages
    if isinstance(value, list):
        return _chat(value, at, at.field(field), keys, roles, unused, row)
    raise at.error(f"expected a string or a list of messages, got {kind_of(value)}", at.field(field))


def _chat(turns, at, field, keys, roles, unused, row):
    """The messages of a chat list; `tools` found in content parts (LLaMA-Factory) go to `row`."""
    if not isinstance(turns, list):
        raise at.error(f"expected a list of messages, got {kind_of(turns)}", field)
    messages = []
    known = {*keys["role"], *keys["content"], *_READ}
    for k, turn in enumerate(turns):
        path = f"{field}[{k}]"
        if not isinstance(turn, dict):
            raise at.error(f"expected a message object, got {kind_of(turn)}", path)
        unused += [f"{field}[].{key}" for key, v in turn.items() if key not in known and v is not None]
        source_role, role = _role(turn, at, path, keys["role"], roles, messages[-1]["role"] if messages else None)
        content_key, content = _first(turn, keys["content"])
        parts = _parts(content, at, f"{path}.{content_key}") if content is not None else {}
        text = parts.get("text") if content is not None else None
        calls = calls_of(turn, source_role, text, at, path) or parts.get("tool_call")
        if "tools" in parts:
            _part_tools(row, parts["tools"], at, f"{path}.{content_key}")
        if source_role.lower() in CALL_ROLES:
            text = ""
        if text is None and not calls:
            raise at.error("missing content", f"{path}.{content_key}",
                           hint="If your messages keep it under another key, map it with "
                                "`columns: {content: your_key}`")
        reasoning = _reasoning(turn, parts, at, path)
        if role != "assistant":
            if calls or reasoning is not None:
                what = "tool calls" if calls else "reasoning"
                raise at.error(f"{what} on a {role} message", path,
                               hint="Only assistant messages can carry them; check the role")
            _add(messages, role, text, train=_train(turn, at, path),
                 name=_optional_string(turn, "name", at, path),
                 call_id=_optional_string(turn, "tool_call_id", at, path))
        else:
            _add_answer(messages, text or "", reasoning, at, f"{path}.{content_key}",
                        train=_train(turn, at, path), calls=calls)
    return messages


def _first(turn, keys):
    """(key, value) for the first of `keys` the message has, else (keys[0], None)."""
    for key in keys:
        if turn.get(key) is not None:
            return key, turn[key]
    return keys[0], None


def _role(turn, at, path, keys, roles, before=None):
    """(the role as the data spells it, the canonical role); `before` is the previous message's role, which
    makes the hint for an unknown role guess from its place: the answer to a user turn is the assistant."""
    key, value = _first(turn, keys)
    if value is None:
        raise at.error("missing role", f"{path}.{key}",
                       hint="If your messages keep it under another key, map it with "
                            "`columns: {role: your_key}`")
    if not isinstance(value, str):
        raise at.error(f"expected a role string, got {kind_of(value)}", f"{path}.{key}")
    role = roles.get(value, roles.get(value.lower()))
    if role is None:
        guess = "assistant" if before == "user" else "user"
        raise at.error(f"unknown role '{value}'", f"{path}.{key}",
                       hint=f"Known roles: {', '.join(sorted(roles))}; map yours to the part it plays with "
                            f"`roles:` (`--roles` in the checker): `user` for the one asking, `assistant` "
                            f"only for the lines the model should learn to write, e.g. roles: {{{value}: {guess}}}")
    return value, role


def _parts(value, at, field) -> dict:
    """A message's content: a string, or a list of parts read by type: `text` (OpenAI's `text` or
    LLaMA-Factory's `value`), and LLaMA-Factory's `reasoning`, `tool_call` (a call as JSON) and `tools`
    parts. Returns {"text": the text parts back to back, as chat templates render them, and any
    "reasoning", "tool_call" (canonical calls) or "tools" (the schemas' JSON) found}."""
    if isinstance(value, str):
        return {"text": value}
    if not isinstance(value, list):
        raise at.error(f"expected a string or a list of text parts, got {kind_of(value)}", field)
    found = {"text": ""}
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None:
            raise at.error('expected a content part {"type": "text", "text": ...}', f"{field}[{i}]")
        body = part["text"] if part.get("text") is not None else part.get("value")  # Arrow fills the other with null
        if kind not in _PARTS:
            raise at.error(f"content part of type '{kind}' is not supported", f"{field}[{i}]",
                           hint=f"Parts of type {', '.join(_PARTS)} can be trained on; remove the part")
        if not isinstance(body, str):
            raise at.error(f"a '{kind}' part without its text (expected a string under \"text\" or \"value\")",
                           f"{field}[{i}]")
        if kind == "tool_call":
            found.setdefault("tool_call", []).append(_call_part(body, at, f"{field}[{i}].value"))
        elif kind == "text":
            found["text"] += body
        else:
            found[kind] = found.get(kind, "") + body
    return found


_PARTS = ("text", "reasoning", "tool_call", "tools")


def _call_part(body, at, field):
    try:
        call = json.loads(body)
    except ValueError as e:
        raise at.error(f"a tool_call part must hold the call as JSON ({e})", field) from None
    return call_of(call, at, field)


def _reasoning(turn, parts, at, path):
    """A message's reasoning field, or its reasoning parts; both must agree."""
    field, part = reasoning_of(turn, at, path), parts.get("reasoning")
    if field is not None and part is not None and field.strip() != part.strip():
        raise at.error("different reasoning in a field and in a reasoning part", path, hint="Keep one of them")
    return field if field is not None else part


def _part_tools(row, tools, at, field):
    if row.get("tools") not in (None, "", []):
        raise at.error("tools are given both in the row's `tools` and in a content part", field,
                       hint="Keep one of them")
    row["tools"] = tools


def _optional_string(turn, key, at, path):
    value = turn.get(key)
    if value is not None and not isinstance(value, str):
        raise at.error(f"expected a string, got {kind_of(value)}", f"{path}.{key}")
    return value


def _train(turn, at, path):
    train = turn.get("train")
    key = "weight" if turn.get("weight") is not None else "loss_weight"  # LLaMA-Factory's name
    weight = turn.get(key)
    if train is not None:
        if not isinstance(train, bool):
            raise at.error(f"expected true or false, got {kind_of(train)}", f"{path}.train")
        return train
    if weight is None:
        return None
    if not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise at.error(f"loss weight {weight!r} is not supported", f"{path}.{key}",
                       hint="Fractional loss weights are not supported: use 0 (don't train this "
                            "message) or 1 (train it)")
    return bool(weight)


