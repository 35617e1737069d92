"""Loss masks: what is trained under each option, what BPE-hostile text does to them, and proof that
the labels we make are the labels TRL trains on (padded and packed) and the labels `inspect` shows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mask_oracle import (GPT2, TINY, chat, check_row, decode, mask, message, plain, render,
                         tokenizer_for)

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny_alpaca.yaml"

TWO_TURNS = chat(message("system", "You answer in one line."),
                 message("user", "Name a fruit."), message("assistant", "An apple."),
                 message("user", "And a vegetable?"), message("assistant", "A carrot, which is orange."))


def trained_text(row, tok) -> str:
    return decode(tok, [label for label in row["labels"] if label != -100])


# ---------------------------------------------------------------- which turns are trained
def test_last_assistant_trains_only_the_final_turn():
    out, tok = mask([TWO_TURNS], TINY, "chatml", train_on="last_assistant")
    check_row(out[0], tok, tok.chat_template, end_of_turn=tok.end_of_turn, trained={4})
    assert trained_text(out[0], tok) == "A carrot, which is orange.<|im_end|>"


def test_assistant_turn_marked_train_false_is_not_trained():
    row = chat(*TWO_TURNS["messages"][:2], message("assistant", "An apple.", train=False), *TWO_TURNS["messages"][3:])
    out, tok = mask([row], TINY, "chatml")
    check_row(out[0], tok, tok.chat_template, end_of_turn=tok.end_of_turn, trained={4})


def test_user_turn_marked_train_true_is_trained_as_its_content():
    row = chat(message("user", "Name a fruit.", train=True), message("assistant", "An apple."))
    out, tok = mask([row], TINY, "chatml")
    check_row(out[0], tok, tok.chat_template, end_of_turn=tok.end_of_turn, trained={0, 1})
    assert trained_text(out[0], tok) == "Name a fruit.An apple.<|im_end|>"


def test_row_with_every_assistant_turn_untrained_is_dropped():
    row = chat(message("user", "Name a fruit."), message("assistant", "An apple.", train=False))
    out, _ = mask([row, TWO_TURNS], TINY, "chatml")
    assert out["drop"] == ["no_trained_tokens", None]


def test_train_on_inputs_trains_every_token():
    out, tok = mask([TWO_TURNS], TINY, "chatml", train_on_inputs=True)
    row = out[0]
    assert row["drop"] is None and row["labels"] == row["input_ids"]
    assert decode(tok, row["input_ids"]) == render(tok, TWO_TURNS["messages"], None, tok.chat_template)


def test_plain_text_rows_train_every_token_and_eos():
    texts = ["Once upon a time, a dragon lived by the river.", "  leading spaces,\ttabs\nand newlines \n"]
    out, tok = mask([plain(t) for t in texts], TINY, "chatml")
    for text, row in zip(texts, out):
        assert row["drop"] is None
        assert row["labels"] == row["input_ids"]
        assert decode(tok, row["input_ids"]) == text + tok.eos_token
        assert row["input_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("options", [{}, {"train_on": "last_assistant"}, {"train_on_inputs": True}])
def test_verify_masks_false_changes_no_label(options):
    """`verify_masks` decides whether rows are checked, never which tokens are trained.

    Fails today for a user turn with `train: true`: with verify off, `_prepare` skips `_locate`, so
    the user turn is silently left untrained (see the report)."""
    rows = [TWO_TURNS,
            chat(message("user", "Name a fruit.", train=True), message("assistant", "An apple.")),
            chat(message("user", "Name a fruit."), message("assistant", "A pear.", train=False),
                 message("user", "Another?"), message("assistant", "A plum."))]
    checked, _ = mask(rows, TINY, "chatml", **options)
    unchecked, _ = mask(rows, TINY, "chatml", verify_masks=False, **options)
    assert checked["drop"] == [None] * len(rows)
    assert unchecked["labels"] == checked["labels"]


# ---------------------------------------------------------------- truncation at max_length
SHORT = chat(message("user", "Hi"), message("assistant", "Hello."))
LONG_PROMPT = chat(message("user", " ".join(["apple banana cherry"] * 30)), message("assistant", "Fruit."))


@pytest.fixture(scope="module")
def untruncated():
    """Full-length masks of SHORT, TWO_TURNS, LONG_PROMPT and a max_length that cuts TWO_TURNS
    inside its second turn, fits SHORT, and leaves nothing of LONG_PROMPT's answer."""
    out, tok = mask([SHORT, TWO_TURNS, LONG_PROMPT], TINY, "chatml")
    first_turn_end = next(k for k, label in enumerate(out[1]["labels"]) if label != -100)
    while out[1]["labels"][first_turn_end] != -100:
        first_turn_end += 1
    limit = first_turn_end + 3
    assert out[0]["n_tokens"] <= limit < out[1]["n_tokens"]
    assert out[1]["labels"][limit - 1] == -100  # the cut falls in the second turn's prompt
    assert out[2]["labels"].index(next(x for x in out[2]["labels"] if x != -100)) > limit
    return out, tok, limit, first_turn_end


