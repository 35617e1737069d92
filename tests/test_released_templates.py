"""Released chat templates of current models (installed with TRL, named `trl:NAME`) on real tokenizers
and every shared data file, reasoning and tool calls included: every row is kept unless the template
cannot print it, every example trains what inference asks for (the oracle in mask_oracle.py, which
shares no code with the library), reasoning is trained wherever the template prints it, and the
text before each turn is tokenized as that prompt on its own."""
from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache

import pytest

from conftest import shared_file
from mask_oracle import check_row, decode, render, runs, tokens
from sft_recipes import masking, sources, templates

# The templates named in issue 12 and 13, the shared tokenizer each runs on, and the special tokens a
# copy of that tokenizer needs for templates whose own vocabulary is not shared.
HARMONY = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
GLM = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
            "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
TEMPLATES = {  # name: (tokenizer, added special tokens, eos, bos)
    "qwen2_5": ("qwen3", [], None, None),
    "qwen3": ("qwen3", [], None, None),
    "qwen3_5_think": ("qwen3", [], None, None),
    "llama3_1": ("llama3", [], None, None),
    "llama3_2": ("llama3", [], None, None),
    "phi3_5": ("phi3", [], None, None),
    "deepseek_r1_distill": ("qwen3", DEEPSEEK, DEEPSEEK[3], DEEPSEEK[0]),
    "deepseekv3": ("qwen3", DEEPSEEK, DEEPSEEK[3], DEEPSEEK[0]),
    "gptoss": ("qwen3", HARMONY, "<|return|>", None),
    "glm4moe": ("qwen3", GLM, "<|endoftext|>", None),
}
PRINTS_REASONING = {"qwen3", "qwen3_5_think", "gptoss", "glm4moe"}
PRINTS_NO_CALLS = {"phi3_5", "deepseek_r1_distill"}  # their templates drop tool calls (the rows are refused)
BYTE_LEVEL = {"qwen3", "llama3"}
DATA = {  # file: DatasetSpec options
    "reasoning/reasoning_content.jsonl": {}, "reasoning/thinking_field.jsonl": {},
    "reasoning/think_inline_sharegpt.jsonl": {}, "reasoning/skyt1_markers.json": {},
    "reasoning/cot_columns.json": {"format": "alpaca", "columns": {
        "instruction": "Question", "reasoning": "Complex_CoT", "output": "Response"}},
    "reasoning/tool_calls_reasoning.jsonl": {}, "glaive_toolcall_en_demo.json": {},
    "alpaca_en_demo.json": {}, "instruction-data.json": {},
}
ORACLE_STRIDE = {"alpaca_en_demo.json": 25, "instruction-data.json": 25, "glaive_toolcall_en_demo.json": 3}


@lru_cache(maxsize=None)
def tokenizer(name):
    from transformers import AutoTokenizer
    base, added, eos, bos = TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(str(shared_file(f"tokenizers/{base}")))
    if added:
        tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    if eos:
        tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    tok.chat_template = templates.load_template(f"trl:{name}", tok)
    return tok


@lru_cache(maxsize=None)
def conversations(path):
    ds, _, drops = sources._prepare(sources.DatasetSpec(path=str(shared_file(path)), **DATA[path]),
                                    num_proc=None, strict=False)
    assert not drops
    return ds


def masked(name, path, **options):
    tok = tokenizer(name)
    return masking.tokenize(conversations(path), tok, masking.MaskOptions(template=tok.chat_template, **options)), tok


def reasoning_turns(ds) -> int:
    return sum(1 for msgs in ds["messages"] for m in msgs if m["role"] == "assistant" and m["reasoning_content"])


def call_turns(ds) -> int:
    return sum(1 for msgs in ds["messages"] for m in msgs if m["tool_calls"])


@pytest.fixture(autouse=True)
def _templates_installed():
    if not templates.trl_template_names():
        pytest.skip("trl's chat_templates folder is not installed")


