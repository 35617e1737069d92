"""Chat templates: every shipped template trains exactly each assistant turn as it frames it (end of
turn included) and nothing of any other message, with the real GPT-2 tokenizer and the tiny one; a
template without generation markers gives the same masks; a template that can't be trusted on a
row gets that row refused, never trained; and the three shared datasets pass in full."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from mask_oracle import GPT2, TINY, chat, check_row, dataset, decode, mask, message, render, tokenizer_for
from sft_recipes import masking, templates

TEMPLATES = templates.template_names()
TOKENIZERS = [GPT2, TINY]

TOOLS = json.dumps([{"name": "get_weather", "description": "Current weather in a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}}])

CONVERSATIONS = {
    "single_turn": chat(message("user", "What is the capital of France?"),
                        message("assistant", "The capital of France is Paris.")),
    "multi_turn_with_system": chat(
        message("system", "You are a terse assistant."),
        message("user", "Name a primary colour."),
        message("assistant", "Blue."),
        message("user", "And another one?"),
        message("assistant", "Red, then yellow.\nThat makes three.")),
    "tool_turns": chat(
        message("user", "What's the weather in Paris?"),
        message("assistant", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
        message("tool", '{"temperature": 21, "sky": "clear"}'),
        message("assistant", "It is 21 degrees and clear in Paris."),
        tools=TOOLS),
    "alpaca_with_input": chat(
        message("user", "Translate the sentence into French.\n\nGood morning, my friend.",
                input="Good morning, my friend."),
        message("assistant", "Bonjour, mon ami.")),
}


def source_of(name):
    return templates.load_template(name, None)


# ---------------------------------------------------------------- every template, every kind of turn
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_trained_tokens_are_exactly_the_assistant_turns(name, tokenizer):
    rows = list(CONVERSATIONS.values())
    out, tok = mask(rows, tokenizer, name)
    assert set(out["row"]) == set(range(len(rows)))
    assert out["drop"] == [None] * len(out), list(zip(out["row"], out["detail"]))
    for row in out:
        check_row(row, tok, tok.chat_template, end_of_turn=tok.end_of_turn)
    assert sorted((r, t) for r, turns in zip(out["row"], out["turns"]) for t in turns) == [
        (r, i) for r, row in enumerate(rows) for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_end_of_turn_is_one_token_the_template_closes_turns_with(name):
    tok = tokenizer_for(TINY, name)
    assert tok.end_of_turn, f"{name} declares no end of turn"
    assert len(tok(tok.end_of_turn, add_special_tokens=False)["input_ids"]) == 1
    assert tok.pad_token not in (None, tok.eos_token, tok.end_of_turn)
    row = mask([CONVERSATIONS["single_turn"]], TINY, name)[0][0]
    trained = [label for label in row["labels"] if label != -100]
    assert trained[-1] == tok.convert_tokens_to_ids(tok.end_of_turn)


# ---------------------------------------------------------------- templates without markers
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def without_markers(source: str) -> str:
    """The template as a model repository would ship it: same text, no generation tags. Each tag in
    the shipped templates sits between `-}}` and `{{-`, so removing it changes no whitespace."""
    stripped = GENERATION_TAG.sub("", source)
    assert not templates.has_markers(stripped) and "endgeneration" not in stripped
    return stripped


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_without_markers_gives_the_same_masks(name, tokenizer=TINY):
    rows = list(CONVERSATIONS.values())
    marked, tok = mask(rows, tokenizer, name)
    plain_source = without_markers(source_of(name))
    unmarked, plain_tok = mask(rows, tokenizer, plain_source)
    assert plain_tok.end_of_turn == tok.end_of_turn  # the header comments survive
    for row in rows:
        assert (render(plain_tok, row["messages"], row["tools"], plain_source)
                == render(tok, row["messages"], row["tools"], tok.chat_template))
    assert unmarked["drop"] == [None] * len(unmarked), unmarked["detail"]
    assert unmarked["input_ids"] == marked["input_ids"]
    assert unmarked["labels"] == marked["labels"]
    for row in unmarked:
        check_row(row, plain_tok, plain_source, end_of_turn=tok.end_of_turn)


MULTI_TURN = [CONVERSATIONS["multi_turn_with_system"], CONVERSATIONS["tool_turns"],
              chat(message("user", "Count to three."), message("assistant", "One, two, three."),
                   message("user", "Now backwards."), message("assistant", "Three, two, one."))]

# Like templates that hide earlier reasoning: an earlier assistant turn is printed cut short.
SHORTENS_EARLIER = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- 'A:\n' + (m.content if loop.last else m.content[:4] + '...') + eos_token + '\n' -}}"
    "{%- else -%}{{- m.role[0] | upper + ': ' + m.content + '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'A:\n' -}}{%- endif -%}")
# Only the last assistant turn is printed; earlier ones vanish.
DROPS_EARLIER = (
    "{%- for m in messages -%}"
    "{%- if m.role != 'assistant' or loop.last -%}{{- m.role + ':\n' + m.content + eos_token + '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant:\n' -}}{%- endif -%}")
ALWAYS_RAISES = "{{- raise_exception('this template supports no conversation') -}}"
# Marks only the last assistant turn, though every assistant turn is printed.
MARKS_LAST_ONLY = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and loop.last -%}{%- generation -%}{{- m.content + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- m.role + ': ' + m.content + '\n' -}}{%- endif -%}"
    "{%- endfor -%}")
# Marked, but prints contents trimmed: what is trained is not what the data says.
TRIMS_CONTENT = (
    "{%- for m in messages -%}{{- m.role + ':\n' -}}"
    "{%- if m.role == 'assistant' -%}{%- generation -%}{{- m.content | trim + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- m.content | trim -}}{%- endif -%}{{- '\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant:\n' -}}{%- endif -%}")


@pytest.mark.parametrize("source, reason", [
    (ALWAYS_RAISES, "template_error"),
    (MARKS_LAST_ONLY, "template_marks_wrong_turns"),
])
def test_untrustworthy_template_rows_are_refused(source, reason):
    out, _ = mask(MULTI_TURN, TINY, source)
    assert out["drop"] == [reason] * len(MULTI_TURN), out["detail"]
    assert all(n == 0 for n in out["n_trained"])


@pytest.mark.parametrize("source", [SHORTENS_EARLIER, DROPS_EARLIER])
def test_template_that_rewrites_history_trains_each_turn_as_inference_renders_it(source):
    """Like reasoning templates that hide earlier thoughts: each trained turn becomes its own example,
    the conversation up to it rendered as inference would render it, only that turn trained."""
    out, tok = mask(MULTI_TURN, TINY, source)
    assert out["drop"] == [None] * len(out), out["detail"]
    assert len(out) == 2 * len(MULTI_TURN) and all(out["split"])
    for row in out:
        assert len(row["turns"]) == 1 and row["n_messages"] == row["turns"][0] + 1
        check_row(row, tok, source, end_of_turn=tok.eos_token)


@pytest.mark.parametrize("source", [SHORTENS_EARLIER, DROPS_EARLIER])
def test_multi_turn_joint_refuses_rows_it_cannot_keep_whole(source):
    out, _ = mask(MULTI_TURN, TINY, source, multi_turn="joint")
    assert out["drop"] == ["template_rewrites_earlier_turns"] * len(MULTI_TURN), out["detail"]


# Like Mistral v0.3's own template: no generation prompt, and the system message printed inside the user
# turn that ends the conversation only, so it moves (and vanishes from the history) once a turn exists.
SYSTEM_IN_LAST_USER = (
    "{%- set sys = messages[0].content if messages[0].role == 'system' else '' -%}"
    "{%- for m in (messages[1:] if sys else messages) -%}"
    "{%- if m.role == 'user' -%}{{- '[INST] ' + (sys + '\\n\\n' if sys and loop.last else '') + m.content + '[/INST]' -}}"
    "{%- else -%}{{- ' ' + m.content + eos_token -}}{%- endif -%}"
    "{%- endfor -%}")


def test_template_without_generation_prompt_that_moves_the_system_message_keeps_every_turn():
    """Each turn follows the prompt inference shows (system message in the last user turn), found after the
    text the prompt prints past the previous message, since there is no generation prompt to look for."""
    rows = [CONVERSATIONS["multi_turn_with_system"], MULTI_TURN[2]]
    out, tok = mask(rows, TINY, SYSTEM_IN_LAST_USER)
    assert out["drop"] == [None] * len(out), out["detail"]
    assert sorted((row["row"], t) for row in out for t in row["turns"]) == [(0, 2), (0, 4), (1, 1), (1, 3)]
    assert [row["split"] for row in out] == [True, True, False]  # only the row with a system message splits
    for row in out:
        text = check_row(row, tok, SYSTEM_IN_LAST_USER, end_of_turn=tok.eos_token)
        if row["split"]:
            assert "You are a terse assistant." in text  # the prompt of each turn, as inference renders it


def test_special_token_a_tokenizer_lacks_is_printed_as_nothing():
    """Qwen's tokenizer has no BOS: a template printing `{{ bos_token }}` (Hermes-style) must render as
    `apply_chat_template` does, with nothing there, in training and at generation alike."""
    from transformers import AutoTokenizer

    from conftest import shared_file
    from sft_recipes import generate
    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/qwen3")))
    assert tok.bos_token is None
    tok.chat_template = source = "{{ bos_token }}" + templates.load_template("chatml", tok)
    row = CONVERSATIONS["multi_turn_with_system"]
    out = masking.tokenize(dataset([row]), tok, masking.MaskOptions(template=source, end_of_turn="<|im_end|>"))
    assert out["drop"] == [None], out["detail"]
    assert check_row(out[0], tok, source, end_of_turn="<|im_end|>").startswith("<|im_start|>system")
    messages = row["messages"][:2]
    assert generate.prompt_text(tok, messages) == render(tok, messages, None, source, add_generation_prompt=True)


def test_template_that_does_not_compile_stops_at_load_with_its_line():
    from sft_recipes.errors import RecipeError
    with pytest.raises(RecipeError, match=r"chat_template: Jinja syntax error on line 2: unexpected '}'"):
        templates.load_template("{%- for m in messages -%}\n{% set x = m | tojson}{%- endfor -%}", None)


def test_template_that_changes_content_is_refused():
    rows = [chat(message("user", "Spaces around  "), message("assistant", "  padded answer  ")),
            chat(message("user", "Plain question"), message("assistant", "Plain answer"))]
    out, _ = mask(rows, TINY, TRIMS_CONTENT)
    assert out["drop"] == ["template_changed_content", None], out["detail"]


# A model's own template as often written: generation markers around the content only, the end of
# turn printed after them, and no `end_of_turn:` header comment (none do outside this project).
EOS_OUTSIDE_GENERATION = (
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{{- 'Bot:\\n' -}}"
    "{%- generation -%}{{- m.content -}}{%- endgeneration -%}{{- eos_token + '\\n' -}}"
    "{%- else -%}{{- 'User:\\n' + m.content + '\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Bot:\\n' -}}{%- endif -%}")


def test_end_of_turn_printed_after_the_markers_is_trained_as_the_stop():
    """A kept row must teach the model to stop. Here the markers hold just "Hello.", and the special
    token the template prints next (EOS) is what ends the turn: it is trained with it."""
    out, tok = mask([chat(message("user", "Hi"), message("assistant", "Hello."))], TINY, EOS_OUTSIDE_GENERATION)
    assert out["drop"] == [None], out["detail"]
    assert decode(tok, [t for t in out[0]["labels"] if t != -100]) == "Hello." + tok.eos_token


def test_turn_that_never_ends_is_refused():
    """No declared end, no special token at the end of the turn or after it: nothing would teach the
    model to stop (the tokenizer's EOS is appended only at the end of an example)."""
    source = EOS_OUTSIDE_GENERATION.replace("eos_token + '\\n'", "'\\nBye\\n'")
    out, _ = mask([chat(message("user", "Hi"), message("assistant", "Hello."), message("user", "Ok"))], TINY, source)
    assert out["drop"] == ["end_of_turn_not_trained"], out["detail"]


def test_header_less_template_that_trains_its_end_of_turn_is_kept():
    source = EOS_OUTSIDE_GENERATION.replace(
        "{{- m.content -}}{%- endgeneration -%}{{- eos_token + '\\n' -}}",
        "{{- m.content + eos_token -}}{%- endgeneration -%}{{- '\\n' -}}")
    out, tok = mask([chat(message("user", "Hi"), message("assistant", "Hello."))], TINY, source)
    check_row(out[0], tok, source, end_of_turn=tok.eos_token)


def test_template_raising_on_some_rows_refuses_only_those():
    """A shipped template that rejects a conversation (a system message after the first) refuses
    that row with `template_error` and keeps the others."""
    late_system = chat(message("user", "Hi"), message("system", "Be brief."), message("assistant", "Hello."))
    for name in ("alpaca", "gemma", "llama2"):
        out, _ = mask([late_system, CONVERSATIONS["single_turn"]], TINY, name)
        assert out["drop"] == ["template_error", None], (name, out["detail"])
        assert "system message is only allowed as the first message" in out["detail"][0]


# ---------------------------------------------------------------- acceptance: the shared datasets
SHARED = ["instruction-data.json", "alpaca_en_demo.json", "glaive_toolcall_en_demo.json",
          "reasoning/reasoning_content.jsonl", "reasoning/tool_calls_reasoning.jsonl"]
ORACLE_STRIDE = 7  # rows are shuffled across the three datasets, so every 7th mixes all of them


@pytest.fixture(scope="module")
def shared_conversations():
    from conftest import shared_file
    from sft_recipes import sources
    specs = [{"path": str(shared_file(name))} for name in SHARED]
    ds, drops = sources.load_conversations(specs)
    assert not drops
    return ds


def test_every_template_keeps_every_row_of_the_shared_datasets(shared_conversations):
    """Acceptance: all templates, every row of five shared datasets (reasoning and tool calls included),
    GPT-2 tokenizer, nothing truncated: the verifier keeps 100 % of the rows, and the oracle agrees with
    the masks of every ORACLE_STRIDE-th row (all rows would take a minute; the other tests check the
    oracle's way)."""
    ds = shared_conversations
    counts = {}
    for name in TEMPLATES:
        tok = tokenizer_for(GPT2, name)
        opts = masking.MaskOptions(template=tok.chat_template, end_of_turn=tok.end_of_turn, max_length=None)
        out = masking.tokenize(ds, tok, opts)
        refused = Counter(r for r in out["drop"] if r is not None)
        counts[name] = (len(set(out["row"])) - refused.total(), refused)
        examples = [(r, d) for r, d in zip(out["drop"], out["detail"]) if r][:3]
        assert not refused, f"{name}: {dict(refused)}; e.g. {examples}"
        assert not any(out["truncated"])
        sample = out.select(range(0, len(out), ORACLE_STRIDE))
        for row in sample:
            check_row(row, tok, tok.chat_template, end_of_turn=tok.end_of_turn)
    print(f"\n{'template':<10} {'rows':>6} {'kept':>6} refused")  # shown with pytest -s
    for name, (n_kept, refused) in counts.items():
        print(f"{name:<10} {len(ds):>6} {n_kept:>6} {dict(refused) or 0}")


# ---------------------------------------------------------------- templates as the community writes them
# A chatml written with the whitespace between its tags left in (trim_blocks/lstrip_blocks remove only
# part of it): every message printed indented, blank lines between turns, and a generation prompt that
# ends with one more newline than the rendered turn has after "assistant\n".
LOOSE_CHATML = """{% if messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{% endif %}

{% for message in messages %}
    {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\\n' }}
{% endif %}
"""


def n_turn_chats(most=6):
    return [chat(*[message(role, f"{role} {k}: {'why ' * k}so?") for k in range(n) for role in ("user", "assistant")])
            for n in range(2, most + 1)]


@pytest.mark.parametrize("tokenizer", [GPT2, "qwen3"])
def test_loose_whitespace_template_keeps_every_multi_turn_row(tokenizer):
    """Every row and turn kept, each as inference renders it. Qwen3's vocabulary has `<|im_end|>` as a special
    token: one example per row. GPT-2's has not, so `<|im_end|>` is plain text and only an EOS, which can
    end an example but not sit inside the template's text, can teach the model to stop: one example per turn."""
    from conftest import shared_file
    path = GPT2 if tokenizer == GPT2 else str(shared_file(f"tokenizers/{tokenizer}"))
    rows = n_turn_chats()
    out, tok = mask(rows, path, LOOSE_CHATML)
    assert not any(out["drop"]), [d for d in out["detail"] if d][:2]
    kept = sorted((row["row"], t) for row in out for t in row["turns"])
    assert kept == [(r, i) for r, row in enumerate(rows) for i in range(1, len(row["messages"]), 2)]
    split = tokenizer == GPT2
    assert all(out["split"]) if split else not any(out["split"])
    for row in out:
        text = check_row(row, tok, LOOSE_CHATML)
        trained = decode(tok, [t for t in row["labels"] if t != -100])
        assert trained.endswith("<|im_end|>" + (tok.eos_token if split else ""))
        assert text.startswith("<|im_start|>system\n")
        assert (masking._SPLIT_WHY["end_of_turn_not_trained"] in row["notes"]) == split, row["notes"]
    from sft_recipes import prepare, sources, summary
    notes = summary.data_notes({"train": prepare._stats(out, sources.Drops())})
    assert any(line.startswith("train: 5 rows trained as one example per turn (20 examples") for line in notes) == split
    assert any("20 examples: one example per turn: a turn ends with no special token" in n for n in notes) == split


def test_loose_whitespace_template_under_multi_turn_joint_refuses_what_it_cannot_keep_whole():
    out, _ = mask(n_turn_chats(3), GPT2, LOOSE_CHATML, multi_turn="joint")
    assert out["drop"] == ["end_of_turn_not_trained"] * 2, out["detail"]
    assert "ends with no special token and the example goes on" in out["detail"][0]


def test_declaring_the_templates_markers_as_special_tokens_keeps_each_row_whole():
    """The header comment our shipped templates carry works on a user's own: the markers become single special
    tokens of GPT-2's vocabulary, every turn ends with one, and each row stays one example."""
    source = "{#- special_tokens: <|im_start|> <|im_end|> -#}\n" + LOOSE_CHATML
    out, tok = mask(n_turn_chats(), GPT2, source)
    assert out["drop"] == [None] * 5 and not any(out["split"]), out["detail"]
    for row in out:
        check_row(row, tok, source)
