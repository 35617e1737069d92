"""Loading from files, folders, globs and the Hub; mixing by weight; the datasets cache."""
import collections
import functools
import os
import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, shared_file
from sft_recipes.errors import RecipeError
from sft_recipes.formats import ROLES
from sft_recipes.sources import DatasetSpec, load_conversations, split_eval

ALPACA = [{"instruction": f"Question {i}?", "input": "ctx" if i % 3 == 0 else "",
           "output": f"Answer {i}."} for i in range(12)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load(path, **spec):
    return load_conversations([DatasetSpec(str(path), **spec)])


def outputs(ds):
    return [row["messages"][-1]["content"] for row in ds]


# ---------------------------------------------------------------- the shared real data

@pytest.mark.parametrize("name, rows, with_input, roles", [
    ("instruction-data.json", 1100, 325, {"user", "assistant"}),
    ("alpaca_en_demo.json", 999, 412, {"user", "assistant"}),
    ("glaive_toolcall_en_demo.json", 300, 0, {"user", "assistant", "tool"}),
])
def test_shared_files_load_with_auto_format(name, rows, with_input, roles):
    ds, drops = load(shared_file(name))
    assert (len(ds), drops) == (rows, collections.Counter())  # measured: no row is unusable
    seen = collections.Counter(m["role"] for conv in ds["messages"] for m in conv)
    assert set(seen) == roles and set(seen) <= set(ROLES)
    assert sum(m["input"] is not None for conv in ds["messages"] for m in conv) == with_input


def test_glaive_keeps_tools_and_tool_turns():
    ds, _ = load(shared_file("glaive_toolcall_en_demo.json"))
    assert sum(r["tools"] is not None for r in ds) == 191  # the other 109 rows have "" or "[]"
    assert all(json.loads(r["tools"]) for r in ds if r["tools"])


# ---------------------------------------------------------------- local files

def test_jsonl_parquet_csv_json_all_load_alike(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ALPACA)
    (tmp_path / "d.json").write_text(json.dumps(ALPACA))
    pd.DataFrame(ALPACA).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(ALPACA).to_csv(tmp_path / "d.csv", index=False)
    seen = {}
    for suffix in ("jsonl", "json", "parquet", "csv"):
        ds, _ = load(tmp_path / f"d.{suffix}", weight=None)
        seen[suffix] = sorted(tuple(m["content"] for m in conv) for conv in ds["messages"])
    assert len(seen["jsonl"]) == 12
    assert ("Question 0?\n\nctx", "Answer 0.") in seen["jsonl"]
    assert all(v == seen["jsonl"] for v in seen.values())  # CSV's empty cells mean no input too


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nWhat is 6*7?,,42\nSay NA.,,NA\n', encoding="utf-8")
    ds, _ = load(path)
    assert sorted(outputs(ds)) == ["42", "NA"]


def test_folder_and_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ALPACA[:5])
    write_jsonl(tmp_path / "b.jsonl", ALPACA[5:])
    (tmp_path / "README.md").write_text("not data")  # ignored in a folder
    assert len(load(tmp_path)[0]) == 12
    assert len(load(tmp_path / "a*.jsonl")[0]) == 5
    assert len(load_conversations([{"path": str(tmp_path), "data_files": "b.jsonl"}])[0]) == 7


def test_folder_mixing_file_types_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    pd.DataFrame(ALPACA).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(RecipeError, match="mixes file types"):
        load(tmp_path)


def test_mixed_types_keep_strings_that_look_like_json(tmp_path):
    # `content` is a string in some messages and text parts in others, so `datasets` stores it
    # as Json; strings such as "42" or '{"temp": 20}' must still arrive as those exact strings.
    records = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "6*7?"}]},
                             {"role": "assistant", "content": "42"}]},
               {"messages": [{"role": "user", "content": "Weather?"},
                             {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather"}}]},
                             {"role": "tool", "content": '{"temp": 20}'},
                             {"role": "assistant", "content": '"Warm"'}]}]
    ds, _ = load(write_jsonl(tmp_path / "mixed.jsonl", records))
    contents = sorted(m["content"] for conv in ds["messages"] for m in conv)
    assert contents == sorted(["6*7?", "42", "Weather?", "", '{"temp": 20}', '"Warm"'])