# ---------------------------------------------------------------- acceptance: every template, every file
@pytest.mark.parametrize("name", TEMPLATES)
def test_every_row_is_kept_and_every_example_trains_what_inference_asks(name):
    for path in DATA:
        ds = conversations(path)
        out, tok = masked(name, path)
        refused = Counter(d for d in out["drop"] if d)
        if name in PRINTS_NO_CALLS:  # only the turns whose calls the template cannot print
            assert refused == Counter({"tool_call_not_rendered": call_turns(ds)} if call_turns(ds) else {}), (path, refused)
        else:
            assert not refused, (path, refused, [d for d in out["detail"] if d][:2])
        kept_turns = sorted((r, t) for r, turns, d in zip(out["row"], out["turns"], out["drop"]) if d is None for t in turns)
        all_turns = sorted((r, i) for r, msgs in enumerate(ds["messages"]) for i, m in enumerate(msgs)
                           if m["role"] == "assistant" and not (name in PRINTS_NO_CALLS and m["tool_calls"]))
        assert kept_turns == all_turns, f"{path}: a trained turn is missing or trained twice"
        stride = ORACLE_STRIDE.get(path, 1)
        for k, row in enumerate(out):
            if row["drop"] is None and row["row"] % stride == 0:
                check_row(row, tok, tok.chat_template, exact_decode=TEMPLATES[name][0] in BYTE_LEVEL)


@pytest.mark.parametrize("name", TEMPLATES)
def test_reasoning_is_trained_wherever_the_template_prints_it(name):
    path = "reasoning/reasoning_content.jsonl"
    ds = conversations(path)
    out, tok = masked(name, path)
    trained, unprinted = sum(out["reasoning_trained"]), sum(out["reasoning_unprinted"])
    if name in PRINTS_REASONING:
        assert (trained, unprinted) == (reasoning_turns(ds), 0)
        for row in out:  # the reasoning text is inside the trained tokens of its turn
            text = decode(tok, [t for t in row["labels"] if t != -100])
            for i in row["turns"]:
                thought = row["messages"][i]["reasoning_content"]
                assert thought is None or thought.strip() in text
    else:  # counted, so the summary can say so; the answer is still trained
        assert (trained, unprinted) == (0, reasoning_turns(ds))


@pytest.mark.parametrize("name", sorted(PRINTS_REASONING))
def test_train_on_reasoning_false_trains_the_answer_but_no_reasoning(name):
    path = "reasoning/reasoning_content.jsonl"
    out, tok = masked(name, path, train_on_reasoning=False)
    full, _ = masked(name, path)
    assert not any(out["drop"]), [d for d in out["detail"] if d][:2]
    assert out["input_ids"] == full["input_ids"]  # the same examples, fewer trained tokens
    for row, whole in zip(out, full):
        trained = decode(tok, [t for t in row["labels"] if t != -100])
        thoughts = [row["messages"][i]["reasoning_content"] for i in row["turns"]]
        for i in row["turns"]:
            assert row["messages"][i]["content"].strip() in trained
        for thought in filter(None, thoughts):
            assert thought.strip() not in trained
        left_out = sum(len(tokens(tok, t.strip())) for t in thoughts if t)
        assert whole["n_trained"] - row["n_trained"] >= left_out - 2 * len(row["turns"])


# ---------------------------------------------------------------- the template habits, one by one
def example_for(out, row, turn):
    (found,) = [r for r in out if r["row"] == row and turn in r["turns"]]
    return found


