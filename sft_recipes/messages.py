"""What a canonical message holds beyond its text, read from the many ways data writes it, and the view
chat templates receive.

Assistant messages carry their reasoning apart from their answer (a `reasoning_content`/`reasoning`/
`thinking` field, `<think>...</think>` at the start of the turn, or Sky-T1's thought/solution markers)
and their tool calls as structure (OpenAI's `[{"type": "function", "function": {"name", "arguments":
{...}}, "id"?}]`: from `tool_calls`, the legacy `function_call` key, or a ShareGPT `function_call`
turn), so that each model's own template prints both in its own syntax. Tool messages get the `name`
and `tool_call_id` of the call they answer. `tools` become the OpenAI list of `{"type": "function",
"function": schema}`; `chat_template_kwargs` are checked to be JSON the renderer does not set itself.
`chat_messages()` turns a stored conversation into what templates read.
"""
from __future__ import annotations

import json

from .errors import RecipeError, Where, kind_of

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
CALL_ROLES = ("function_call",)  # ShareGPT roles whose value is the call itself (JSON), not text
_THINK, _END_THINK = "<think>", "</think>"
_SKY = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")


# ---------------------------------------------------------------- reasoning

def split_reasoning(text: str, at, field) -> tuple[str, str | None]:
    """(answer, reasoning) from `<think>R</think>answer` or Sky-T1's markers; (text, None) without them.
    The split matches what reasoning templates (Qwen3, GLM) do with such text themselves."""
    lead = text.lstrip()
    if _SKY[0] in text or _SKY[1] in text:
        return _split_sky(text, at, field)
    if lead.startswith(_THINK):
        head, close, answer = lead[len(_THINK):].partition(_END_THINK)
        if not close:
            raise at.error("<think> is never closed with </think>", field)
        if _THINK in answer or _END_THINK in answer:
            raise at.error("a second <think> block in one answer", field,
                           hint="Put all of a turn's reasoning in one block at its start")
        return answer.lstrip("\n"), head.strip("\n")
    if lead.startswith(_END_THINK):  # a template that opens the block in its prompt: no reasoning here
        return _split_free(lead[len(_END_THINK):].lstrip("\n"), at, field), None
    return _split_free(text, at, field), None


def _split_free(text, at, field):
    if _THINK in text or _END_THINK in text:
        tag = _THINK if _THINK in text else _END_THINK
        raise at.error(f"{tag} inside the answer", field,
                       hint="Reasoning goes in one <think>...</think> block at the start of the turn "
                            "(or in a reasoning_content field)")
    return text


def _split_sky(text, at, field):
    bt, et, bs, es = _SKY
    parts = text.split(bt)
    if len(parts) != 2 or parts[0].strip() or text.count(et) != 1 or text.index(et) < text.index(bt):
        raise at.error(f"expected one {bt}...{et} block at the start of the answer", field)
    thought, _, rest = parts[1].partition(et)
    rest = rest.strip()
    if rest.startswith(bs) or bs in rest or es in rest:
        if not (rest.startswith(bs) and rest.endswith(es) and rest.count(bs) == rest.count(es) == 1):
            raise at.error(f"expected the answer in one {bs}...{es} block after the thought", field)
        rest = rest[len(bs):-len(es)].strip()
    return rest, thought.strip()


def reasoning_of(turn, at, path):
    """A message's reasoning field (any of `REASONING_KEYS`; several must agree), or None."""
    found = {k: turn[k] for k in REASONING_KEYS if turn.get(k) is not None}
    for key, value in found.items():
        if not isinstance(value, str):
            raise at.error(f"expected reasoning text, got {kind_of(value)}", f"{path}.{key}")
    if len({v.strip() for v in found.values()}) > 1:
        raise at.error(f"different reasoning in {' and '.join(found)}", path, hint="Keep one of them")
    return next(iter(found.values()), None)


# ---------------------------------------------------------------- tool calls and tools

