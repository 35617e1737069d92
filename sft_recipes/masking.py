"""Conversations -> `input_ids` + `labels` (-100 outside trained tokens), verified row by row.

One render and one batched tokenization (with character offsets) per conversation: a token is
trained iff its characters lie wholly inside a trained span. The verifier then proves, per row,
that the trained tokens decode to exactly each trained turn as the template rendered it (ending
with the end-of-turn text), that no token straddles a turn boundary, and that no trained token
lies inside a system, user or tool message. A row that fails is dropped with its reason, never
trained on.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets.fingerprint import Hasher

from . import templates

TRAIN_ON = ("all_assistant", "last_assistant")
TRUNCATION = ("keep_start", "turn_boundary", "drop_row")

FEATURES = Features({
    "input_ids": List(Value("int32")), "labels": List(Value("int32")),
    "drop": Value("string"), "detail": Value("string"),
    "n_tokens": Value("int32"), "n_trained": Value("int32"), "truncated": Value("bool"),
})
ARROW = FEATURES.arrow_schema


@dataclass
class MaskOptions:
    template: str                      # Jinja source
    end_of_turn: str | None = None     # text every trained turn must end with (None: not checked)
    train_on: str = "all_assistant"
    train_on_inputs: bool = False
    max_length: int | None = None
    truncation: str = "keep_start"
    verify: bool = True


def tokenize(ds: Dataset, tokenizer, opts: MaskOptions, *, num_proc=None, desc="Tokenizing") -> Dataset:
    """Map canonical rows (messages/tools/text) to token columns; refused rows carry `drop`."""
    if not tokenizer.is_fast:
        raise ValueError("sft_recipes needs a fast tokenizer (character offsets)")
    # Arrow in, Arrow out: the conversations pass through as they are (no cast back to `features`, most of
    # the cost on long multi-turn rows) and the token columns are appended as typed Arrow arrays.
    out = ds.with_format("arrow").map(
        _tokenize_table, batched=True, batch_size=256, num_proc=num_proc, desc=desc,
        fn_kwargs={"tokenizer": tokenizer, "opts": opts}, new_fingerprint=fingerprint(ds, tokenizer, opts),
        features=Features({**ds.features, **FEATURES}) if len(ds) == 0 else None)
    return out.with_format(None)


def fingerprint(ds: Dataset, tokenizer, opts: MaskOptions) -> str:
    """The cache key of `tokenize`: what goes in and the code that runs. `datasets` would otherwise
    pickle the whole tokenizer object to hash it, most of a second on every call."""
    code = [(Path(__file__).parent / f).read_text() for f in ("masking.py", "templates.py")]
    return Hasher.hash([ds._fingerprint, asdict(opts), code, tokenizer.backend_tokenizer.to_str(),
                        tokenizer.special_tokens_map, type(tokenizer).__name__])


def _tokenize_table(table: pa.Table, tokenizer, opts: MaskOptions) -> pa.Table:
    rows = _tokenize_rows(*(table.column(c).to_pylist() for c in ("messages", "tools", "text")), tokenizer, opts)
    table = table.drop_columns([k for k in FEATURES if k in table.column_names])
    for field in ARROW:
        values = [row[field.name] for row in rows]
        column = _int_lists(values) if pa.types.is_list(field.type) else pa.array(values, type=field.type)
        table = table.append_column(field, column)
    return table


def _int_lists(lists) -> pa.Array:
    """A list<int32> column built flat: pa.array() on nested Python lists is about 8x slower."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(offsets, values)