def test_mixed_type_file_is_converted_in_chunks_into_a_memory_mapped_file(tmp_path, monkeypatch):
    """Records `datasets` cannot type are read a line at a time and written to an Arrow file in the datasets
    cache, a chunk at a time: nothing per row stays in memory, and the same file loads from that file again."""
    from sft_recipes import formats, sources
    monkeypatch.setattr(formats, "_convert_records", functools.partial(formats._convert_records, chunk=7))
    records = [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"q{i}"}] if i % 2 else f"q{i}"},
                             {"role": "assistant", "content": f"a{i}"}]} for i in range(30)]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    first, fmt, _ = sources._prepare(DatasetSpec(str(path)), num_proc=None, strict=False)
    assert isinstance(sources._load(DatasetSpec(str(path)), [str(path)]), sources.Records)
    assert [m["content"] for conv in first["messages"] for m in conv] == [t for i in range(30) for t in (f"q{i}", f"a{i}")]
    assert first["record"] == list(range(30))
    arrow = [f["filename"] for f in first.cache_files if "records-" in f["filename"]]
    assert len(arrow) == 1 and not list(Path(arrow[0]).parent.glob("*.part"))  # renamed once complete
    again, _, _ = sources._prepare(DatasetSpec(str(path)), num_proc=None, strict=False)
    assert [f["filename"] for f in again.cache_files if "records-" in f["filename"]] == arrow


def test_mixed_type_file_with_a_bad_byte_names_its_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "ok"}]})
             for c in ("text", [{"type": "text", "text": "parts"}])]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    with pytest.raises(RecipeError, match=r"line 3.*not valid UTF-8: byte 0xff|not valid UTF-8: byte 0xff.*line 3"):
        load(path)


def test_missing_local_file(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load(tmp_path / "nope.jsonl")


def test_offline_hub_id_says_so():
    with pytest.raises(RecipeError) as e:
        load("someone/some_dataset")
    message = str(e.value)
    assert "someone/some_dataset" in message and "Hub is unreachable" in message
    assert "file path" in message


# ---------------------------------------------------------------- drops, weights, mixing

def test_drops_are_counted_and_removed_or_strict(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA + [{"instruction": "Q?", "output": "  "}])
    ds, drops = load(path)
    assert (len(ds), drops) == (12, collections.Counter({"empty_response": 1}))
    with pytest.raises(RecipeError, match=r"1 of 13 records are unusable \(1 empty_response"):
        load_conversations([DatasetSpec(str(path))], strict=True)


@pytest.mark.parametrize("weight, rows", [(0.5, 6), (1, 12), (5, 5), (30, 30)])
def test_weights_are_deterministic(tmp_path, weight, rows):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    first, _ = load_conversations([DatasetSpec(str(path), weight=weight)], seed=7)
    again, _ = load_conversations([DatasetSpec(str(path), weight=weight)], seed=7)
    assert len(first) == rows and outputs(first) == outputs(again)
    if weight == 30:  # 12 rows to 30: every row twice, six of them a third time
        assert sorted(collections.Counter(outputs(first)).values()) == [2] * 6 + [3] * 6


def test_different_seeds_pick_differently(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    picks = {tuple(sorted(outputs(load_conversations([DatasetSpec(str(path), weight=0.5)],
                                                     seed=s)[0]))) for s in range(4)}
    assert len(picks) > 1


@pytest.mark.parametrize("weight", [0, -1, 2.5, True, "half"])
def test_bad_weights(weight):
    with pytest.raises(RecipeError, match="weight"):
        DatasetSpec.from_dict({"path": "d.jsonl", "weight": weight}, "recipe.yaml: datasets[0]")


def test_spec_unknown_key_suggests_the_closest():
    with pytest.raises(RecipeError, match="unknown key 'fromat'. Did you mean 'format'"):
        DatasetSpec.from_dict({"path": "d.jsonl", "fromat": "alpaca"}, "recipe.yaml")


def test_mixing_formats_with_column_and_role_mapping(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(4)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": [
        {"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hey"}]}] * 3)
    specs = [{"path": str(qa), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}},
             {"path": str(chat), "columns": {"messages": "dialog", "role": "speaker",
                                             "content": "text"},
              "roles": {"me": "user", "bot": "assistant"}}]
    ds, _ = load_conversations(specs, seed=1)
    assert len(ds) == 7 and ds.column_names == ["messages", "tools", "chat_template_kwargs", "text", "unused",
                                                "source", "record"]
    assert sorted(zip(ds["source"], ds["record"])) == sorted([(str(qa), i) for i in range(4)]
                                                             + [(str(chat), i) for i in range(3)])
    assert load_conversations(specs, seed=1)[0]["messages"] == ds["messages"]  # same shuffle


