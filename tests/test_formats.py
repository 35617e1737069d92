"""Every supported format becomes the same conversation rows; bad rows drop with their error, empty ones with a reason."""
import json

import pyarrow as pa
import pytest
from datasets import Dataset, concatenate_datasets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_recipes.errors import RecipeError
from sft_recipes.formats import CANONICAL_FEATURES, FORMATS, ROLES, convert, detect_format


def as_inputs(records):
    """The records as a list (converted in memory) and, when Arrow can type them, as a Dataset."""
    try:
        return [records, Dataset.from_list(records)]
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed value types, e.g. strings and part lists
        return [records]


def rows_of(records, fmt, **options):
    """Canonical rows; both ways of converting must agree."""
    outputs = [convert(x, fmt, source="data.json", **options).to_list() for x in as_inputs(records)]
    assert all(out == outputs[0] for out in outputs)
    return outputs[0]


def msg(role, content, input=None, train=None, reasoning=None, calls=None, name=None, call_id=None, inline=None):
    return {"role": role, "content": content, "input": input, "train": train, "reasoning_content": reasoning,
            "tool_calls": json.dumps(calls) if calls else None, "name": name, "tool_call_id": call_id,
            "inline_reasoning": inline}


def call(name, arguments, id=None):
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**out, "id": id} if id else out


def assert_mentions(error, *fragments):
    missing = [f for f in fragments if f not in str(error)]
    assert not missing, f"{missing} not in: {error}"


def only(records, fmt, **options):
    (row,) = rows_of(records, fmt, **options)
    return row


# ---------------------------------------------------------------- each format

def test_alpaca_with_system_history_and_input():
    row = only([{"system": "Be kind.", "history": [["Hi", "Hello!"]], "instruction": "Translate.",
                 "input": "chat", "output": "cat"}], "alpaca")
    assert row == {"messages": [msg("system", "Be kind."), msg("user", "Hi"),
                                msg("assistant", "Hello!"),
                                msg("user", "Translate.\n\nchat", input="chat"),
                                msg("assistant", "cat")],
                   "tools": None, "chat_template_kwargs": None, "text": None, "drop": None, "detail": None,
                   "unused": []}


@pytest.mark.parametrize("blank", ["", "  \n", None])
def test_alpaca_blank_input_is_no_input(blank):
    row = only([{"instruction": "Say hi.", "input": blank, "output": "Hi!"}], "alpaca")
    assert row["messages"] == [msg("user", "Say hi."), msg("assistant", "Hi!")]


def test_instruction_response():
    row = only([{"instruction": "Say hi.", "response": "Hi!"}], "instruction")
    assert row["messages"] == [msg("user", "Say hi."), msg("assistant", "Hi!")]


def test_sharegpt_tool_turns_system_and_tools():
    tools = json.dumps([{"name": "weather", "parameters": {}}])
    row = only([{"system": "Use tools.", "tools": tools, "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": '{"sky": "grey"}'},
        {"from": "gpt", "value": "Grey."}]}], "sharegpt")
    assert row["messages"] == [msg("system", "Use tools."), msg("user", "Weather in Oslo?"),
                               msg("assistant", "", calls=[call("weather", {"city": "Oslo"})]),
                               msg("tool", '{"sky": "grey"}', name="weather"), msg("assistant", "Grey.")]
    assert json.loads(row["tools"]) == [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def test_sharegpt_function_call_turn_with_several_calls_answered_in_order():
    row = only([{"conversations": [
        {"from": "human", "value": "Weather in Oslo and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Oslo"}},
                                                       {"name": "weather", "arguments": '{"city": "Rome"}'}])},
        {"from": "observation", "value": "grey"}, {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Grey, then sunny."}]}], "sharegpt")
    calls = json.loads(row["messages"][1]["tool_calls"])
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert [m["name"] for m in row["messages"][2:4]] == ["weather", "weather"]


def test_function_call_turn_followed_by_text_stays_two_turns():
    row = only([{"conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w", "arguments": {}}'},
        {"from": "gpt", "value": "Let me check."}]}], "sharegpt")
    assert [(m["role"], m["content"], bool(m["tool_calls"])) for m in row["messages"]] == [
        ("user", "Weather?", False), ("assistant", "", True), ("assistant", "Let me check.", False)]


