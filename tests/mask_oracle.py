"""An oracle for loss masks that shares no code with `sft_recipes.masking`.

It renders the conversation with transformers' own `apply_chat_template`, finds every message's
content by rendering once more with each content replaced by a unique sentinel, frames each
assistant content the way the template's `{% generation %}` block does (evaluated here with plain
Jinja), tokenizes the rendered text itself, and then checks a masked row against what it found:

- the row's `input_ids` are the tokens of the rendered text (what the model sees at inference);
- every trained label equals its input id;
- the trained tokens, taken as maximal runs, decode to exactly the expected texts, in order: each
  trained assistant turn as the template frames it (ending with the end-of-turn text), or the bare
  content of a non-assistant message that asks to be trained;
- each run starts and ends exactly at its expected characters, and its last token is the
  end-of-turn token for assistant turns;
- no trained token touches the content of any message that is not trained.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import jinja2

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}(.*?)\{%-?\s*endgeneration\s*-?%\}", re.S)
IGNORE = -100


def sentinel(i: int, k: int) -> str:
    return f"\u27e6{i}.{k}\u27e7"  # ⟦i.k⟧: text no template prints by itself


def pieces(message: dict) -> list[str]:
    """What a template prints verbatim for a message: Alpaca rows print instruction and input apart."""
    content, extra = message["content"], message.get("input")
    if extra and content.endswith("\n\n" + extra):
        return [content[: -len(extra) - 2], extra]
    return [content]


def render(tokenizer, messages, tools, source) -> str:
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=False)


def framing(marked_source: str, tokenizer) -> tuple[str, str]:
    """(lead, tail) the generation block puts around an assistant's content."""
    return _framing(marked_source, tokenizer.eos_token, tokenizer.bos_token)


@lru_cache(maxsize=64)
def _framing(marked_source, eos_token, bos_token):
    (body,) = GENERATION_BLOCK.findall(marked_source)
    loop_variable = re.search(r"(\w+)\.content", body).group(1)  # `message` in the shipped templates
    out = jinja2.Environment().from_string(body).render(
        {loop_variable: {"role": "assistant", "content": "\x00"}}, eos_token=eos_token, bos_token=bos_token)
    lead, tail = out.split("\x00")
    return lead, tail


def content_spans(tokenizer, messages, tools, source, rendered) -> dict[int, list[tuple[int, int]]]:
    """Character spans of each message's printed pieces in `rendered`, found by sentinels."""
    marked, parts = [], []
    for i, m in enumerate(messages):
        ps = pieces(m)
        names = [sentinel(i, k) for k in range(len(ps))]
        content = "\n\n".join(names) if len(ps) == 2 else names[0]
        marked.append({**m, "content": content, "input": names[1] if len(ps) == 2 else m.get("input")})
        parts += zip(names, ps, [i] * len(ps))
    probe = render(tokenizer, marked, tools, source)
    found = []
    for name, piece, i in parts:
        assert probe.count(name) == 1, f"the template prints message {i} {probe.count(name)} times"
        found.append((probe.index(name), name, piece, i))
    found.sort()
    spans, shift = {}, 0
    for at, name, piece, i in found:
        start = at + shift
        assert rendered[start:start + len(piece)] == piece, f"message {i} is not printed verbatim"
        spans.setdefault(i, []).append((start, start + len(piece)))
        shift += len(piece) - len(name)
    assert len(rendered) == len(probe) + shift, "the template prints something that depends on content"
    return spans


@dataclass
class Expected:
    rendered: str                      # the conversation as the template prints it
    trained: list[tuple[int, int]]     # character spans that must be trained, one per trained message
    quiet: list[tuple[int, int]]       # contents of messages that must not be trained
    turn_ends: list[int]               # where each trained assistant turn ends (its end-of-turn text)

    def runs(self) -> list[tuple[int, int]]:
        """Trained spans merged where they touch: the maximal runs of trained tokens."""
        merged = []
        for s, e in sorted(self.trained):
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        return merged

    def split_tokens(self, offsets) -> list[str]:
        """Tokens that straddle the start or end of a trained span: with one, no exact mask exists."""
        cuts = {x for span in self.trained for x in span}
        return [self.rendered[s:e] for s, e in offsets if any(s < c < e for c in cuts)]


