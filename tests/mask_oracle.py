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


def as_template_messages(messages, args_as_text=False, as_written=False) -> list[dict]:
    """Stored messages as OpenAI-style dicts: only keys with a value, tool calls parsed (their arguments
    as JSON text for templates that concatenate them as text). transformers itself copies
    `reasoning_content` to the names other templates read. `as_written`: an answer whose `<think>` block
    the data wrote inline gets its content back as the user wrote it."""
    out = []
    for m in messages:
        msg = {k: m[k] for k in ("role", "content", "input", "reasoning_content", "name", "tool_call_id")
               if m.get(k) is not None}
        if as_written and m.get("inline_reasoning"):
            msg["content"] = m["inline_reasoning"] + m["content"]
            del msg["reasoning_content"]
        if m.get("tool_calls"):
            msg["tool_calls"] = json.loads(m["tool_calls"])
            for call in msg["tool_calls"] if args_as_text else ():
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
        out.append(msg)
    return out


def render(tokenizer, messages, tools, source, add_generation_prompt=False, args_as_text=False, as_written=False,
           **kwargs) -> str:
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return tokenizer.apply_chat_template(as_template_messages(messages, args_as_text, as_written), tools=tools,
                                         chat_template=source, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


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


def special_texts(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def check_row(row, tokenizer, source, *, end_of_turn=None, trained=None, exact_decode=True, kwargs=None):
    """Assert that a kept example trains exactly what inference asks the model to write, nothing else.

    Turn i follows `render(messages[:i], add_generation_prompt=True)`, tokenized on its own. Two
    template habits are allowed: the generation prompt pre-fills text the rendered turn lacks
    (DeepSeek-R1's "<think>\n"): the rendering is kept and the turn's untrained head must be a prefix
    of the generation prompt's own text; or the history prints differently once the turn exists: with
    only reasoning left out (gpt-oss) the example is the template's rendering and the turn ends it, right
    after its generation prompt; with a message left out, the turn follows the inference prompt. A turn that ends
    with no stop token of its own may be trained with the special token the template prints next.
    Returns the example's text."""
    assert row["drop"] is None, f"refused: {row['drop']}: {row['detail']}"
    messages, turns = example_of(row)
    turns = sorted(set(trained) if trained is not None else turns)
    kw = {**(kwargs or {}), **json.loads(row.get("chat_template_kwargs") or "{}")}
    if any("arguments as JSON text" in n for n in row.get("notes") or ()):
        kw["args_as_text"] = True
    if any("given to the template as written" in n for n in row.get("notes") or ()):
        kw["as_written"] = True
    ids, labels, tools = row["input_ids"], row["labels"], row["tools"]
    text = decode(tokenizer, ids)
    assert len(labels) == len(ids)
    assert all(label in (IGNORE, i) for label, i in zip(labels, ids)), "a trained label differs from its token"
    stops = [end_of_turn] if end_of_turn else special_texts(tokenizer)
    rendered = render(tokenizer, messages, tools, source, **kw)
    spans = None
    expected = []  # (message index, kind) per trained run, in order
    for i in turns:
        if messages[i]["role"] == "assistant":
            expected.append((i, None))
        else:
            spans = spans or content_spans(tokenizer, messages, tools, source, rendered, **kw)
            expected += [(i, rendered[s:e]) for s, e in spans[i]]
    got = runs(labels)
    assert len(got) == len(expected), f"{len(got)} trained runs for {expected}"
    rewritten = False
    # Tokenizers whose normalizer is not undone by decoding (Phi-3 prints "▁" after special tokens)
    # compare texts as they come back from a round trip.
    same = (lambda t: t) if exact_decode else (lambda t: decode(tokenizer, tokens(tokenizer, t)))
    for (a, b), (i, piece) in zip(got, expected):
        trained_text = decode(tokenizer, ids[a:b])
        if piece is not None:  # a non-assistant message that asks to be trained: its bare content
            assert trained_text == piece, f"message {i}: trained {trained_text!r}, not its content {piece!r}"
            continue
        prompt = render(tokenizer, messages[:i], tools, source, add_generation_prompt=True, **kw)
        upto = render(tokenizer, messages[: i + 1], tools, source, **kw)
        base = render(tokenizer, messages[:i], tools, source, **kw)
        head = decode(tokenizer, ids[:a])
        if upto.startswith(prompt):
            assert rendered.startswith(upto.rstrip()), f"turn {i} sits after a different history than inference shows"
            before, turn = prompt, upto[len(prompt):].rstrip()
        elif upto.startswith(base):  # pre-filled generation prompt
            gen = prompt[len(base):]
            cut = next(k for k in range(len(base), len(upto) + 1) if same(upto[:k]) == head)
            assert gen.startswith(upto[len(base):cut]), f"turn {i}: untrained head is not the prompt's"
            before, turn = upto[:cut], upto[cut:].rstrip()
        elif text.startswith(same(prompt)):  # history rewritten, a message lost: the turn follows the inference prompt
            rewritten = True
            before, turn = prompt, text[len(same(prompt)):].rstrip()
            assert any(upto.rstrip().endswith(turn[: len(turn) - len(t)] if turn.endswith(t) else turn)
                       for t in ["", *stops]), f"turn {i} is not how the template ends its rendering"
        else:  # history rewritten, reasoning left out only: the template's own rendering, the turn ending it
            gen = prompt[len(base):]
            assert gen and head.endswith(same(gen)), f"turn {i} does not follow its generation prompt"
            shown = lambda c: any(f in head for f in (c, json.dumps(c, ensure_ascii=False), json.dumps(c)))  # noqa: E731
            assert all(shown(m["content"].strip()) for m in messages[:i] if m["content"].strip()), \
                f"turn {i}: a message before it is missing from its history"
            before, turn = head, text[len(head):].rstrip()
            assert upto.rstrip().endswith(turn) or any(turn.endswith(t) and upto.rstrip().endswith(turn[:-len(t)])
                                                       for t in stops), f"turn {i} is not how the template ends it"
        assert head == same(before) and ids[:a] == tokens(tokenizer, before), \
            f"turn {i}: its prompt is tokenized unlike inference"
        turn = same(turn)
        assert trained_text.startswith(turn), f"turn {i}: trained {trained_text[-80:]!r}, expected {turn[-80:]!r}"
        stop = trained_text[len(turn):]
        assert not stop or stop.strip() in stops, f"turn {i} is trained with {stop!r} after it"
        assert any(trained_text.endswith(t) for t in stops), f"turn {i} ends with {trained_text[-20:]!r}, no stop"
        assert messages[i]["content"].strip() in trained_text, f"turn {i}: its answer is not in the trained text"
    if exact_decode and not rewritten:  # the rendering, a stop appended to a final turn without one aside
        body = rendered.rstrip()
        assert text == rendered or any(text == body + t + rendered[len(body):] for t in stops), \
            "the tokens are not the rendered example"
    assert row["n_trained"] == sum(label != IGNORE for label in labels)
    return text


# ---------------------------------------------------------------- fixtures shared by the mask tests
# Everything below uses the library (recipe -> tokenizer -> masked rows); the oracle above does not.

def message(role, content, input=None, train=None, reasoning=None, tool_calls=None, name=None,
            tool_call_id=None, inline_reasoning=None) -> dict:
    return {"role": role, "content": content, "input": input, "train": train, "reasoning_content": reasoning,
            "tool_calls": json.dumps(tool_calls) if tool_calls else None, "name": name,
            "tool_call_id": tool_call_id, "inline_reasoning": inline_reasoning}


def chat(*messages, tools=None, kwargs=None) -> dict:
    return {"messages": list(messages), "tools": tools, "text": None, "unused": [],
            "chat_template_kwargs": json.dumps(kwargs) if kwargs else None}


def plain(text) -> dict:
    return {"messages": [], "tools": None, "text": text, "unused": [], "chat_template_kwargs": None}


def dataset(rows):
    from datasets import Dataset
    from sft_recipes.formats import CANONICAL_FEATURES
    features = CANONICAL_FEATURES.copy()
    del features["drop"], features["detail"]
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