def test_sharegpt_accepts_chat_roles_and_keys():
    row = only([{"conversations": [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello!"}]}], "sharegpt")
    assert row["messages"] == [msg("user", "Hi"), msg("assistant", "Hello!")]


def test_sharegpt_empty_tools_are_no_tools():
    rows = rows_of([{"conversations": [{"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hey"}], "tools": t}
                    for t in ("", "[]")], "sharegpt")
    assert [r["tools"] for r in rows] == [None, None]


def test_messages_parts_tools_and_train_flags():
    row = only([{"messages": [
        {"role": "system", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": "Draft", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Final", "weight": 1}],
        "tools": [{"name": "f", "parameters": {"type": "object"}}]}], "messages")
    assert row["messages"] == [msg("user", "Two parts"), msg("assistant", "Draft", train=False),
                               msg("user", "Again"), msg("assistant", "Final", train=True)]
    assert json.loads(row["tools"]) == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_messages_train_key():
    row = only([{"messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hey", "train": False}]}], "messages")
    assert row["messages"][1]["train"] is False


def test_messages_openai_tool_calls_keep_their_structure_and_ids():
    calls = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
             {"id": "c2", "type": "function", "function": {"name": "time", "arguments": {"tz": "CET"}}}]
    row = only([{"messages": [{"role": "user", "content": "Weather and time?"},
                              {"role": "assistant", "content": None, "tool_calls": calls},
                              {"role": "tool", "content": "10:00", "tool_call_id": "c2"},
                              {"role": "tool", "content": "grey"},
                              {"role": "assistant", "content": "Grey at ten."}]}], "messages")
    assert row["messages"][1] == msg("assistant", "", calls=[call("weather", {"city": "Oslo"}, "c1"),
                                                            call("time", {"tz": "CET"}, "c2")])
    assert row["messages"][2] == msg("tool", "10:00", name="time", call_id="c2")
    assert row["messages"][3] == msg("tool", "grey", name="weather", call_id="c1")


@pytest.mark.parametrize("record, reasoning, answer", [
    ({"role": "assistant", "content": "4", "reasoning_content": "2+2"}, "2+2", "4"),
    ({"role": "assistant", "content": "4", "reasoning": "2+2"}, "2+2", "4"),
    ({"role": "assistant", "content": "4", "thinking": "2+2"}, "2+2", "4"),
    ({"role": "assistant", "content": "<think>\n2+2\n</think>\n\n4"}, "2+2", "4"),
    ({"role": "assistant", "content": "<think>2+2</think>4", "reasoning_content": "2+2"}, "2+2", "4"),
    ({"role": "assistant", "content": "\n</think>\n\n4"}, None, "4"),
    ({"role": "assistant", "content": "<|begin_of_thought|>\n\n2+2\n\n<|end_of_thought|>\n\n"
                                      "<|begin_of_solution|>\n\n4\n\n<|end_of_solution|>"}, "2+2", "4"),
    ({"role": "assistant", "content": "<think>\n\n</think>\n\n4"}, None, "4"),
])
def test_reasoning_from_every_layout(record, reasoning, answer):
    row = only([{"messages": [{"role": "user", "content": "2+2?"}, record]}], "messages")
    assert (row["messages"][1]["reasoning_content"], row["messages"][1]["content"]) == (reasoning, answer)


def test_reasoning_from_a_column_and_inline_in_sharegpt():
    row = only([{"Question": "2+2?", "CoT": "Add them.", "Response": "4"}], "alpaca",
               columns={"instruction": "Question", "reasoning": "CoT", "output": "Response"})
    assert row["messages"][1] == msg("assistant", "4", reasoning="Add them.")
    row = only([{"conversations": [{"from": "human", "value": "2+2?"},
                                   {"from": "gpt", "value": "<think>\nAdd them.\n</think>\n\n4"}]}], "sharegpt")
    assert row["messages"][1] == msg("assistant", "4", reasoning="Add them.", inline="<think>\nAdd them.\n</think>\n\n")


def test_unused_fields_are_listed_per_row():
    rows = rows_of([{"id": 7, "messages": [{"role": "user", "content": "Hi", "meta": {"lang": "en"}},
                                          {"role": "assistant", "content": "Hey"}]},
                    {"id": None, "messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hi"}]}],
                   "messages")
    assert [r["unused"] for r in rows] == [["id", "messages[].meta"], []]


