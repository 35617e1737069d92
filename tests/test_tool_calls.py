"""Tool calls at inference: the calls a model writes are read back in every shipped template's syntax (or by the
tokenizer's own parser), scored by exact name and arguments, offered through `--tools` in generate and chat, and
reported by evaluate as tool_call_accuracy."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_file
from sft_recipes import evaluate as ev
from sft_recipes import generate, load_recipe, messages, models, templates, tiny, tool_calls, train
from sft_recipes.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
EOS = "</s>"


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER = call("get_weather", city="Oslo", days=3)
HOSTILE = call("calc", x=[1, 2.5, None], s='a\nb "q" </tool_call> [TOOL_CALLS]', nested={"k": {"é": True}})
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "calc"}}]


class _Eos:
    eos_token = EOS


def generated(name, content, calls):
    """What a model trained on template `name` generates for this turn: the turn as the template prints it,
    without the end-of-turn token generation stops at, trimmed as `generate.response_text` trims it."""
    source = templates.load_template(name, None)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content, "tool_calls": calls}]
    text, spans = templates.render_with_spans(source, messages, TOOLS, bos_token="<s>", eos_token=EOS)
    end = templates.template_meta(source, _Eos)["end_of_turn"]
    return text[spans[0][0]:spans[0][1]].removesuffix(end).strip()


# ---------------------------------------------------------------- reading
@pytest.mark.parametrize("name", templates.template_names())
@pytest.mark.parametrize("content, calls", [("", [WEATHER]), ("", [WEATHER, HOSTILE]),
                                            ("Let me check.\nTwo lines.", [HOSTILE, WEATHER])])
def test_the_calls_every_shipped_template_prints_read_back(name, content, calls):
    assert tool_calls.parse_text(generated(name, content, calls)) == {"content": content, "tool_calls": calls}


@pytest.mark.parametrize("text", [
    "Paris",
    '{"name": "Paris"}',                                            # JSON with a name is not a call
    '{"name": "get_weather", "arguments": {"city": "Os',             # cut short by max_new_tokens
    '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}',       # unclosed list
    '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": \n</tool_call>',
])
def test_no_half_call_is_read_the_text_stays_the_answer(text):
    assert tool_calls.parse_text(text) == {"content": text, "tool_calls": None}


def test_calls_after_text_lines_and_in_any_accepted_shape():
    text = 'First I look.\n{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}\n' \
           '{"type": "function", "function": {"name": "calc", "arguments": "{\\"x\\": 1}"}}'
    assert tool_calls.parse_text(text) == {"content": "First I look.", "tool_calls": [WEATHER, call("calc", x=1)]}
    # A call line in the middle of the answer is text: calls come after the content.
    middle = '{"name": "calc", "arguments": {}}\nso the answer is 4'
    assert tool_calls.parse_text(middle)["tool_calls"] is None


def test_the_tokenizers_own_parser_is_used_where_it_has_one():
    """Qwen3 with TRL's response template: reasoning is split off by its parser, which ours would not do."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_file("tokenizers/qwen3"))
    tok.chat_template = templates.load_template("trl:qwen3", None)
    assert getattr(tok, "response_template", None) is None
    models.add_response_template(tok)  # what loading a trained model does
    assert tok.response_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS, add_generation_prompt=True,
                                     tokenize=False)
    text = '<think>\nLook it up.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", ' \
           '"days": 3}}\n</tool_call>'
    assert tool_calls.parse(text, tok, prompt=prompt, tools=TOOLS) == {"content": "", "tool_calls": [WEATHER]}
    assert tool_calls.parse_text(text)["content"] == "<think>\nLook it up.\n</think>"
    # A tokenizer without a parser reads our templates' syntaxes.
    tok.response_template = None
    assert tool_calls.parse(text, tok, prompt=prompt)["content"] == "<think>\nLook it up.\n</think>"


# ---------------------------------------------------------------- scoring
def test_tool_call_accuracy_is_exact_names_and_arguments():
    reference = [WEATHER, call("calc", x=1)]
    predictions = [
        [call("calc", x=1), WEATHER],                              # 1: the same calls in another order
        [call("get_weather", days=3, city="Oslo"), call("calc", x=1)],  # 1: key order does not count
        [WEATHER],                                                 # 0: a call missing
        [WEATHER, call("calc", x=1), call("calc", x=1)],           # 0: a call too many
        [WEATHER, call("calc", x="1")],                            # 0: "1" is not 1
        [WEATHER, call("calc", x=1.0)],                            # 0: 1.0 is not 1
        [WEATHER, call("Calc", x=1)],                              # 0: names are exact
        None,                                                      # 0: no call made
    ]
    got = tool_calls.tool_call_accuracy(predictions, [reference] * len(predictions))
    assert got["tool_call_accuracy_scores"] == [1.0, 1.0, 0, 0, 0, 0, 0, 0]
    assert got["tool_call_accuracy"] == 0.25
    assert tool_calls.tool_call_accuracy([], [])["tool_call_accuracy"] is None