def test_qwen3_multi_turn_rows_split_per_turn_with_history_as_inference_shows_it():
    """Qwen3 prints reasoning only after the last user message, and an empty think block on the last
    turn: each turn becomes its own example, earlier turns printed as inference prints them."""
    ds = conversations("reasoning/reasoning_content.jsonl")
    out, tok = masked("qwen3", "reasoning/reasoning_content.jsonl")
    multi = [r for r, msgs in enumerate(ds["messages"]) if sum(m["role"] == "assistant" for m in msgs) > 1]
    assert multi and all(example_for(out, r, t)["split"] for r in multi
                         for t in [i for i, m in enumerate(ds[r]["messages"]) if m["role"] == "assistant"])
    r = multi[0]
    first, last = [i for i, m in enumerate(ds[r]["messages"]) if m["role"] == "assistant"][:2]
    later = decode(tok, example_for(out, r, last)["input_ids"])
    thought = ds[r]["messages"][first]["reasoning_content"]
    assert thought and thought.strip() in decode(tok, example_for(out, r, first)["input_ids"])
    assert thought.strip() not in later  # the history of the later turn drops it, as at inference


def test_qwen3_5_prompt_and_turn_are_tokenized_apart_where_bpe_would_merge_them():
    """Qwen3.5's generation prompt ends with "<think>\\n" and an answer without reasoning continues with
    "\\n</think>": tokenized together "\\n\\n" would be one token across the boundary."""
    path = "alpaca_en_demo.json"
    out, tok = masked("qwen3_5_think", path)
    row = out[0]
    (a, _), = runs(row["labels"])
    prompt = decode(tok, row["input_ids"][:a])
    assert prompt.endswith("<think>\n") and row["input_ids"][:a] == tokens(tok, prompt)
    assert tokens(tok, decode(tok, row["input_ids"])) != row["input_ids"]  # the whole text merges there
    check_row(row, tok, tok.chat_template)


def test_deepseek_r1_prefill_is_noted_and_the_rendered_turn_is_trained():
    out, tok = masked("deepseek_r1_distill", "alpaca_en_demo.json")
    assert all(any("pre-fills '<think>\\n'" in n for n in notes) for notes in out["notes"])
    row = out[0]
    assert decode(tok, [t for t in row["labels"] if t != -100]) == row["messages"][1]["content"] + tok.eos_token


def test_gptoss_final_answer_after_tool_calls_is_trained_in_the_templates_own_rendering():
    """gpt-oss drops the analysis of a tool call from the history once a final answer follows (its authors'
    training view; every message is still printed): the final answer's example is the template's rendering
    of the row, equal to `apply_chat_template`, and the call's own example keeps its analysis."""
    out, tok = masked("gptoss", "reasoning/tool_calls_reasoning.jsonl")
    rewritten = [r for r in out if any(n == templates.REWRITES_REASONING for n in r["notes"])]
    assert rewritten
    for row in rewritten[:10]:
        check_row(row, tok, tok.chat_template)
        (i,) = row["turns"]
        messages = row["messages"][: row["n_messages"]]
        text = decode(tok, row["input_ids"])
        assert text == render(tok, messages, row["tools"], tok.chat_template)
        calls = [k for k in range(i) if messages[k]["tool_calls"] and messages[k]["reasoning_content"]]
        assert calls and messages[calls[-1]]["reasoning_content"] not in text  # left out, as the template does
        call = next(r for r in out if r["row"] == row["row"] and r["turns"] == [calls[-1]])
        assert messages[calls[-1]]["reasoning_content"] in decode(tok, call["input_ids"])


def test_glm_turns_without_an_end_token_train_the_next_role_token_as_their_stop():
    out, tok = masked("glm4moe", "glaive_toolcall_en_demo.json")
    stops = Counter()
    for row in out:
        ids, labels = row["input_ids"], row["labels"]
        for _, b in runs(labels):
            stops[tok.convert_ids_to_tokens(ids[b - 1])] += 1
    assert set(stops) == {"<|user|>", "<|observation|>"} and stops["<|observation|>"] == call_turns(
        conversations("glaive_toolcall_en_demo.json"))