def test_a_call_to_a_function_the_tools_do_not_define_is_dropped():
    row = only([{"messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "", "tool_calls": [call("nope", {})]},
                              {"role": "tool", "content": "?"}, {"role": "assistant", "content": "Done."}],
                 "tools": [{"name": "weather", "parameters": {}}]}], "messages")
    assert row["drop"] == "unknown_tool"


def test_prompt_completion_strings_and_lists():
    plain = only([{"prompt": "2+2=", "completion": "4"}], "prompt_completion")
    assert plain["messages"] == [msg("user", "2+2=", train=False), msg("assistant", "4")]
    chat = only([{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                             {"role": "user", "content": "Again"}],
                  "completion": [{"role": "assistant", "content": "Yo again"}]}], "prompt_completion")
    assert chat["messages"] == [msg("user", "Hi", train=False), msg("assistant", "Yo", train=False),
                                msg("user", "Again", train=False), msg("assistant", "Yo again")]


def test_text():
    assert only([{"text": "Once upon a time."}], "text") == {
        "messages": [], "tools": None, "chat_template_kwargs": None, "text": "Once upon a time.", "drop": None,
        "detail": None, "unused": []}


def test_every_format_concatenates():
    parts = [convert(Dataset.from_list(r), f, source="x") for f, r in [
        ("alpaca", [{"instruction": "a", "output": "b"}]),
        ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]),
        ("messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]),
        ("prompt_completion", [{"prompt": "a", "completion": "b"}]),
        ("text", [{"text": "ab"}]),
    ]]
    assert all(p.features == CANONICAL_FEATURES for p in parts)
    assert len(concatenate_datasets(parts)) == 5


def LF(role, *parts, weight=None):
    """A message in LLaMA-Factory's messages format: typed content parts holding their `value`."""
    out = {"role": role, "content": [{"type": kind, "value": value} for kind, value in parts]}
    return {**out, "loss_weight": weight} if weight is not None else out


def test_llama_factory_messages_with_parts_and_loss_weights():
    tools = [{"type": "function", "function": {"name": "multiply", "parameters": {"type": "object"}}}]
    row = only([{"messages": [
        LF("system", ("text", "Be exact."), ("tools", json.dumps(tools)), weight=0.0),
        LF("user", ("text", "6*8?"), weight=0.0),
        LF("assistant", ("reasoning", "Multiply."), ("tool_call", json.dumps({"name": "multiply", "arguments":
                                                                               {"a": 6, "b": 8}})), weight=0.0),
        LF("tool", ("text", "48")),
        LF("assistant", ("text", "It is "), ("text", "48."), weight=1.0)]}], "messages")
    assert row["messages"] == [
        msg("system", "Be exact.", train=False), msg("user", "6*8?", train=False),
        msg("assistant", "", train=False, reasoning="Multiply.", calls=[call("multiply", {"a": 6, "b": 8})]),
        msg("tool", "48", name="multiply"), msg("assistant", "It is 48.", train=True)]
    assert json.loads(row["tools"]) == tools and row["drop"] is None and row["unused"] == []


def test_text_parts_may_mix_openai_and_llama_factory_keys():
    """As Arrow stores them: every part gets both keys, the one it lacks null."""
    parts = [{"type": "text", "text": "It is ", "value": None}, {"type": "text", "text": None, "value": "48."}]
    row = only([{"messages": [{"role": "user", "content": "6*8?"}, {"role": "assistant", "content": parts}]}],
               "messages")
    assert row["messages"][1]["content"] == "It is 48."