def test_num_proc_gives_the_same_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA * 4)
    assert load(path, weight=None)[0]["messages"] == load_conversations(
        [DatasetSpec(str(path))], num_proc=2)[0]["messages"]


def test_split_eval(tmp_path):
    ds, _ = load(write_jsonl(tmp_path / "d.jsonl", ALPACA))
    train, evals = split_eval(ds, 0.25, seed=3)
    assert (len(train), len(evals)) == (9, 3)
    assert set(outputs(train)).isdisjoint(outputs(evals))
    with pytest.raises(RecipeError, match="fraction"):
        split_eval(ds, 1.5, seed=3)


# ---------------------------------------------------------------- cache

def test_second_load_reuses_the_cache(tmp_path):
    records = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}. " * 20}
               for i in range(5000)]
    spec = DatasetSpec(str(write_jsonl(tmp_path / "big.jsonl", records)), weight=0.5)
    t0 = time.perf_counter()
    first, _ = load_conversations([spec])
    t1 = time.perf_counter()
    second, _ = load_conversations([spec])
    t2 = time.perf_counter()
    print(f"load_conversations: first {t1 - t0:.3f}s, second {t2 - t1:.3f}s, "
          f"ratio {(t1 - t0) / (t2 - t1):.1f}x")
    assert first.cache_files and second.cache_files == first.cache_files


# ---------------------------------------------------------------- one odd row never sinks a file

def glaive_with_calls_as_text(tmp_path, records=(197, 293)):
    """glaive_toolcall_en_demo with the call of `records` written as text inside the gpt turn, so the
    observation after it answers no call (as LLaMA-Factory's glaive_toolcall_zh_demo does in 2 rows)."""
    rows = json.loads(shared_file("glaive_toolcall_en_demo.json").read_text())
    fields = {}
    for i in records:
        turns = rows[i]["conversations"]
        k = next(j for j, t in enumerate(turns) if t["from"] == "function_call")
        turns[k] = {"from": "gpt", "value": "Let me call it: " + turns[k]["value"]}
        fields[i] = f"conversations[{k + 1}]"
    path = tmp_path / "glaive_zh_like.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path, fields


def test_a_tool_result_without_its_call_drops_that_row_only(tmp_path):
    path, fields = glaive_with_calls_as_text(tmp_path)
    ds, drops = load(path)
    assert (len(ds), dict(drops)) == (298, {"malformed": 2})
    assert sorted(set(ds["record"])) == [r for r in range(300) if r not in fields]
    assert drops.examples["malformed"] == [
        f"{path}, record {r}, field '{f}': a tool result with no tool call before it. Each tool (observation) "
        "message must follow the assistant call it answers" for r, f in fields.items()]
    with pytest.raises(RecipeError) as e:  # strict: the first is the one-line error it used to be
        load_conversations([DatasetSpec(str(path))], strict=True)
    assert str(e.value) == drops.examples["malformed"][0]


