"""The embedded default's pieces: the shipped task, chat and tool-chat files are exactly what the generator writes,
and the tiny model builds once, offline, into something transformers loads."""
from collections import Counter

from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_recipes import formats, tiny


def test_shipped_task_file_is_what_the_generator_writes():
    assert tiny._dump(tiny.generate_tasks()) == tiny.DATA_FILE.read_text(encoding="utf-8")


def test_shipped_chats_file_is_what_the_generator_writes():
    assert tiny._dump_lines(tiny.generate_chats()) == tiny.CHATS_FILE.read_text(encoding="utf-8")


def test_shipped_tool_chats_file_is_what_the_generator_writes():
    assert tiny._dump_lines(tiny.generate_tool_chats()) == tiny.TOOLS_FILE.read_text(encoding="utf-8")


def test_shipped_identity_files_are_what_the_generator_writes():
    for path, rows in zip(tiny.IDENTITY_FILES, tiny.generate_identity()):
        assert tiny._dump_lines(rows) == path.read_text(encoding="utf-8")


def test_identity_eval_shares_no_question_with_training():
    train, identity, general = tiny.generate_identity()
    asked = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert (len(train), len(identity), len(general)) == (312, 18, 12)
    assert not asked(train) & (asked(identity) | asked(general))
    core = {q.split(": ")[-1].split(". ")[-1].split("! ")[-1].split(", ")[-1] for q in asked(train)}
    assert not core & asked(identity)  # no held-out phrasing is a training phrasing behind an opener
    answers = {r["messages"][1]["content"] for r in identity}
    assert answers == set(tiny.IDENTITY_ANSWERS.values())


def test_tool_chats_call_the_one_tool_they_offer_with_arguments_from_the_question():
    chats = tiny.generate_tool_chats()
    questions = [c["messages"][0]["content"] for c in chats]
    assert len(set(questions)) == len(chats)  # distinct: no eval question is also a training question
    kinds = Counter()
    for chat in chats:
        (tool,) = chat["tools"]
        calls = [c for m in chat["messages"] for c in m.get("tool_calls", [])]
        kinds["text" if not calls else "answer" if len(chat["messages"]) == 4 else "call"] += 1
        for c in calls:
            assert c["function"]["name"] == tool["function"]["name"]
            value = next(iter(c["function"]["arguments"].values()))
            assert all(part in chat["messages"][0]["content"] for part in value.split(" ") if part not in "*/")
    assert kinds == {"call": 280, "answer": 70, "text": 70}
    converted = formats.convert(chats, "messages", source="tiny_tools")
    assert set(converted["drop"]) == {None}


def test_chats_are_multi_turn_and_half_call_the_tool():
    chats = tiny.generate_chats()
    assert all(sum(t["from"] == "human" for t in c["conversations"]) >= 2 for c in chats)
    calls = [c for c in chats if "tools" in c]
    assert len(calls) == len(chats) // 2
    assert all([t["from"] for t in c["conversations"][-3:]] == ["function_call", "observation", "gpt"] for c in calls)


def test_tasks_mix_rows_with_and_without_input():
    rows = tiny.generate_tasks()
    with_input = sum(bool(r["input"]) for r in rows)
    assert 0.3 < with_input / len(rows) < 0.7
    assert all(r["instruction"] and r["output"] for r in rows)


def test_tiny_model_loads_offline_with_a_pad_distinct_from_eos():
    path = tiny.tiny_model_path()
    assert tiny.tiny_model_path() == path  # cached: the second call builds nothing
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.vocab_size >= len(tokenizer)