@pytest.mark.parametrize("content, fragments", [
    ([{"type": "text"}], ["content[0]", "'text' part without its text"]),
    ([{"type": "image_url", "value": "cat.png"}], ["content[0]", "type 'image_url' is not supported",
                                                  "text, reasoning, tool_call, tools"]),
    ([{"type": "tool_call", "value": "{oops"}], ["content[0].value", "must hold the call as JSON"]),
])
def test_llama_factory_parts_that_cannot_be_read(content, fragments):
    (error,) = malformed([{"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": content}]}], "messages")
    assert_mentions(error, "record 0", "messages[1]", *fragments)


# ---------------------------------------------------------------- mapping options

def test_column_mapping_alpaca():
    row = only([{"question": "Say hi.", "answer": "Hi!"}], "alpaca",
               columns={"instruction": "question", "output": "answer"})
    assert row["messages"] == [msg("user", "Say hi."), msg("assistant", "Hi!")]


def test_column_mapping_lists_and_message_keys():
    turns = [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hey"}]
    expected = [msg("user", "Hi"), msg("assistant", "Hey")]
    assert only([{"dialog": turns}], "messages",
                columns={"messages": "dialog", "role": "from", "content": "value"})["messages"] == expected
    assert only([{"turns": turns}], "sharegpt", columns={"conversations": "turns"})["messages"] == expected


def test_role_mapping_merges_over_defaults():
    row = only([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hey"}]}],
               "sharegpt", roles={"bot": "assistant"})
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def malformed(records, fmt, **options) -> list:
    """Each row's error, for rows dropped as malformed (None for the others)."""
    return [row["detail"] if row["drop"] == "malformed" else None for row in rows_of(records, fmt, **options)]


def test_unknown_role_names_it_and_the_option():
    (error,) = malformed([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hey"}]}],
                         "sharegpt")
    assert_mentions(error, "record 0", "conversations[1].from", "unknown role 'bot'", "gpt", "roles:")


def test_unknown_role_hint_guesses_from_its_place():
    """A turn answering a user turn is the assistant's; one that opens or follows an answer is the user's."""
    answer, opener = malformed([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hey"}]},
                                {"conversations": [{"from": "customer", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}],
                               "sharegpt")
    assert "roles: {bot: assistant}" in answer and "{bot: user}" not in answer
    assert "roles: {customer: user}" in opener


@pytest.mark.parametrize("options, fragment", [
    ({"roles": {"bot": "robot"}}, "roles: 'bot' is mapped to 'robot'"),
    ({"columns": {"answer": "output"}}, "unknown field 'answer'"),
    ({"columns": {"system": "sys"}}, "'system' is mapped to column 'sys'"),
    ({"columns": {"role": "from"}}, "has no message lists"),
])
def test_bad_mapping_options(options, fragment):
    with pytest.raises(RecipeError, match=fragment):
        rows_of([{"instruction": "a", "output": "b"}], "alpaca", **options)


# ---------------------------------------------------------------- detection

@pytest.mark.parametrize("columns, fmt", [
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "response"], "instruction"),
    (["conversations", "tools"], "sharegpt"),
    (["messages"], "messages"),
    (["prompt", "completion"], "prompt_completion"),
    (["text", "meta"], "text"),
    (["instruction", "input", "output", "text"], "alpaca"),  # a rendered `text` column is common
])
def test_detect(columns, fmt):
    assert detect_format(columns, "data.json") == fmt


def test_detect_with_column_mapping():
    assert detect_format(["question", "answer"], "d", columns={"instruction": "question",
                                                              "output": "answer"}) == "alpaca"


def test_detect_ambiguous():
    with pytest.raises(RecipeError) as e:
        detect_format(["instruction", "output", "response"], "data.json")
    assert_mentions(e.value, "data.json", "alpaca", "instruction", "format:")


def test_detect_nothing_lists_columns_and_formats():
    with pytest.raises(RecipeError) as e:
        detect_format(["question", "answer"], "data.json")
    assert_mentions(e.value, "question, answer", "alpaca (instruction, output)",
                    "sharegpt (conversations)", "columns:")
    assert set(FORMATS) == {"alpaca", "instruction", "sharegpt", "messages", "prompt_completion", "text"}


# ---------------------------------------------------------------- drops and errors

@pytest.mark.parametrize("record, fmt, reason", [
    ({"instruction": "Say hi.", "output": " "}, "alpaca", "empty_response"),
    ({"instruction": " ", "output": "Hi"}, "alpaca", "empty_content"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "messages", "no_assistant_turn"),
    ({"messages": []}, "messages", "no_assistant_turn"),
    ({"prompt": "Hi", "completion": ""}, "prompt_completion", "empty_response"),
    ({"text": "\n"}, "text", "empty_text"),
])
def test_unusable_rows_drop(record, fmt, reason):
    assert only([record], fmt)["drop"] == reason


def THINK(content, **fields):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content, **fields}]}