def test_llama3_tool_results_printed_as_json_strings_are_no_reason_to_refuse():
    out, tok = masked("llama3_1", "glaive_toolcall_en_demo.json")
    assert not any(out["drop"])
    row = next(r for r in out if any(m["role"] == "tool" for m in r["messages"]))
    tool = next(m for m in row["messages"] if m["role"] == "tool")
    text = decode(tok, row["input_ids"])
    assert json.dumps(tool["content"]) in text and tool["content"] not in text


def test_trl_prefix_names_released_templates_and_suggests_on_a_typo():
    from sft_recipes.errors import RecipeError
    assert templates.load_template("trl:qwen3", None).startswith("{%- if tools %}")
    with pytest.raises(RecipeError, match="Did you mean 'trl:qwen3'"):
        templates.load_template("trl:qwen33", None)


# ---------------------------------------------------------------- the policies
def test_reasoning_drop_removes_it_before_rendering():
    out, tok = masked("qwen3", "reasoning/reasoning_content.jsonl", reasoning="drop")
    assert not any(out["drop"]) and sum(out["reasoning_trained"]) == sum(out["reasoning_unprinted"]) == 0
    for row in out.select(range(20)):
        text = decode(tok, row["input_ids"])
        assert all(m["reasoning_content"] is None or m["reasoning_content"].strip() not in text
                   for m in row["messages"])
        assert "<think>\n\n</think>" in text  # what Qwen3 prints for a last turn without reasoning


def test_enable_thinking_false_puts_the_empty_think_block_in_the_prompt():
    """Rows without reasoning on a hybrid template: by default Qwen3's empty think block is trained (the
    model learns to answer without thinking); with `enable_thinking: false` it is part of the prompt, as
    inference with enable_thinking=False shows it."""
    path = "alpaca_en_demo.json"
    default, tok = masked("qwen3", path)
    off, _ = masked("qwen3", path, chat_template_kwargs={"enable_thinking": False})
    for a, b in zip(default.select(range(10)), off.select(range(10))):
        assert a["input_ids"] == b["input_ids"]
        assert decode(tok, [t for t in a["labels"] if t != -100]).startswith("<think>\n\n</think>\n\n")
        trained = decode(tok, [t for t in b["labels"] if t != -100])
        assert "<think>" not in trained and trained == b["messages"][-1]["content"] + "<|im_end|>"
        check_row(b, tok, tok.chat_template, kwargs={"enable_thinking": False})


def test_a_rows_own_chat_template_kwargs_override_the_recipes(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "chat_template_kwargs": {"enable_thinking": flag}} for flag in (True, False)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds, _, _ = sources._prepare(sources.DatasetSpec(path=str(path)), num_proc=None, strict=False)
    tok = tokenizer("qwen3")
    out = masking.tokenize(ds, tok, masking.MaskOptions(template=tok.chat_template,
                                                        chat_template_kwargs={"enable_thinking": False}))
    trained = [decode(tok, [t for t in r["labels"] if t != -100]) for r in out]
    assert trained == ["<think>\n\n</think>\n\n4<|im_end|>", "4<|im_end|>"]


def test_chat_template_kwargs_from_yaml_and_the_command_line(tmp_path):
    from sft_recipes.config import parse_recipe
    from sft_recipes.errors import RecipeError
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: x\nchat_template_kwargs: {enable_thinking: false, reasoning_effort: high}\n")
    assert parse_recipe([str(recipe)]).data.chat_template_kwargs == {"enable_thinking": False, "reasoning_effort": "high"}
    flag = parse_recipe([str(recipe), "--chat_template_kwargs", '{"enable_thinking": true}'])
    assert flag.data.chat_template_kwargs == {"enable_thinking": True}
    recipe.write_text("model_name_or_path: x\nchat_template_kwargs: {date_string: 2024-07-26}\n")
    with pytest.raises(RecipeError, match="date_string.*quote dates"):
        parse_recipe([str(recipe)])
    recipe.write_text("model_name_or_path: x\nchat_template_kwargs: {add_generation_prompt: true}\n")
    with pytest.raises(RecipeError, match="cannot set 'add_generation_prompt'"):
        parse_recipe([str(recipe)])