def _truncated(untruncated, policy):
    full, tok, limit, _ = untruncated
    out, _ = mask([SHORT, TWO_TURNS, LONG_PROMPT], TINY, "chatml", max_length=limit, truncation=policy)
    assert out[0]["drop"] is None and not out[0]["truncated"]
    assert (out[0]["input_ids"], out[0]["labels"]) == (full[0]["input_ids"], full[0]["labels"])
    return out


def test_keep_start_keeps_the_first_max_length_tokens(untruncated):
    full, tok, limit, _ = untruncated
    out = _truncated(untruncated, "keep_start")
    assert out["drop"] == [None, None, "no_trained_tokens_after_truncation"]
    row = out[1]
    assert row["truncated"] and row["n_tokens"] == limit == len(row["input_ids"])
    assert row["input_ids"] == full[1]["input_ids"][:limit]
    assert row["labels"] == full[1]["labels"][:limit]
    assert row["n_trained"] == sum(label != -100 for label in row["labels"]) > 0


def test_turn_boundary_cuts_after_the_last_whole_trained_turn(untruncated):
    full, tok, limit, first_turn_end = untruncated
    out = _truncated(untruncated, "turn_boundary")
    assert out["drop"] == [None, None, "no_trained_tokens_after_truncation"]
    row = out[1]
    assert row["truncated"] and row["n_tokens"] == first_turn_end < limit
    assert row["labels"] == full[1]["labels"][:first_turn_end]
    assert row["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert trained_text(row, tok) == "An apple.<|im_end|>"


def test_drop_row_refuses_every_row_over_max_length(untruncated):
    out = _truncated(untruncated, "drop_row")
    assert out["drop"] == [None, "longer_than_max_length", "longer_than_max_length"]


# ---------------------------------------------------------------- known false refusal
@pytest.mark.parametrize("name", ["alpaca", "chatml", "gemma", "llama2", "llama3", "mistral", "phi3",
                                  "vicuna", "zephyr"])
def test_user_reply_that_is_part_of_the_end_of_turn_text_is_kept(name):
    """A user turn whose whole content also occurs inside the previous assistant turn's end-of-turn
    text ("end" is in "<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>") is an ordinary
    row. Today it is refused as `trained_token_in_untrained_turn`: `_locate` searches the user
    content from the end of the assistant's *content*, finds it inside the trained end-of-turn
    token, and reports a bogus overlap (see the report)."""
    row = chat(message("user", "Let's play a word game. Say a word."), message("assistant", "Apple"),
               message("user", "end"), message("assistant", "Thanks for playing!"))
    out, tok = mask([row], TINY, name)
    check_row(out[0], tok, tok.chat_template, end_of_turn=tok.end_of_turn)


def test_special_token_text_in_tools_is_refused():
    """Tool schemas are printed into the prompt verbatim: '<|im_end|>' there would end a turn early."""
    import json
    tools = [{"type": "function", "function": {"name": "f", "description": "stop at <|im_end|>", "parameters": {}}}]
    plain_tools = [{"type": "function", "function": {"name": "f", "description": "stop", "parameters": {}}}]
    turns = (message("user", "Call f."), message("assistant", "Done."))
    out, _ = mask([chat(*turns, tools=json.dumps(tools)), chat(*turns, tools=json.dumps(plain_tools))], GPT2, "chatml")
    assert out[0]["drop"] == "special_token_text_in_tools" and "<|im_end|>" in out[0]["detail"]
    assert out[1]["drop"] is None


# ---------------------------------------------------------------- BPE-hostile text, property-based
LOOKALIKES = ["### Response:", "### Response:\n", "### Instruction:\n", "<|im_start|>assistant\n", "im_end|>",
              "[/INST]", "[INST] ", "</s>", "<s>", "USER:", "ASSISTANT:", "<|start_header_id|>", "endoftext",
              "<|assistant|>\n", "<start_of_turn>model\n", "{{ eos_token }}", "{% generation %}", "<|", "|>"]
SPECIAL_TEXT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|pad|>"]  # control tokens somewhere
SPACING = [" ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0", "\u200b"]
UNICODE = ["é", "naïve", "Ω≈ç", "😀", "👍🏽", "🏳️‍🌈", "日本語", "中文字", "한국어", "ﬁ", "x", "42", "Hello", " world"]
fragment = st.one_of(  # special text in about 1 fragment of 80, so most conversations are kept
    st.sampled_from((LOOKALIKES + SPACING + UNICODE) * 6 + SPECIAL_TEXT),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=6))
