"""Chat templates: every shipped template trains exactly each assistant turn as it frames it (end of
turn included) and nothing of any other message, with the real GPT-2 tokenizer and the tiny one; a
template without generation markers gives the same masks; a template that can't be trusted on a
row gets that row refused, never trained; and the three shared datasets pass in full."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from mask_oracle import GPT2, TINY, chat, check_row, mask, message, render, tokenizer_for
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
    assert out["drop"] == [None] * len(rows), list(zip(CONVERSATIONS, out["detail"]))
    for row in out:
        check_row(row, tok, tok.chat_template, end_of_turn=tok.end_of_turn)


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
    assert unmarked["drop"] == [None] * len(rows), unmarked["detail"]
    assert unmarked["input_ids"] == marked["input_ids"]
    assert unmarked["labels"] == marked["labels"]
    for row in unmarked:
        check_row(row, plain_tok, plain_source, end_of_turn=tok.end_of_turn, marked_source=tok.chat_template)


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
    "{%- endfor -%}")


@pytest.mark.parametrize("source, reason", [
    (SHORTENS_EARLIER, "template_rewrites_earlier_turns"),
    (DROPS_EARLIER, "template_rewrites_earlier_turns"),
    (ALWAYS_RAISES, "template_error"),
    (MARKS_LAST_ONLY, "template_marks_wrong_turns"),
])
def test_untrustworthy_template_rows_are_refused(source, reason):
    out, _ = mask(MULTI_TURN, TINY, source)
    assert out["drop"] == [reason] * len(MULTI_TURN), out["detail"]
    assert all(n == 0 for n in out["n_trained"])


def test_rewriting_template_is_fine_on_rows_it_does_not_rewrite():
    """The prefix check refuses only rows it can't trust: a single turn has nothing to rewrite."""
    out, tok = mask([CONVERSATIONS["single_turn"]], TINY, SHORTENS_EARLIER)
    assert out["drop"] == [None]
    trained = [i for i, label in zip(out[0]["input_ids"], out[0]["labels"]) if label != -100]
    assert tok.decode(trained) == "The capital of France is Paris." + tok.eos_token


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
    "{%- else -%}{{- 'User:\\n' + m.content + '\\n' -}}{%- endif -%}{%- endfor -%}")


def test_template_that_never_trains_an_end_of_turn_is_refused():
    """A kept row must teach the model to stop. With this template the trained tokens are just
    "Hello." and the EOS after it is never trained; today the row is kept, because the check for
    the end of turn is skipped whenever the template declares no `end_of_turn` (see the report)."""
    out, tok = mask([chat(message("user", "Hi"), message("assistant", "Hello."))], TINY, EOS_OUTSIDE_GENERATION)
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
SHARED = ["instruction-data.json", "alpaca_en_demo.json", "glaive_toolcall_en_demo.json"]
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
    """Acceptance: all templates, every row of the three shared datasets, GPT-2 tokenizer, nothing
    truncated: the verifier keeps 100 % of the rows, and the oracle agrees with the masks of every
    ORACLE_STRIDE-th row (all rows would take a minute; the other tests check the oracle's way)."""
    ds = shared_conversations
    counts = {}
    for name in TEMPLATES:
        tok = tokenizer_for(GPT2, name)
        opts = masking.MaskOptions(template=tok.chat_template, end_of_turn=tok.end_of_turn, max_length=None)
        out = masking.tokenize(ds, tok, opts)
        refused = Counter(r for r in out["drop"] if r is not None)
        counts[name] = (len(out) - refused.total(), refused)
        examples = [(r, d) for r, d in zip(out["drop"], out["detail"]) if r][:3]
        assert not refused, f"{name}: {dict(refused)}; e.g. {examples}"
        assert not any(out["truncated"])
        sample = out.select(range(0, len(out), ORACLE_STRIDE))
        for row in sample.select_columns(["messages", "tools", "input_ids", "labels", "drop", "detail", "n_trained"]):
            check_row(row, tok, tok.chat_template, end_of_turn=tok.end_of_turn)
    print(f"\n{'template':<10} {'rows':>6} {'kept':>6} refused")  # shown with pytest -s
    for name, (n_kept, refused) in counts.items():
        print(f"{name:<10} {len(ds):>6} {n_kept:>6} {dict(refused) or 0}")