def test_every_record_malformed_is_one_error_naming_the_first(tmp_path):
    path = write_jsonl(tmp_path / "bot.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                   {"from": "bot", "value": f"Hi {i}"}]}
                                                for i in range(4)])
    with pytest.raises(RecipeError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: all 4 records are unusable (4 malformed; first malformed: record 0, "
                                   "field 'conversations[1].from': unknown role 'bot'")


def test_json_that_arrow_cannot_type_is_judged_row_by_row(tmp_path, monkeypatch):
    import datasets
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    real = datasets.load_dataset

    def refuses_json(*args, **kwargs):  # as datasets does on a column whose types it cannot unify
        if args and args[0] == "json":
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset")
        return real(*args, **kwargs)

    monkeypatch.setattr("sft_recipes.sources.load_dataset", refuses_json)
    ds, drops = load(path)
    assert (len(ds), drops) == (12, collections.Counter())


def test_the_summary_names_the_dropped_rows(tmp_path):
    """Through the trainer's data path: counted in the stats, named by file and record on the screen."""
    from rich.console import Console

    from sft_recipes import load_recipe, load_tokenizer
    from sft_recipes.summary import print_data
    from sft_recipes.trainer import build_datasets

    path, fields = glaive_with_calls_as_text(tmp_path)
    recipe = load_recipe(None, model_name_or_path="tiny:gpt2", chat_template="chatml", datasets=[str(path)],
                         dedup="none", max_length=16384)
    train, _, stats = build_datasets(recipe, load_tokenizer(recipe))
    assert stats["train"]["dropped"] == {"malformed": 2} and stats["train"]["rows"] == 298
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    print_data(console, stats)
    text = console.export_text()
    assert "train dropped (rows or examples): malformed: 2" in text
    for record, field in fields.items():
        assert f"  train malformed: {path}, record {record}, field '{field}': a tool result with no tool call" in text


# ---------------------------------------------------------------- the checker's masks per template

# Prints earlier assistant turns as a placeholder once later ones exist: every multi-turn row rewrites its history.
REWRITES_HISTORY = """{%- for m in messages -%}
{%- if m.role == 'assistant' and not loop.last -%}{{ 'assistant: (earlier answer)' + eos_token }}
{%- else -%}{{ m.role + ': ' + m.content + eos_token }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}
"""


def masked_directly(path, template, tokenizer="tiny:gpt2"):
    """What masking.tokenize itself gives for the file: (split rows, split examples, notes of split examples,
    refused by reason), counted from its columns, never through the stats the checker prints."""
    from sft_recipes import load_recipe, load_tokenizer, masking, prepare

    recipe = load_recipe(None, model_name_or_path=tokenizer, chat_template=template)
    tok = load_tokenizer(recipe)
    out = masking.tokenize(load(path)[0], tok, prepare.mask_options(recipe, tok))
    split = [(row, notes) for row, s, drop, notes in zip(out["row"], out["split"], out["drop"], out["notes"])
             if s and drop is None]
    return (len({row for row, _ in split}), len(split), collections.Counter(n for _, ns in split for n in ns),
            collections.Counter(d for d in out["drop"] if d))


def checker_blocks(capsys, argv) -> list[str]:
    from sft_recipes.sources import main

    main(argv)
    return re.split(r"(?m)^(?=masks with )", capsys.readouterr().out)[1:]


def says_split(block, rows, examples, notes):
    assert f"{rows:,} rows trained as one example per turn ({examples:,} examples;" in block, block
    for note, n in notes.items():
        assert note.startswith("one example per turn: ") and f"  {n:,} examples: {note}\n" in block, block


def test_the_checker_counts_rows_split_per_turn_under_a_released_template(capsys):
    """trl:qwen3 drops earlier turns' reasoning: the multi-turn rows of a reasoning file are split per turn."""
    path, qwen3 = shared_file("reasoning/reasoning_content.jsonl"), str(shared_file("tokenizers/qwen3"))
    rows, examples, notes, refused = masked_directly(path, "trl:qwen3", qwen3)
    assert rows > 0 and notes and not refused  # the file holds multi-turn rows with reasoning
    [block] = checker_blocks(capsys, [str(path), "--dedup", "none", "--chat-template", "trl:qwen3",
                                      "--tokenizer", qwen3])
    assert block.startswith(f"masks with trl:qwen3 (tokenizer {qwen3}, max_length 1024):\n")
    assert "refused: 0\n" in block
    says_split(block, rows, examples, notes)


def test_two_templates_give_two_blocks_each_with_its_splits_and_refusals(tmp_path, capsys):
    path = ROOT / "recipes" / "data" / "tiny_chats.jsonl"  # multi-turn, some with tool calls
    template = tmp_path / "rewrites.jinja"
    template.write_text(REWRITES_HISTORY)
    chatml, ours = checker_blocks(capsys, [str(path), "--dedup", "none", "--chat-template", "chatml",
                                           "--chat-template", str(template)])
    assert chatml.startswith("masks with chatml (tokenizer tiny:gpt2,") and "  no row split per turn\n" in chatml
    assert masked_directly(path, "chatml")[0] == 0
    assert ours.startswith(f"masks with {template} (tokenizer tiny:gpt2,")
    rows, examples, notes, refused = masked_directly(path, str(template))
    assert rows > 0 and refused  # the template prints no tool calls: those turns are refused
    says_split(ours, rows, examples, notes)
    assert f"refused: {refused.total():,} (" + ", ".join(f"{k}: {v:,}" for k, v in refused.most_common()) in ours
    assert all(f"  first {reason}: {path}, record " in ours for reason in refused)


def test_a_bad_template_name_is_one_line_before_any_loading(capsys):
    from sft_recipes.sources import main

    with pytest.raises(SystemExit) as e:
        main([str(ROOT / "recipes" / "data" / "tiny_chats.jsonl"), "--chat-template", "chatmll"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: chat_template: unknown template 'chatmll'. Did you mean "
                                                   "'chatml'?"), err