def CALL(fn, id=None):
    tool_call = {"type": "function", "function": fn, **({"id": id} if id else {})}
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [tool_call]},
                         {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("record, fmt, fragments", [
    ({"instruction": "a", "output": 3}, "alpaca", ["field 'output'", "expected a string, got a number"]),
    ({"instruction": "a", "output": None}, "alpaca", ["field 'output'", "missing required field"]),
    ({"messages": "hi"}, "messages", ["field 'messages'", "expected a list of messages"]),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", ["messages[0].content", "got a number"]),
    ({"messages": [{"role": "user"}]}, "messages", ["messages[0].content", "missing content"]),
    ({"messages": [{"content": "x"}]}, "messages", ["messages[0].role", "missing role"]),
    ({"messages": [{"role": "user", "content": "x", "weight": 0.5}]}, "messages",
     ["messages[0].weight", "loss weight 0.5 is not supported", "use 0"]),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "x"}]}]}, "messages",
     ["messages[0].content[0]", "type 'image' is not supported"]),
    ({"conversations": [{"from": "human", "value": "x"}], "tools": "{oops"}, "sharegpt",
     ["field 'tools'", "not valid JSON"]),
    ({"prompt": 1, "completion": "x"}, "prompt_completion", ["field 'prompt'", "a string or a list"]),
    # reasoning
    (THINK("<think>a</think>b", reasoning_content="c"), "messages", ["messages[1].content", "both in a field"]),
    (THINK("<think>never closed"), "messages", ["messages[1].content", "never closed"]),
    (THINK("answer</think>"), "messages", ["messages[1].content", "</think> inside the answer"]),
    (THINK("a <think>b</think>"), "messages", ["messages[1].content", "<think> inside the answer"]),
    (THINK("<|begin_of_thought|>x"), "messages", ["messages[1].content", "<|begin_of_thought|>"]),
    ({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}, {"role": "assistant", "content": "a"}]},
     "messages", ["messages[0]", "reasoning on a user message"]),
    (THINK("b", reasoning_content=3), "messages", ["messages[1].reasoning_content", "expected reasoning text"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chat_template_kwargs": {"when": {"d": [1, {2}]}}}, "messages", ["chat_template_kwargs 'when'", "type set"]),
    # tool calls and tools
    (CALL({"arguments": {}}), "messages", ["messages[1].tool_calls[0]", "without a function name"]),
    (CALL({"name": "f", "arguments": "[1, 2]"}), "messages", ["tool_calls[0].arguments", "must be an object"]),
    (CALL({"name": "f", "arguments": "{oops"}), "messages", ["tool_calls[0].arguments", "not valid JSON"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "a"}]}, "messages", ["messages[1]", "no tool call before it"]),
    ({"messages": [{"role": "user", "content": "q"}, *CALL({"name": "f"}, "c1")["messages"][1:2],
                   {"role": "tool", "content": "r", "tool_call_id": "c9"}, {"role": "assistant", "content": "a"}]},
     "messages", ["messages[2]", "tool_call_id 'c9'"]),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": '{"name": "f"}'},
     "sharegpt", ["field 'tools'", "list of function schemas"]),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": '[{"description": "f"}]'},
     "sharegpt", ["field 'tools[0]'", "function schema with a name"]),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "call f"}]},
     "sharegpt", ["conversations[1].value", "must hold the call as JSON"]),
])
def test_bad_values_drop_the_row_with_its_error(record, fmt, fragments):
    (row,) = rows_of([record], fmt)
    assert (row["drop"], row["messages"], row["text"]) == ("malformed", [], None)
    assert_mentions(row["detail"], "record 0", *fragments)