def calls_of(turn, source_role, text, at, path):
    """The message's tool calls in the canonical shape, or None: OpenAI `tool_calls` (or the legacy
    `function_call` key), or a ShareGPT `function_call` turn whose value is the call(s) as JSON."""
    if source_role.lower() in CALL_ROLES:
        field = path + ".value"
        try:
            value = json.loads(text or "")
        except ValueError as e:
            raise at.error(f"a function_call turn must hold the call as JSON ({e})", field) from None
        calls = value if isinstance(value, list) else [value]
        if not calls:
            raise at.error("a function_call turn with no call", field)
    elif turn.get("tool_calls") is not None:
        calls, field = turn["tool_calls"], f"{path}.tool_calls"
        if not isinstance(calls, list):
            raise at.error(f"expected a list of tool calls, got {kind_of(calls)}", field)
    elif turn.get("function_call") is not None:
        calls, field = [turn["function_call"]], f"{path}.function_call"
    else:
        return None
    return [call_of(c, at, f"{field}[{i}]") for i, c in enumerate(calls)] or None


def call_of(call, at, field):
    """One tool call in the canonical shape (OpenAI's object, or a bare `{name, arguments}`)."""
    if not isinstance(call, dict):
        raise at.error(f"expected a tool call object, got {kind_of(call)}", field)
    if call.get("type", "function") != "function":
        raise at.error(f"tool call of type '{call['type']}' is not supported", f"{field}.type",
                       hint="Only function calls are")
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise at.error("a tool call without a function name", field)
    args = fn.get("arguments", fn.get("parameters", {}))  # Llama 3.1 writes `parameters`
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise at.error(f"arguments are not valid JSON ({e})", f"{field}.arguments") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise at.error(f"arguments must be an object (or a JSON string of one), got {kind_of(args)}",
                       f"{field}.arguments")
    # Nulls are taken as absent: Arrow fills the keys one row lacks but another has with null.
    out = {"type": "function", "function": {"name": name, "arguments": _without_nulls(args)}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def link_tool_results(messages, at, field):
    """Give each tool message the name (and id) of the call it answers: the k-th result after an
    assistant's calls answers the k-th call, unless it names its call by `tool_call_id`."""
    pending, by_id = [], {}
    for k, m in enumerate(messages):
        if m["tool_calls"]:
            pending = json.loads(m["tool_calls"])
            by_id.update({c["id"]: c for c in pending if "id" in c})
        elif m["role"] == "assistant":
            pending = []
        elif m["role"] == "tool":
            if m["tool_call_id"] is not None:
                call = by_id.get(m["tool_call_id"])
                if call is None:
                    raise at.error(f"a tool result answers tool_call_id '{m['tool_call_id']}', which no "
                                   "earlier call has", f"{field}[{k}]")
                pending = [c for c in pending if c is not call]
            elif pending:
                call = pending.pop(0)
            else:
                raise at.error("a tool result with no tool call before it", f"{field}[{k}]",
                               hint="Each tool (observation) message must follow the assistant call "
                                    "it answers")
            m["name"] = m["name"] or call["function"]["name"]
            m["tool_call_id"] = m["tool_call_id"] or call.get("id")
    return messages


def tools_of(value, at):
    """Tools as the OpenAI list [{"type": "function", "function": schema}]; bare schemas are wrapped.
    Blank or empty lists mean no tools."""
    field = at.field("tools")
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError as e:
            raise at.error(f"tools is not valid JSON ({e})", field) from None
    if value in ([], None):
        return None
    if not isinstance(value, list):
        raise at.error(f"tools must be a list of function schemas, got {kind_of(value)}", field,
                       hint="Wrap a single schema in a list")
    # Arrow fills keys one tool lacks but another has with null; those nulls are not the user's.
    return [_tool(_without_nulls(t), at, f"{field}[{i}]") for i, t in enumerate(value)]


def _tool(tool, at, field):
    wrapped = isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    schema = tool["function"] if wrapped else tool
    if not isinstance(schema, dict) or not isinstance(schema.get("name"), str) or not schema["name"]:
        raise at.error("expected a function schema with a name", field,
                       hint='e.g. {"name": "get_weather", "description": ..., "parameters": {...}}')
    if wrapped and tool.get("type", "function") != "function":
        raise at.error(f"tool of type '{tool['type']}' is not supported", f"{field}.type",
                       hint="Only function tools are")
    return {"type": "function", "function": schema}


def read_tools(value, source: str) -> list | None:
    """Tools given outside a dataset (a `--tools` file) under a row's rules: the OpenAI list, bare schemas
    wrapped, JSON text parsed; RecipeError naming `source` otherwise."""
    return tools_of(value, Where(source, None, {}))


def read_call(value, source: str) -> dict:
    """One tool call in the canonical shape, from OpenAI's object or a bare `{"name", "arguments"}` one
    (`parameters` for Llama; arguments as an object or JSON text of one); RecipeError when it is none."""
    return call_of(value, Where(source, None, {}), "tool_call")


# ---------------------------------------------------------------- chat_template_kwargs

def kwargs_of(value, at):
    field = at.field("chat_template_kwargs")
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except ValueError as e:
            raise at.error(f"not valid JSON ({e})", field) from None
    if value is None:
        return None
    value = _without_nulls(value) if isinstance(value, dict) else value
    check_kwargs(value, f"{at.source}, record {at.record}, field '{field}'")
    return json.dumps(value, ensure_ascii=False) if value else None


# Names the renderer itself passes: a kwarg with one of them would silently replace the real value.
_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
             "bos_token", "eos_token", "chat_template", "tokenize", "return_dict", "return_assistant_tokens_mask"}