def _tokenize_rows(conversations, tool_lists, texts, tokenizer, opts: MaskOptions) -> list[dict]:
    specials = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    added = _added_tokens_re(tokenizer)
    prepared = [_prepare(msgs, tools, text, opts, specials, added, tokenizer.eos_token or "")
                for msgs, tools, text in zip(conversations, tool_lists, texts)]
    encodings = _backend(tokenizer).encode_batch([p[0] for p in prepared], add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    rows = [_label_row(*p, e, opts, special) for p, e in zip(prepared, encodings)]
    if opts.verify and not opts.train_on_inputs:
        _verify_decoding(rows, prepared, tokenizer)
    return [_truncate(row, opts) if row["drop"] is None else row for row in rows]


def _backend(tokenizer):
    """The Rust tokenizer, reset as `tokenizer(...)` would reset it (no padding, no truncation: long
    rows are our truncation policy's job), without the wrapper's per-row Python conversion."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None:
        backend.no_padding()
    if backend.truncation is not None:
        backend.no_truncation()
    return backend


def _prepare(messages, tools, text, opts, specials, added, eos):
    """Render one row; return (text, trained, untrained, reason). `trained` holds (is_assistant_turn,
    char span) pairs; `untrained` the (message index, char span) of contents that must stay at -100."""
    if text is not None:  # plain text: the whole sequence is trained, EOS included
        return text + eos, [(False, (0, len(text) + len(eos)))], [], None
    for m in messages:
        if added and added.search(m["content"] or ""):
            return "", [], [], ("special_token_text_in_content", f"a {m['role']} message contains "
                                f"'{added.search(m['content']).group()}'")
    if added and tools and added.search(tools):  # JSON text, printed into the prompt as it is
        return "", [], [], ("special_token_text_in_tools", f"the tools contain '{added.search(tools).group()}'")
    try:
        rendered, spans = templates.render_with_spans(opts.template, messages, tools, **specials)
    except templates.TurnError as e:
        return "", [], [], e.args
    except Exception as e:  # a template that raises on this row (jinja error, raise_exception)
        return "", [], [], ("template_error", f"{type(e).__name__}: {e}")
    if opts.train_on_inputs:
        return rendered, [(False, (0, len(rendered)))], [], None
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    by_msg = dict(zip(assistant, spans))
    chosen = [i for i in assistant if messages[i]["train"] is not False]
    if opts.train_on == "last_assistant":
        chosen = chosen[-1:]
    located, err = _locate(rendered, messages, by_msg)
    if err and (opts.verify or any(m["train"] and m["role"] != "assistant" for m in messages)):
        return rendered, [], [], err
    # Non-assistant turns are trained only when a message asks for it (train: true).
    extra = [i for i, m in enumerate(messages) if m["role"] != "assistant" and m["train"] and i in located]
    trained = sorted([(True, by_msg[i]) for i in chosen] + [(False, located[i]) for i in extra],
                     key=lambda x: x[1])
    untrained = [(i, span) for i, span in located.items() if i not in chosen and i not in extra]
    return rendered, trained, untrained, None


def _locate(rendered, messages, by_msg):
    """Find each message's content in the rendered text, in order; assistant content inside its span."""
    located, cursor = {}, 0
    for i, m in enumerate(messages):
        pieces = _pieces(m)
        if not pieces:
            continue
        lo, hi = by_msg.get(i, (cursor, len(rendered)))
        spans = []
        for piece in pieces:
            at = rendered.find(piece, max(lo, cursor), hi)
            if at < 0:
                where = "outside its trained span" if i in by_msg else "in the rendered text"
                return {}, ("template_changed_content", f"message {i} ({m['role']}) content not found {where}")
            spans.append((at, at + len(piece)))
            cursor = at + len(piece)
        located[i] = (spans[0][0], spans[-1][1])
        if i in by_msg:  # the end-of-turn text belongs to this turn: later messages start after it
            cursor = max(cursor, by_msg[i][1])
    return located, None


def _pieces(m):
    """The literal strings a template must print for a message (alpaca prints instruction and input apart)."""
    content, inp = m["content"] or "", m.get("input")
    if inp and content.endswith("\n\n" + inp):
        return [p for p in (content[: -len(inp) - 2], inp) if p]
    return [content] if content.strip() else []


def _label_row(text, trained, untrained, reason, enc, opts, special_ids):
    ids = enc.ids
    row = {"input_ids": ids, "labels": [-100] * len(ids), "drop": None, "detail": None,
           "n_tokens": len(ids), "n_trained": 0, "truncated": False, "_bounds": []}
    if reason:
        return {**row, "drop": reason[0], "detail": reason[1]}
    labels, bounds = row["labels"], row["_bounds"]
    for is_turn, (s, e) in trained:
        # Tokens wholly inside [s, e) form one run [a, b).
        a, b = _first_token_from(enc, s, len(text), len(ids)), _first_token_from(enc, e, len(text), len(ids))
        cut = [t for t, at in ((a, s), (b, e)) if t < len(ids) and enc.token_to_chars(t)[0] < at]
        if opts.verify and cut:
            start, end = enc.token_to_chars(cut[0])
            return {**row, "drop": "token_crosses_turn_boundary",
                    "detail": f"token {text[start:end]!r} straddles a turn boundary"}
        if a in cut:  # unverified: the straddling first token stays untrained
            a = min(a + 1, b)
        if opts.verify and not opts.train_on_inputs and (
                a >= b or enc.token_to_chars(a)[0] != s or enc.token_to_chars(b - 1)[1] != e):
            return {**row, "drop": "trained_span_not_token_aligned",
                    "detail": f"tokens do not cover {text[s:e][:40]!r} exactly"}
        if opts.verify and is_turn and not _ends_turn(text[s:e], ids[b - 1] if b > a else None, opts, special_ids):
            want = repr(opts.end_of_turn) if opts.end_of_turn else "a special token"
            return {**row, "drop": "end_of_turn_not_trained", "detail": f"trained turn does not end with {want}"}
        labels[a:b] = ids[a:b]
        bounds.append((a, b, s, e))
    for i, (s, e) in untrained:
        if any(s < be and bs < e for _, _, bs, be in bounds):
            return {**row, "drop": "trained_token_in_untrained_turn", "detail": f"message {i} overlaps a trained span"}
    return row


def _first_token_from(enc, pos, end, n):
    """The first token covering a character at or after `pos` (n if none): tokens [a, b) with a and b
    taken at a span's start and end are the ones inside it, unless the token at a or b starts before
    its position and so straddles the boundary. Asking the encoding's own index per span is much
    cheaper than turning every token's offsets into Python tuples."""
    while pos < end:
        token = enc.char_to_token(pos)
        if token is not None:
            return token
        pos += 1  # a character no token covers (e.g. whitespace a pre-tokenizer drops)
    return n


def _verify_decoding(rows, prepared, tokenizer):
    """Trained tokens must decode to exactly the trained text (one batched decode per batch)."""
    spans = [(r, a, b, s, e) for r in rows if r["drop"] is None for a, b, s, e in r["_bounds"]]
    decoded = tokenizer.backend_tokenizer.decode_batch([r["input_ids"][a:b] for r, a, b, _, _ in spans],
                                                      skip_special_tokens=False)
    texts = {id(r): p[0] for r, p in zip(rows, prepared)}
    for (r, a, b, s, e), got in zip(spans, decoded):
        want = texts[id(r)][s:e]
        if r["drop"] is None and got != want:
            r.update(drop="decode_mismatch", detail=f"trained tokens decode to {got[:40]!r}, not {want[:40]!r}",
                     labels=[-100] * len(r["labels"]), n_trained=0)


def _ends_turn(turn_text, last_id, opts, special_ids) -> bool:
    """A trained turn ends with the template's declared end of turn; undeclared, with a special token
    (EOS, <|eot_id|>, ...), so the model always learns to stop."""
    if opts.end_of_turn:
        return turn_text.endswith(opts.end_of_turn)
    return last_id in special_ids


def _truncate(row, opts):
    """Apply the truncation policy at max_length and count what is left to train."""
    ids, labels, limit = row["input_ids"], row["labels"], opts.max_length
    cut = len(ids)
    if limit is not None and cut > limit:
        if opts.truncation == "drop_row":
            return {**row, "drop": "longer_than_max_length", "detail": f"{cut} tokens > max_length {limit}"}
        fits = [b for _, b, _, _ in row["_bounds"] if b <= limit]
        cut = max(fits, default=0) if opts.truncation == "turn_boundary" else limit
    n_trained = sum(max(0, min(b, cut) - a) for a, b, _, _ in row["_bounds"])  # runs are disjoint
    if n_trained == 0:
        why = "no_trained_tokens_after_truncation" if cut < len(ids) else "no_trained_tokens"
        return {**row, "drop": why, "detail": f"{len(ids)} tokens, max_length {limit}"}
    return {**row, "input_ids": ids[:cut], "labels": labels[:cut], "n_tokens": cut,
            "n_trained": n_trained, "truncated": cut < len(ids)}


def _added_tokens_re(tokenizer):
    """Added/special token strings: typed inside a message they would tokenize as control tokens."""
    tokens = sorted((t for t in tokenizer.get_added_vocab() if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None
