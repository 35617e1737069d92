"""An oracle for loss masks that shares no code with `sft_recipes.masking` or `sft_recipes.templates`.

It defines a correct example by what inference does, using transformers' own `apply_chat_template`:
for each trained assistant turn i of an example covering `messages[:n]`,
- the prompt is `apply_chat_template(messages[:i], add_generation_prompt=True)` and the turn is what
  `apply_chat_template(messages[:i+1])` prints after it (trailing whitespace excluded);
- the example's text, `apply_chat_template(messages[:n])`, starts with that rendering (so the turn
  sits after exactly the prompt inference would show), and the example's first tokens are the
  tokens of that prompt tokenized on its own;
then checks a masked example against it:
- the tokens decode to the example's text (byte-level tokenizers);
- every trained label equals its input id;
- the trained tokens, taken as maximal runs, decode to exactly the expected texts, in order: each
  trained assistant turn, or the bare content of a non-assistant message that asks to be trained
  (found by rendering once more with each content replaced by a unique sentinel);
- each assistant run ends with the end-of-turn token (a special token when none is declared).
Tokens before a turn are the prompt's own, and a turn's tokens are exactly its text, so no trained
token can lie in another message.
"""
from __future__ import annotations

import json

IGNORE = -100


def sentinel(i: int, k: int) -> str:
    return f"\u27e6{i}.{k}\u27e7"  # ⟦i.k⟧: text no template prints by itself


def pieces(message: dict) -> list[str]:
    """What a template prints verbatim for a message: Alpaca rows print instruction and input apart."""
    content, extra = message["content"], message.get("input")
    if extra and content.endswith("\n\n" + extra):
        return [content[: -len(extra) - 2], extra]
    return [content]


def as_template_messages(messages) -> list[dict]:
    """Stored messages as OpenAI-style dicts: only keys with a value, tool calls parsed. (transformers
    itself copies `reasoning_content` to the names other templates read.)"""
    out = []
    for m in messages:
        msg = {k: m[k] for k in ("role", "content", "input", "reasoning_content", "name", "tool_call_id")
               if m.get(k) is not None}
        if m.get("tool_calls"):
            msg["tool_calls"] = json.loads(m["tool_calls"])
        out.append(msg)
    return out


def render(tokenizer, messages, tools, source, add_generation_prompt=False, **kwargs) -> str:
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return tokenizer.apply_chat_template(as_template_messages(messages), tools=tools, chat_template=source,
                                         tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def content_spans(tokenizer, messages, tools, source, rendered, **kwargs) -> dict[int, list[tuple[int, int]]]:
    """Character spans of each message's printed pieces in `rendered`, found by sentinels."""
    marked, parts = [], []
    for i, m in enumerate(messages):
        ps = pieces(m)
        names = [sentinel(i, k) for k in range(len(ps))]
        content = "\n\n".join(names) if len(ps) == 2 else names[0]
        marked.append({**m, "content": content, "input": names[1] if len(ps) == 2 else m.get("input")})
        parts += zip(names, ps, [i] * len(ps))
    probe = render(tokenizer, marked, tools, source, **kwargs)
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
    return spans


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


def tokens(tokenizer, text) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def example_of(row) -> tuple[list[dict], set[int]]:
    """(the messages an example covers, the indices trained in it); rows made before per-turn examples
    existed (or built by hand) cover all their messages."""
    messages = row["messages"][: row["n_messages"]] if row.get("n_messages") else row["messages"]
    if row.get("turns") is not None:
        return messages, set(row["turns"])
    return messages, {i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train") is not False}


def check_row(row, tokenizer, source, *, end_of_turn=None, trained=None, exact_decode=True, kwargs=None):
    """Assert that a kept example trains exactly what inference asks the model to write, nothing else.
    Returns the example's rendered text."""
    assert row["drop"] is None, f"refused: {row['drop']}: {row['detail']}"
    messages, turns = example_of(row)
    turns = set(trained) if trained is not None else turns
    kw = {**(kwargs or {}), **json.loads(row.get("chat_template_kwargs") or "{}")}
    rendered = render(tokenizer, messages, row["tools"], source, **kw)
    ids, labels = row["input_ids"], row["labels"]
    if exact_decode:
        assert decode(tokenizer, ids) == rendered, "the tokens are not the rendered example"
    assert len(labels) == len(ids)
    assert all(label in (IGNORE, i) for label, i in zip(labels, ids)), "a trained label differs from its token"
    want, firsts, ends = [], [], []
    spans = None
    for i in sorted(turns):
        if messages[i]["role"] != "assistant":  # a message that asks to be trained: its content
            spans = spans or content_spans(tokenizer, messages, row["tools"], source, rendered, **kw)
            want += [rendered[s:e] for s, e in spans[i]]
            continue
        prompt = render(tokenizer, messages[:i], row["tools"], source, add_generation_prompt=True, **kw)
        upto = render(tokenizer, messages[: i + 1], row["tools"], source, **kw).rstrip()
        assert upto.startswith(prompt), f"turn {i}: the generation prompt does not start the turn"
        assert rendered.startswith(upto), f"turn {i} sits after a different history than inference shows"
        prompt_ids = tokens(tokenizer, prompt)
        assert ids[: len(prompt_ids)] == prompt_ids, f"turn {i}: its prompt is tokenized unlike inference"
        want.append(upto[len(prompt):])
        firsts.append(len(prompt_ids))
    got = runs(labels)
    got_text, pending = [decode(tokenizer, ids[a:b]) for a, b in got], list(want)
    for text in got_text:  # each run is one expected text, or several that touch
        joined = ""
        while pending and len(joined) < len(text):
            joined += pending.pop(0)
        assert joined == text, f"trained {got_text} != expected {want}"
    assert not pending, f"not trained: {pending}"
    assert [a for a, _ in got if a in firsts] == firsts, "an assistant turn's first token is not trained"
    stops = {tokenizer.convert_tokens_to_ids(end_of_turn)} if end_of_turn else {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for a, b in got:  # each run that ends a turn closes with its stop token
        if b - 1 >= 0 and (b == len(ids) or labels[b] == IGNORE) and any(a <= f < b for f in firsts):
            last = [k for k in range(a, b)][-1]
            assert ids[last] in stops, f"a trained turn ends with {decode(tokenizer, [ids[last]])!r}"
    assert row["n_trained"] == sum(label != IGNORE for label in labels)
    return rendered


# ---------------------------------------------------------------- fixtures shared by the mask tests
# Everything below uses the library (recipe -> tokenizer -> masked rows); the oracle above does not.

def message(role, content, input=None, train=None, reasoning=None, tool_calls=None, name=None,
            tool_call_id=None) -> dict:
    return {"role": role, "content": content, "input": input, "train": train, "reasoning_content": reasoning,
            "tool_calls": json.dumps(tool_calls) if tool_calls else None, "name": name,
            "tool_call_id": tool_call_id}


def chat(*messages, tools=None, kwargs=None) -> dict:
    return {"messages": list(messages), "tools": tools, "text": None, "unused": [],
            "chat_template_kwargs": json.dumps(kwargs) if kwargs else None}


def plain(text) -> dict:
    return {"messages": [], "tools": None, "text": text, "unused": [], "chat_template_kwargs": None}


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