content = st.lists(fragment, min_size=1, max_size=5).map("".join).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    """A system prompt or not, then user/assistant exchanges, some calling a tool (structured calls with
    hostile names and argument values) and getting its result, some with reasoning, the first user turn
    sometimes in the Alpaca instruction + input shape."""
    messages = [message("system", draw(content))] if draw(st.booleans()) else []
    tools = []
    for turn in range(draw(st.integers(1, 3))):
        user = draw(content)
        if turn == 0 and draw(st.booleans()):
            extra = draw(content)
            messages.append(message("user", f"{user}\n\n{extra}", input=extra))
        else:
            messages.append(message("user", user))
        if draw(st.booleans()):
            name = draw(content)
            call = {"type": "function", "function": {"name": name, "arguments": {draw(content): draw(content)}}}
            tools.append({"type": "function", "function": {"name": name, "parameters": {}}})
            messages += [message("assistant", draw(st.sampled_from(["", "Let me check."])), tool_calls=[call],
                                 reasoning=draw(st.one_of(st.none(), content))),
                         message("tool", draw(content), name=draw(st.one_of(st.none(), st.just(name))))]
        messages.append(message("assistant", draw(content), reasoning=draw(st.one_of(st.none(), content))))
    return chat(*messages, tools=json.dumps(tools) if tools else None)


def special_text_in(conversation, specials) -> bool:
    texts = [conversation["tools"] or ""] + [m[k] or "" for m in conversation["messages"]
                                             for k in ("content", "reasoning_content", "tool_calls")]
    return any(t in text for text in texts for t in specials)


# A row may be refused only for special_token_text_in_content: exactly when a message contains the
# text of a token the tokenizer treats as a control token (EOS, pad, the template's markers); tokenized
# as such it would fake a turn boundary or an end of text. Text that BPE would merge across the start
# of a turn ("### Response:\n" + an answer opening with "\n") is no reason: the prompt is tokenized as
# inference tokenizes it, on its own, and a multi-turn row that can't be one example becomes one per turn.