def expected(tokenizer, messages, tools, source, *, marked_source=None, trained=None) -> Expected:
    """What a correct mask trains on this conversation. `trained`: indices of the trained messages
    (default: every assistant message not marked `train: false`)."""
    rendered = render(tokenizer, messages, tools, source)
    spans = content_spans(tokenizer, messages, tools, source, rendered)
    lead, tail = framing(marked_source or source, tokenizer)
    if trained is None:
        trained = {i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train") is not False}
    want, quiet, turn_ends = [], [], []
    for i, m in enumerate(messages):
        start, end = spans[i][0][0], spans[i][-1][1]
        if i not in trained:
            quiet += spans[i]
            continue
        if m["role"] == "assistant":
            start, end = start - len(lead), end + len(tail)
            assert rendered[start:end] == lead + m["content"] + tail
            turn_ends.append(end)
        want.append((start, end))
    return Expected(rendered, want, quiet, turn_ends)


def runs(labels) -> list[tuple[int, int]]:
    """Maximal [a, b) runs of trained positions."""
    out, a = [], None
    for k, label in enumerate(list(labels) + [IGNORE]):
        if label != IGNORE and a is None:
            a = k
        elif label == IGNORE and a is not None:
            out.append((a, k))
            a = None
    return out


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_row(row, tokenizer, source, *, end_of_turn, marked_source=None, trained=None):
    """Assert that a kept masked row trains exactly what the template says, nothing else."""
    assert row["drop"] is None, f"refused: {row['drop']}: {row['detail']}"
    messages = row["messages"]
    assert framing(marked_source or source, tokenizer)[1].endswith(end_of_turn)
    exp = expected(tokenizer, messages, row["tools"], source, marked_source=marked_source, trained=trained)
    rendered, want, quiet, turn_ends = exp.rendered, exp.runs(), exp.quiet, exp.turn_ends
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets, labels = row["input_ids"], enc["offset_mapping"], row["labels"]
    assert ids == enc["input_ids"], "input_ids are not the tokens of the rendered conversation"
    assert len(labels) == len(ids)
    assert all(label in (IGNORE, i) for label, i in zip(labels, ids)), "a trained label differs from its token"
    got = runs(labels)
    assert [decode(tokenizer, ids[a:b]) for a, b in got] == [rendered[s:e] for s, e in want]
    assert [(offsets[a][0], offsets[b - 1][1]) for a, b in got] == want, "trained runs sit elsewhere"
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    last_token = {e: k for k, (s, e) in enumerate(offsets) if e > s}
    for end in turn_ends:  # each assistant turn closes with the end-of-turn token, trained
        k = last_token[end]
        assert ids[k] == eot and labels[k] == eot, f"turn ending at {end} does not train {end_of_turn!r}"
    untrained = bytearray(len(rendered))  # 1 for each character of an untrained message's content
    for qs, qe in quiet:
        untrained[qs:qe] = b"\x01" * (qe - qs)
    for a, b in got:
        for s, e in offsets[a:b]:
            assert not any(untrained[s:e]), f"trained token {rendered[s:e]!r} lies inside an untrained message"
    assert row["n_trained"] == sum(label != IGNORE for label in labels)
    return rendered


# ---------------------------------------------------------------- fixtures shared by the mask tests
# Everything below uses the library (recipe -> tokenizer -> masked rows); the oracle above does not.

def message(role, content, input=None, train=None) -> dict:
    return {"role": role, "content": content, "input": input, "train": train}


def chat(*messages, tools=None) -> dict:
    return {"messages": list(messages), "tools": tools, "text": None}


def plain(text) -> dict:
    return {"messages": [], "tools": None, "text": text}


def dataset(rows):
    from datasets import Dataset
    from sft_recipes.formats import CANONICAL_FEATURES
    features = CANONICAL_FEATURES.copy()
    del features["drop"]
    return Dataset.from_list(rows, features=features)


GPT2 = "gpt2"  # the real GPT-2 tokenizer from ../shared/data (tests skip without it)
TINY = "tiny:gpt2"  # the tiny tokenizer sft_recipes builds locally


def recipe(tokenizer=GPT2, template="chatml", **overrides):
    from conftest import shared_file
    from sft_recipes.config import load_recipe
    path = str(shared_file("gpt2-tokenizer")) if tokenizer == GPT2 else tokenizer
    return load_recipe(None, model_name_or_path=path, chat_template=template,
                       **{"max_length": 4096, **overrides})


_TOKENIZERS = {}


def tokenizer_for(tokenizer=GPT2, template="chatml"):
    """The recipe's tokenizer (template, its special tokens and pad added); loaded once per pair."""
    from sft_recipes import trainer
    key = (tokenizer, template)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = trainer.load_tokenizer(recipe(tokenizer, template))
    return _TOKENIZERS[key]


def mask(rows, tokenizer=GPT2, template="chatml", **overrides):
    """Masked rows for `rows` under a recipe with these overrides; returns (dataset, tokenizer)."""
    from sft_recipes import masking, trainer
    tok = tokenizer_for(tokenizer, template)
    opts = trainer.mask_options(recipe(tokenizer, template, **overrides), tok)
    return masking.tokenize(dataset(rows), tok, opts), tok