def test_one_bad_row_among_good_ones_drops_alone():
    records = [{"instruction": "a", "output": "b"}] * 5 + [{"instruction": "a", "output": None}]
    assert malformed(records, "alpaca") == [None] * 5 + [
        "record 5, field 'output': missing required field. Every record needs it; fix or remove the record"]


def test_empty_dataset_is_an_error():
    with pytest.raises(RecipeError, match="empty"):
        convert(Dataset.from_dict({"text": []}), "text", source="data.json")


# ---------------------------------------------------------------- properties

_TAGS = ("<think>", "</think>", "<|begin_of_thought|>", "<|end_of_thought|>")  # reasoning markers: tested above
_text = st.text(st.characters(codec="utf-8"), max_size=20).filter(lambda t: not any(tag in t for tag in _TAGS))
_words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).filter(
    lambda t: t.strip() and not any(tag in t for tag in _TAGS))
_quick = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_quick
@given(st.lists(st.fixed_dictionaries({"instruction": _words, "input": _text, "output": _text}),
                min_size=1, max_size=5))
def test_alpaca_properties(records):
    for rec, row in zip(records, rows_of(records, "alpaca")):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == rec["output"]
        if rec["input"].strip():
            assert user["content"] == rec["instruction"] + "\n\n" + rec["input"]
            assert user["input"] == rec["input"]
        else:
            assert (user["content"], user["input"]) == (rec["instruction"], None)
        assert row["drop"] == (None if rec["output"].strip() else "empty_response")


# Tool turns need a call before them (and function_call turns hold JSON): tested on their own above.
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


@_quick
@given(st.lists(st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
    {"from": st.sampled_from(sorted(_SHAREGPT_ROLES)), "value": _text}), min_size=1, max_size=6)}),
    min_size=1, max_size=5))
def test_sharegpt_properties(records):
    for rec, row in zip(records, rows_of(records, "sharegpt")):
        turns = rec["conversations"]
        assert {m["role"] for m in row["messages"]} <= set(ROLES)
        assert [m["content"] for m in row["messages"] if m["role"] == "assistant"] == [
            t["value"] for t in turns if _SHAREGPT_ROLES[t["from"]] == "assistant"]
        has_assistant = any(_SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns)
        if not has_assistant:
            assert row["drop"] == "no_assistant_turn"
        elif row["drop"] is None:
            assert all(m["content"].strip() for m in row["messages"])
        else:
            assert row["drop"] in ("empty_response", "empty_content")


@_quick
@given(st.lists(st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system"]),
    "content": st.one_of(_words, st.lists(_words, min_size=1, max_size=3)),
    "weight": st.sampled_from([None, 0, 1])}), min_size=1, max_size=6)}), min_size=1, max_size=5))
def test_messages_properties(records):
    for rec in records:
        for m in rec["messages"]:
            if isinstance(m["content"], list):
                m["content"] = [{"type": "text", "text": t} for t in m["content"]]
    for rec, row in zip(records, rows_of(records, "messages")):
        assert len(row["messages"]) == len(rec["messages"])
        for src, out in zip(rec["messages"], row["messages"]):
            parts = src["content"]
            text = parts if isinstance(parts, str) else "".join(p["text"] for p in parts)
            assert (out["role"], out["content"]) == (src["role"], text)
            assert out["train"] == (None if src["weight"] is None else bool(src["weight"]))
        has_assistant = any(m["role"] == "assistant" for m in rec["messages"])
        assert row["drop"] == (None if has_assistant else "no_assistant_turn")