def stored(messages):
    return [{"role": m["role"], "content": m["content"], "input": None, "train": None, "reasoning_content": None,
             "tool_calls": json.dumps(m["tool_calls"]) if m.get("tool_calls") else None, "name": None,
             "tool_call_id": None, "inline_reasoning": None} for m in messages]


def test_evaluation_scores_text_answers_and_calls_apart():
    user = {"role": "user", "content": "q"}
    rows = {"messages": [stored([user, {"role": "assistant", "content": "Paris"}]),
                         stored([user, {"role": "assistant", "content": "", "tool_calls": [WEATHER]}]),
                         stored([user, {"role": "assistant", "content": "", "tool_calls": [WEATHER]}])],
            "tools": [None, json.dumps(TOOLS), json.dumps(TOOLS)]}
    responses = ["paris", '{"name": "get_weather", "arguments": {"days": 3, "city": "Oslo"}}', "Oslo"]
    summary, per_example, parsed = ev.score(responses, [""] * 3, rows, None)
    assert summary["exact_match"] == 1.0 and summary["text_rows"] == 1  # the calls' rows are not text answers
    assert summary["tool_call_accuracy"] == 0.5 and summary["tool_call_rows"] == 2
    assert per_example["tool_call"] == [None, 1.0, 0.0] and per_example["rouge_l"][1:] == [None, None]
    assert parsed == [None, [WEATHER], None]


# ---------------------------------------------------------------- tools and template options from outside
def test_a_tools_file_takes_the_data_layers_shapes(tmp_path):
    path = tmp_path / "tools.json"
    bare = {"name": "get_weather", "parameters": {"type": "object"}}
    path.write_text(json.dumps([bare, TOOLS[1]]))
    assert generate.read_tools(str(path)) == [{"type": "function", "function": bare}, TOOLS[1]]
    for text, fragment in ((json.dumps(bare), "tools must be a list of function schemas, got an object. Wrap"),
                           ('[{"description": "x"}]', "field 'tools[0]': expected a function schema with a name"),
                           ("[", "not valid JSON"), ("[]", "no tools in the list")):
        path.write_text(text)
        with pytest.raises(RecipeError, match=fragment.replace("[", r"\[")) as e:
            generate.read_tools(str(path))
        assert str(e.value).startswith(str(path))
    with pytest.raises(RecipeError, match="file not found"):
        generate.read_tools(str(tmp_path / "nope.json"))


def test_prompts_render_with_the_kwargs_the_model_was_trained_with(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "recipe.yaml").write_text("chat_template_kwargs:\n  enable_thinking: false\n  style: terse\n")
    assert models.trained_kwargs(str(run)) == {"enable_thinking": False, "style": "terse"}
    assert models.trained_kwargs(str(run / "checkpoint-5")) == {"enable_thinking": False, "style": "terse"}
    assert models.trained_kwargs(str(tmp_path)) == {}
    args = argparse.Namespace(model=str(run), tools=None, chat_template_kwargs={"style": "long"})
    assert generate.prompt_options(args) == (None, {"enable_thinking": False, "style": "long"})
    args.chat_template_kwargs = {"tools": 1}
    with pytest.raises(RecipeError, match="--chat_template_kwargs: chat_template_kwargs cannot set 'tools'"):
        generate.prompt_options(args)

    class Tok:
        chat_template = "{{ style }}|{% for m in messages %}{{ m.content }}{% endfor %}"
        special_tokens_map = {"eos_token": ""}

    messages = [{"role": "user", "content": "hi", "input": None, "train": None}]
    assert generate.prompt_text(Tok, messages, None, {"style": "terse"}) == "terse|hi"
    assert generate.prompt_text(Tok, messages, None, generate.row_kwargs({"style": "terse"}, '{"style": "row"}')) \
        == "row|hi"


# ---------------------------------------------------------------- end to end, on a model that learned one call
QUESTION = "Look up the capital of Peru."
PERU = call("get_capital", country="Peru")


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """The tiny model trained on one tool chat until it makes that call: (model dir, tools file)."""
    folder = tmp_path_factory.mktemp("caller")
    tools = [{"type": "function", "function": tiny.CAPITAL_TOOL}]
    data = folder / "call.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": "", "tool_calls": [PERU]}],
                                "tools": tools}) + "\n")
    (folder / "tools.json").write_text(json.dumps([tiny.CAPITAL_TOOL]))  # bare, as users write them
    train(load_recipe(str(ROOT / "recipes" / "tiny_alpaca.yaml"), datasets=[{"path": str(data), "weight": 64}],
                      eval_split=0, eval_strategy="no", max_steps=40, per_device_train_batch_size=8,
                      learning_rate=3e-3, warmup_steps=0, output_dir=str(folder / "model"), disable_tqdm=True))
    return folder / "model", folder / "tools.json"