# ---------------------------------------------------------------- reasoning the data wrote inline
INLINE = "reasoning/think_inline_sharegpt.jsonl"
# Written for this test with QwQ's habit: reasoning read only from `<think>` in content, printed on the
# final turn as written and cut from earlier turns; the generation prompt opens the think block.
QWQ_LIKE = (
    "{%- for m in messages -%}"
    "{%- set content = m.content -%}"
    "{%- if m.role == 'assistant' and not loop.last -%}{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}")


def raw_conversations(path):
    """The shared rows as the user wrote them (ShareGPT roles renamed, gpt turns untouched)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    lines = shared_file(path).read_text().splitlines()
    return [[{"role": roles[t["from"]], "content": t["value"]} for t in json.loads(line)["conversations"]]
            for line in lines if line.strip()]


def inline_turns(ds) -> int:
    return sum(1 for msgs in ds["messages"] for m in msgs if m["inline_reasoning"])


@pytest.mark.parametrize("name", ["deepseek_r1_distill", "qwq_like"])
def test_inline_reasoning_is_rendered_as_the_user_wrote_it(name):
    """Templates that read reasoning only from content: each example is exactly what the template renders
    for the raw row (R1 keeps the "\\n\\n" after </think>), and the reasoning is trained where it prints it
    (QwQ's last turn: every turn, once split per turn) and counted as unprinted where it does not (R1)."""
    if name == "qwq_like":
        tok, source = tokenizer("qwen3"), QWQ_LIKE
        out = masking.tokenize(conversations(INLINE), tok, masking.MaskOptions(template=source))
    else:
        out, tok = masked(name, INLINE)
        source = tok.chat_template
    raw, n_inline = raw_conversations(INLINE), inline_turns(conversations(INLINE))
    assert n_inline and not any(out["drop"]), [d for d in out["detail"] if d][:2]
    stops = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    for row in out:
        want = tok.apply_chat_template(raw[row["row"]][: row["n_messages"]], chat_template=source, tokenize=False)
        body = want.rstrip()
        got = decode(tok, row["input_ids"])
        assert got == want or any(got == body + t + want[len(body):] for t in stops), (row["row"], got[-120:])
        check_row(row, tok, source)
    trained, unprinted = sum(out["reasoning_trained"]), sum(out["reasoning_unprinted"])
    assert (trained, unprinted) == ((n_inline, 0) if name == "qwq_like" else (0, n_inline))


def test_inline_reasoning_stays_in_the_reasoning_field_for_templates_that_print_it_from_there():
    """gpt-oss prints reasoning from `thinking` in its analysis channel: inline rows keep that view, not raw
    `<think>` text in the final answer."""
    out, tok = masked("gptoss", INLINE)
    assert not any(out["drop"]) and not any("as written" in n for notes in out["notes"] for n in notes)
    assert sum(out["reasoning_trained"]) == inline_turns(conversations(INLINE))
    assert all("<think>" not in decode(tok, row["input_ids"]) for row in out)


@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_stops_at_every_token_a_trained_turn_ends_with(name):
    """What a mask trains as a turn's last token is what generation stops at, on a model whose config names
    only EOS (Phi-3.5 ends turns with `<|end|>`, gpt-oss calls with `<|call|>`, GLM at the next role token)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from sft_recipes import models
    tok = tokenizer(name)
    base = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=tok.eos_token_id))
    stops = set(models.stop_ids(base, tok))
    out, _ = masked(name, "reasoning/tool_calls_reasoning.jsonl")  # final answers, calls, turns before a user's
    ends = Counter(row["input_ids"][b - 1] for row in out if row["drop"] is None for _, b in runs(row["labels"]))
    assert ends and set(ends) <= stops, {tok.convert_ids_to_tokens(i): n for i, n in ends.items() if i not in stops}