def check_kwargs(kwargs, where: str) -> dict:
    """`chat_template_kwargs` (recipe or row): names to JSON values, none of them the renderer's own."""
    if not isinstance(kwargs, dict):
        raise RecipeError(f"{where}: chat_template_kwargs must map names to values, got {kind_of(kwargs)}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or key in _RESERVED:
            raise RecipeError(f"{where}: chat_template_kwargs cannot set '{key}': the renderer sets it")
        bad = _non_json(value)
        if bad is not None:
            raise RecipeError(f"{where}: chat_template_kwargs '{key}' has a value of type "
                              f"{type(bad).__name__}; use text, a number, true/false, or lists/maps of "
                              "them (quote dates: '2024-07-26')")
    return kwargs


def _non_json(value):
    """The first value inside `value` that JSON cannot hold, else None."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, (list, tuple)):
        return next((b for v in value if (b := _non_json(v)) is not None), None)
    if isinstance(value, dict):
        return next((b for k, v in value.items() if (b := k if not isinstance(k, str) else _non_json(v))
                     is not None), None)
    return value


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------- what templates receive

def chat_messages(messages, *, reasoning: str = "keep", as_written: bool = False) -> list[dict]:
    """Stored messages as templates read them: OpenAI-shaped dicts holding only the keys that have a
    value (templates test `'tool_calls' in message`), tool calls parsed, and the reasoning under each
    name released templates read (`reasoning_content`: Qwen, GLM, DeepSeek; `thinking`: gpt-oss;
    `reasoning`). `reasoning="drop"` leaves it out. `as_written`: an answer whose reasoning the data
    wrote inline gets it back in its content, exactly as written, and no reasoning field (templates
    that read reasoning only from content: DeepSeek-R1-Distill, QwQ)."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m["content"]}
        inline = m.get("inline_reasoning") if reasoning == "keep" else None
        if m.get("input") is not None:
            msg["input"] = m["input"]
        if inline is not None and as_written:
            msg["content"] = inline + m["content"]
        elif m.get("reasoning_content") is not None and reasoning == "keep":
            msg.update(dict.fromkeys(REASONING_KEYS, m["reasoning_content"]))
        if m.get("tool_calls"):
            msg["tool_calls"] = json.loads(m["tool_calls"])
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out