def command(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_generate_with_tools_prints_the_call_parsed(caller):
    model, tools = caller
    proc = command("sft_recipes.generate", "--model", str(model), "--tools", str(tools), "--prompt", QUESTION,
                   "--temperature", "0", "--max_new_tokens", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == 'tool call: {"name": "get_capital", "arguments": {"country": "Peru"}}\n'
    # Without --tools the prompt lacks them and the raw text is printed.
    plain = command("sft_recipes.generate", "--model", str(model), "--prompt", QUESTION, "--temperature", "0",
                    "--max_new_tokens", "40")
    assert plain.returncode == 0 and not plain.stdout.startswith("tool call:")


def test_generate_file_rows_gain_their_parsed_calls(caller, tmp_path):
    model, tools = caller
    rows = [{"messages": [{"role": "user", "content": QUESTION}], "tools": [tiny.CAPITAL_TOOL]},  # its own tools
            {"messages": [{"role": "user", "content": QUESTION}]}]                                # takes --tools
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = command("sft_recipes.generate", "--model", str(model), "--file", str(src), "--tools", str(tools),
                   "--output", str(out), "--temperature", "0", "--max_new_tokens", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["tool_calls"] for w in written] == [[PERU], [PERU]]
    assert tool_calls.parse_text(written[0]["response"])["tool_calls"] == [PERU]  # the raw text is kept
    proc = command("sft_recipes.generate", "--model", str(model), "--file", str(src), "--output", str(out),
                   "--temperature", "0", "--max_new_tokens", "4")
    assert ["tool_calls" in json.loads(line) for line in out.read_text().splitlines()] == [True, False]


def test_chat_with_tools_keeps_the_call_and_takes_its_result(caller):
    model, tools = caller
    proc = command("sft_recipes.chat", "--model", str(model), "--tools", str(tools), "--temperature", "0",
                   "--max_new_tokens", "40", stdin=f'/tool nothing yet\n{QUESTION}\n/tool\n/tool {{"capital": "Lima"}}\n')
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "(no tool call to answer" in out and "(give the tool's result" in out
    assert 'tool call: {"name": "get_capital", "arguments": {"country": "Peru"}}' in out
    assert out.count("assistant: ") == 2  # the question, then the tool's result


def test_chat_history_holds_calls_as_structure(caller):
    from sft_recipes import chat

    model, tokenizer = models.load_trained(str(caller[0]))
    session = chat.Chat(model, tokenizer, tools=[{"type": "function", "function": tiny.CAPITAL_TOOL}], temperature=0,
                        max_new_tokens=40)
    assert session.reply(QUESTION) == {"content": "", "tool_calls": [PERU]}
    session.reply('{"capital": "Lima"}', role="tool")
    roles = [(m["role"], m["name"], m["tool_calls"]) for m in session.history]
    assert roles[:3] == [("user", None, None), ("assistant", None, json.dumps([PERU])), ("tool", "get_capital", None)]
    # The history renders as training rendered such a chat: the call in the template's syntax.
    prompt = generate.prompt_text(tokenizer, session.history[:2], session.tools)
    assert '{"name": "get_capital", "arguments": {"country": "Peru"}}' in prompt


def test_evaluating_the_default_reports_tool_call_accuracy(caller, tmp_path):
    """The embedded default's eval split holds tool-call turns; both models get the metric, in every output."""
    recipe = load_recipe(str(ROOT / "recipes" / "tiny_alpaca.yaml"))
    runs = ev.run(recipe, str(caller[0]), baseline="tiny:gpt2", max_rows=40, max_new_tokens=24,
                  output=str(tmp_path), examples=3)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["tool_call_rows"] > 0 and saved["tool_call_rows"] == runs["model"]["metrics"]["tool_call_rows"]
    for name in ("baseline", "model"):
        assert 0 <= saved[name]["tool_call_accuracy"] <= 1
        assert saved[name]["text_rows"] + saved[name]["tool_call_rows"] == saved[name]["generated_rows"] == 40
    assert saved["baseline"]["tool_call_accuracy"] == 0  # an untrained model writes no call
    assert "| tool-call accuracy |" in (tmp_path / "report.md").read_text()
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    called = [p for p in predictions if p["model"]["tool_call"] is not None]
    assert len(called) == saved["tool_call_rows"] and all("tool_calls" in p["model"] for p in called)
    assert all(p["reference"].startswith('tool call: {"name": ') for p in called)


def test_read_call_is_the_data_layers_rule():
    assert messages.read_call({"name": "f", "parameters": '{"a": 1}'}, "x") == call("f", a=1)
    with pytest.raises(RecipeError, match="x, field 'tool_call': a tool call without a function name"):
        messages.read_call({"arguments": {}}, "x")