@pytest.mark.parametrize("name", ["alpaca", "chatml", "llama3", "llama2"])
@settings(max_examples=4, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(rows=st.lists(conversations(), min_size=10, max_size=15))
def test_hostile_text_is_masked_exactly_or_refused_for_a_stated_reason(name, rows):
    """Each example masks a batch of conversations in one call (fingerprinting the GPT-2 tokenizer
    costs `datasets` most of a second per call), ~50 conversations per template. Shrinking is off
    for the same reason; a failure names its conversation."""
    out, tok = mask(rows, GPT2, name)
    specials = [t for t in tok.get_added_vocab() if t]
    for r, conversation in enumerate(rows):
        examples = [row for row in out if row["row"] == r]
        where = f"{[(x['drop'], x['detail']) for x in examples]} on {conversation['messages']}"
        if special_text_in(conversation, specials):
            assert [x["drop"] for x in examples] in (["special_token_text_in_content"],
                                                     ["special_token_text_in_tools"]), where
            continue
        assert all(x["drop"] is None for x in examples), where
        for row in examples:
            check_row(row, tok, tok.chat_template, end_of_turn=tok.end_of_turn)
        trained = sorted(t for x in examples for t in x["turns"])
        assert trained == [i for i, m in enumerate(conversation["messages"]) if m["role"] == "assistant"], where


# ---------------------------------------------------------------- what reaches the model
@pytest.fixture(scope="module")
def labels_of():
    """Our masked training rows for the tiny recipe, as input_ids -> labels (input_ids identify a row)."""
    from sft_recipes import trainer as sft_trainer
    from sft_recipes.config import load_recipe
    recipe = load_recipe(str(TINY_RECIPE))
    ours, _, _ = sft_trainer.masked_datasets(recipe, sft_trainer.load_tokenizer(recipe))
    ours = ours.filter(lambda d: d is None, input_columns="drop")
    table = {tuple(ids): labels for ids, labels in zip(ours["input_ids"], ours["labels"])}
    assert len(table) == len(ours) > 2000
    return table


def first_batch(tmp_path, **overrides):
    from sft_recipes import trainer as sft_trainer
    from sft_recipes.config import load_recipe
    recipe = load_recipe(str(TINY_RECIPE), max_steps=1, output_dir=str(tmp_path), **overrides)
    return next(iter(sft_trainer.build_trainer(recipe).get_train_dataloader()))


def test_trainer_batches_carry_our_labels(tmp_path, labels_of):
    """Unpacked: rows padded to the longest, an attention_mask marking the real tokens."""
    from sft_recipes.config import load_recipe
    batch = first_batch(tmp_path, packing=False)
    assert len(batch["input_ids"]) == load_recipe(str(TINY_RECIPE)).sft.per_device_train_batch_size
    for ids, labels, attention in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                      batch["attention_mask"].tolist()):
        real = [k for k, a in enumerate(attention) if a]
        row_ids = tuple(ids[k] for k in real)
        assert row_ids in labels_of, "a batch row is not one of our masked rows"
        assert [labels[k] for k in real] == labels_of[row_ids]
        assert all(labels[k] == -100 for k, a in enumerate(attention) if not a)


def test_packed_trainer_batches_carry_our_labels(tmp_path, labels_of):
    """Packing on sdpa: each packed block is a row of documents, each restarting position_ids at 0; a row's
    padding is one-token runs at position 0. Every document's first label is -100 (ours too: a row's first
    token is never trained)."""
    from sft_recipes import load_recipe, load_tokenizer
    batch = first_batch(tmp_path, packing=True, per_device_train_batch_size=4)
    pad_id = load_tokenizer(load_recipe(str(TINY_RECIPE))).pad_token_id
    assert len(batch["input_ids"]) == 4 and "position_ids" in batch and "attention_mask" not in batch
    docs = pads = 0
    for ids, labels, positions in zip(*(batch[k].tolist() for k in ("input_ids", "labels", "position_ids"))):
        starts = [k for k, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            doc = tuple(ids[a:b])
            if doc == (pad_id,) and labels[a] == -100:
                pads += 1
                continue
            assert doc in labels_of, "a packed document is not one of our masked rows"
            assert labels_of[doc][0] == -100
            assert labels[a:b] == labels_of[doc]
            docs += 1
    assert docs > 4 and pads < batch["input_ids"].numel() / 10


# ---------------------------------------------------------------- what inspect exports
def test_inspect_export_masks_the_prompt_and_trains_response_and_eos(tmp_path):
    out = tmp_path / "rows.jsonl"
    tasks = json.dumps([{"path": "recipes/data/tiny_tasks.json"}])  # one-turn Alpaca rows (no tool chats)
    done = subprocess.run([sys.executable, "-m", "sft_recipes.inspect", str(TINY_RECIPE), "-n", "1",
                           "--datasets", tasks, "--export", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) > 2000 and {r["split"] for r in rows} == {"train", "eval"}
    tok = tokenizer_for(TINY, "alpaca")
    marker = "### Response:\n"
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        text = decode(tok, ids)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == ids
        prompt_end = text.index(marker) + len(marker)
        for (s, e), label in zip(enc["offset_mapping"], labels):
            assert (label == -100) == (e <= prompt_end), f"token {text[s:e]!r} at {s} wrongly masked"
        (answer,) = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained_text(row, tok) == answer + tok.eos_token
        assert labels[-1] == tok.eos_token_id
