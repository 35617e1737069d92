"""Every supported format becomes the same conversation rows; bad rows fail loudly, empty ones drop."""
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


def msg(role, content, input=None, train=None):
    return {"role": role, "content": content, "input": input, "train": train}


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
                   "tools": None, "text": None, "drop": None}


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
        {"from": "function_call", "value": '{"name": "weather"}'},
        {"from": "observation", "value": '{"sky": "grey"}'},
        {"from": "gpt", "value": "Grey."}]}], "sharegpt")
    assert row["messages"] == [msg("system", "Use tools."), msg("user", "Weather in Oslo?"),
                               msg("assistant", '{"name": "weather"}'),
                               msg("tool", '{"sky": "grey"}'), msg("assistant", "Grey.")]
    assert row["tools"] == tools


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
    assert json.loads(row["tools"]) == [{"name": "f", "parameters": {"type": "object"}}]


def test_messages_train_key():
    row = only([{"messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hey", "train": False}]}], "messages")
    assert row["messages"][1]["train"] is False


def test_messages_openai_tool_calls_become_text():
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    row = only([{"messages": [{"role": "user", "content": "Weather?"},
                              {"role": "assistant", "content": None, "tool_calls": [call]},
                              {"role": "tool", "content": "grey"},
                              {"role": "assistant", "content": "Grey."}]}], "messages")
    assert row["messages"][1] == msg("assistant", '{"name": "weather", "arguments": {"city": "Oslo"}}')


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
        "messages": [], "tools": None, "text": "Once upon a time.", "drop": None}


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


def test_unknown_role_names_it_and_the_option():
    with pytest.raises(RecipeError) as e:
        rows_of([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hey"}]}],
                "sharegpt")
    assert_mentions(e.value, "data.json", "record 0", "conversations[1].from", "unknown role 'bot'",
                    "gpt", "roles:")


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
])
def test_bad_values_are_errors(record, fmt, fragments):
    for data in as_inputs([record]):
        with pytest.raises(RecipeError) as e:
            convert(data, fmt, source="data.json")
        assert_mentions(e.value, "data.json, record 0", *fragments)


def test_error_names_the_record_index():
    records = [{"instruction": "a", "output": "b"}] * 5 + [{"instruction": "a", "output": None}]
    with pytest.raises(RecipeError, match="record 5, field 'output'"):
        rows_of(records, "alpaca")


def test_empty_dataset_is_an_error():
    with pytest.raises(RecipeError, match="empty"):
        convert(Dataset.from_dict({"text": []}), "text", source="data.json")


# ---------------------------------------------------------------- properties

_text = st.text(st.characters(codec="utf-8"), max_size=20)
_words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).filter(str.strip)
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


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function_call": "assistant",
                   "observation": "tool", "system": "system", "user": "user",
                   "assistant": "assistant", "tool": "tool"}


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
    "role": st.sampled_from(["user", "assistant", "tool"]),
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
