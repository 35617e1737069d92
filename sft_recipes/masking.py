"""Conversations -> examples of `input_ids` + `labels` (-100 outside trained tokens), verified one by one.

A row becomes one example, or one per trained turn when its template rewrites history (templates.py).
Each example is rendered once and tokenized in batches with character offsets; a token is trained iff
its characters lie wholly inside a trained span. Tokens follow inference: the text before every
trained turn must tokenize exactly as that prompt does on its own (`tokenizer(prompt)`), so no token
merges across the start of a turn; where the whole text would merge there (Qwen3.5's `<think>\\n` +
`\\n</think>`), the prompt and the turn are tokenized apart, and a multi-turn row that cannot meet this
at every turn is split per turn. The verifier then proves, per example, that the trained tokens
decode to exactly each trained turn as the template rendered it, that each turn ends with its stop
(the template's declared end of turn, else a special token: a turn with none, as on GLM-4, trains the
special token the template prints next, or EOS when the turn ends its example; a multi-turn row whose
turns end with none, as a chatml template's `<|im_end|>` on a vocabulary without it, is split per
turn so that each gets its EOS), that every tool call of the turn is printed inside it, and that no
trained token lies inside a system, user or tool message. An example that fails is dropped with its
reason, never trained on. Every split example notes why it was split.
"""
from __future__ import annotations

import bisect
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets.fingerprint import Hasher

from . import templates
from .messages import chat_messages

FEATURES = Features({
    "input_ids": List(Value("int32")), "labels": List(Value("int32")),
    "drop": Value("string"), "detail": Value("string"),
    "n_tokens": Value("int32"), "n_trained": Value("int32"), "truncated": Value("bool"),
    "row": Value("int32"),            # the conversation it came from (index in the masked dataset's input)
    "n_messages": Value("int32"),     # the example covers messages[:n_messages]
    "turns": List(Value("int32")),    # indices of the messages trained in it
    "split": Value("bool"),           # one of several per-turn examples of its row
    "reasoning_trained": Value("int32"),    # trained turns whose reasoning is printed and trained
    "reasoning_unprinted": Value("int32"),  # trained turns with reasoning the template does not print
    "notes": List(Value("string")),         # what the template did that the summary should say
})
ARROW = FEATURES.arrow_schema


@dataclass
class MaskOptions:
    template: str                      # Jinja source
    end_of_turn: str | None = None     # text every trained turn must end with (None: a special token)
    train_on: str = "all_assistant"
    train_on_inputs: bool = False
    max_length: int | None = None
    truncation: str = "keep_start"
    verify: bool = True
    multi_turn: str = "auto"
    reasoning: str = "keep"            # drop: reasoning is removed before rendering
    train_on_reasoning: bool = True    # false: reasoning tokens stay at -100, the answer is trained
    chat_template_kwargs: dict = field(default_factory=dict)


def tokenize(ds: Dataset, tokenizer, opts: MaskOptions, *, num_proc=None, desc="Tokenizing") -> Dataset:
    """Map canonical rows (messages/tools/text) to examples with token columns; refused ones carry `drop`."""
    if not tokenizer.is_fast:
        raise ValueError("sft_recipes needs a fast tokenizer (character offsets)")
    # Arrow in, Arrow out: the conversations pass through as they are (no cast back to `features`, most of
    # the cost on long multi-turn rows) and the token columns are appended as typed Arrow arrays.
    out = ds.with_format("arrow").map(
        _tokenize_table, batched=True, batch_size=256, num_proc=num_proc, desc=desc, with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "opts": opts}, new_fingerprint=fingerprint(ds, tokenizer, opts),
        features=Features({**ds.features, **FEATURES}) if len(ds) == 0 else None)
    return out.with_format(None)


def fingerprint(ds: Dataset, tokenizer, opts: MaskOptions) -> str:
    """The cache key of `tokenize`: what goes in and the code that runs. `datasets` would otherwise
    pickle the whole tokenizer object to hash it, most of a second on every call."""
    code = [(Path(__file__).parent / f).read_text() for f in ("masking.py", "templates.py", "formats.py")]
    return Hasher.hash([ds._fingerprint, asdict(opts), code, tokenizer.backend_tokenizer.to_str(),
                        tokenizer.special_tokens_map, type(tokenizer).__name__])


def example_messages(row) -> list[dict]:
    """The messages an example covers, each with `train` saying whether it is trained in this example."""
    turns = set(row["turns"] or ())
    return [{**m, "train": i in turns} for i, m in enumerate(row["messages"][: row["n_messages"]])]


def _tokenize_table(table: pa.Table, indices, tokenizer, opts: MaskOptions) -> pa.Table:
    columns = {c: table.column(c).to_pylist() if c in table.column_names else [None] * len(table)
               for c in ("messages", "tools", "text", "chat_template_kwargs")}
    rows = _Masker(tokenizer, opts).rows(columns)
    taken = [r["row"] for r in rows]
    if taken != list(range(len(table))):  # per-turn examples repeat their conversation
        table = table.take(pa.array(taken, type=pa.int32()))
    for r in rows:
        r["row"] += indices[0] if len(indices) else 0
    table = table.drop_columns([k for k in FEATURES if k in table.column_names])
    for f in ARROW:
        values = [row[f.name] for row in rows]
        ints = pa.types.is_list(f.type) and pa.types.is_integer(f.type.value_type)
        column = _int_lists(values) if ints else pa.array(values, type=f.type)
        table = table.append_column(f, column)
    return table


def _int_lists(lists) -> pa.Array:
    """A list<int32> column built flat: pa.array() on nested Python lists is about 8x slower."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(offsets, values)


# ---------------------------------------------------------------- one batch

@dataclass
class _Ex:
    """An example on its way to token columns."""
    row: int
    text: str = ""
    n_messages: int = 0
    turns: list = field(default_factory=list)      # trained message indices
    runs: list = field(default_factory=list)       # (ends_a_turn, (start, end)) character spans to train
    starts: list = field(default_factory=list)     # where trained assistant turns start (prompt parity)
    quiet: list = field(default_factory=list)      # (message index, span) contents that must stay untrained
    split: bool = False
    reasoning: tuple = (0, 0)                      # (trained, unprinted) turns with reasoning
    notes: list = field(default_factory=list)
    reason: tuple | None = None                    # (drop reason, detail)
    enc: object = None


AS_WRITTEN = "reasoning the data wrote inline given to the template as written (it prints none from a reasoning field)"
_SPLIT_ASKED = "one example per turn: multi_turn: per_turn"
_SPLIT_TOKENS = "one example per turn: a turn's prompt tokenizes differently inside the whole conversation"
_SPLIT_WHY = {"end_of_turn_not_trained": "one example per turn: a turn ends with no special token of this tokenizer "
                                         "(the template's end of turn is plain text to it), so each ends an example, "
                                         "where EOS is appended"}


class _Masker:
    def __init__(self, tokenizer, opts: MaskOptions):
        self.tok, self.opts = tokenizer, opts
        self.backend = _backend(tokenizer)
        self.specials = {**templates.special_tokens(tokenizer), **opts.chat_template_kwargs}
        self.added_re = _added_tokens_re(tokenizer)
        special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.stop_ids = set(special) | set(tokenizer.all_special_ids)  # Phi-3's <|end|>, not only named ones
        self.stop_texts = sorted(special.values(), key=len, reverse=True)
        self.added_ids = set(tokenizer.get_added_vocab().values())
        self.tails = {}
        self.trusted = templates.is_shipped(opts.template)

    def rows(self, columns) -> list[dict]:
        examples = []
        for r, (msgs, tools, text, kwargs) in enumerate(zip(*columns.values())):
            examples += self._examples(r, msgs, tools, text, kwargs)
        self._encode(examples)
        redo = [ex for ex in examples if ex.reason is None and not self._prompts_match(ex)]
        if redo:
            examples = self._retokenize(examples, redo, columns)
        out = [self._label(ex) for ex in examples]
        if self.opts.verify and not self.opts.train_on_inputs:
            self._verify_decoding(out, examples)
        return [_truncate(row, self.opts) if row["drop"] is None else row for row in out]

    # ------------------------------------------------ rows -> examples (text and spans)
    def _examples(self, r, messages, tools, text, kwargs, split_why=None) -> list[_Ex]:
        """The row's examples; `split_why` (a note for the summary) asks for one example per trained turn.
        Reasoning goes to the template in its fields; where the data wrote it inline and the template prints
        none of it from there (R1-Distill and QwQ read only `<think>` in content), the row is rendered as the
        user wrote it, and what the template prints of it is trained. That view must keep what the other did."""
        out = self._build(r, messages, tools, text, kwargs, split_why, False)
        inline = text is None and any(m.get("inline_reasoning") for m in messages)
        if not inline or not any(ex.reasoning[1] for ex in out):
            return out
        written = self._build(r, messages, tools, text, kwargs, split_why, True)
        if sum(ex.reason is None for ex in written) < sum(ex.reason is None for ex in out):
            return out
        for ex in written:
            ex.notes.append(AS_WRITTEN)
        return written

    def _build(self, r, messages, tools, text, kwargs, split_why, as_written) -> list[_Ex]:
        o = self.opts
        if text is not None:  # plain text: the whole sequence is trained, EOS included
            eos = self.tok.eos_token or ""
            return [_Ex(r, text + eos, runs=[(False, (0, len(text) + len(eos)), (False, False))])]
        bad = self._special_text(messages, tools)
        if bad:
            return [_Ex(r, n_messages=len(messages), reason=bad)]
        tmsgs = chat_messages(messages, reasoning=o.reasoning, as_written=as_written)
        schemas = json.loads(tools) if tools else None  # parsed once for every render of the row
        kw = {**self.specials, **(json.loads(kwargs) if kwargs else {})}
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = [i for i in assistant if messages[i]["train"] is not False]
        if o.train_on == "last_assistant":
            trained = trained[-1:]
        try:
            if o.train_on_inputs:
                full = templates.render(o.template, tmsgs, schemas, **kw)
                return [_Ex(r, full, len(messages), runs=[(False, (0, len(full)), (False, False))])]
            found = self._render(tmsgs, schemas, trained, split_why is not None, kw)
        except templates.TurnError as e:
            return [_Ex(r, n_messages=len(messages), reason=e.args)]
        except Exception as e:  # a template that raises on this row (raise_exception, a jinja error)
            return [_Ex(r, n_messages=len(messages), reason=("template_error", f"{type(e).__name__}: {e}"))]
        why = split_why or (_SPLIT_ASKED if o.multi_turn == "per_turn" else None)
        for ex in found if why else ():
            if ex.split:
                ex.notes.append(why)
        extra = [i for i, m in enumerate(messages) if m["role"] != "assistant" and m["train"]]
        out = []
        for k, ex in enumerate(found):
            # A non-assistant message with `train: true` is trained once: in the first example holding it.
            mine = [i for i in extra if i < ex.n_messages and (k == 0 or i >= found[k - 1].n_messages)]
            out.append(self._spans(r, ex, messages, tmsgs, schemas, kw, mine))
        if len(out) == 1 and len(found[0].spans) > 1 and out[0].reason and o.multi_turn == "auto":
            # One turn the template can't print must not cost the row's other turns: one example each.
            reason = out[0].reason[0]
            why = _SPLIT_WHY.get(reason, f"one example per turn: a turn cannot be trained inside the whole "
                                         f"conversation ({reason})")
            return self._build(r, messages, tools, text, kwargs, why, as_written)
        return out

    def _render(self, tmsgs, tools, trained, per_turn, kw):
        o = self.opts
        args = dict(per_turn=per_turn or o.multi_turn == "per_turn", joint_only=o.multi_turn == "joint",
                    trust_markers=self.trusted, **kw)
        try:
            return templates.examples(o.template, tmsgs, tools, trained, **args)
        except TypeError:
            # Templates written for OpenAI's wire format concatenate `arguments` as text (DeepSeek's):
            # give them the arguments as JSON text, as their models saw them.
            if not any("tool_calls" in m for m in tmsgs):
                raise
            found = templates.examples(o.template, _arguments_as_text(tmsgs), tools, trained, **args)
            for ex in found:
                ex.notes.append("template prints tool-call arguments as JSON text")
            return found

    def _special_text(self, messages, tools):
        """Special-token text typed in data would tokenize as a control token."""
        if not self.added_re:
            return None
        for m in messages:
            for key in ("content", "reasoning_content", "tool_calls"):
                hit = m[key] and self.added_re.search(m[key])
                if hit:
                    return ("special_token_text_in_content", f"a {m['role']} message contains '{hit.group()}'")
        hit = tools and self.added_re.search(tools)  # JSON text, printed into the prompt as it is
        return ("special_token_text_in_tools", f"the tools contain '{hit.group()}'") if hit else None

    def _spans(self, r, ex, messages, tmsgs, tools, kw, extra) -> _Ex:
        """Trained runs of one example: each trained turn (with its stop), reasoning cut out if asked."""
        o, out = self.opts, _Ex(r, ex.text, ex.n_messages, sorted([*ex.spans, *extra]), split=ex.split,
                                notes=list(ex.notes))
        marked = templates.has_markers(o.template)
        if marked or extra:  # marked spans are the template author's word: check contents against them
            located, err = _locate(ex.text, messages[: ex.n_messages], ex.spans)
            if err and (o.verify or extra):
                out.reason = err
                return out
            out.quiet = [(i, span) for i, span in located.items() if i not in out.turns] if marked else []
            out.runs += [(False, located[i], (False, False)) for i in extra if i in located]
        n_reasoning = [0, 0]
        for i, (s, e) in sorted(ex.spans.items()):
            if not o.end_of_turn:
                stop = self._stop(out, i, e, tmsgs, tools, kw)
                if stop is None and o.verify:  # multi_turn auto splits the row: each turn then ends its example
                    out.reason = ("end_of_turn_not_trained", f"assistant message {i} ends with no special token "
                                  "and the example goes on after it (EOS can only end an example)")
                    return out
                e = e if stop is None else stop
            msg = messages[i]
            problem = self._check_turn(out.text[s:e], msg, tmsgs[i].get("tool_calls", ())) if o.verify else None
            if problem:
                out.reason = problem
                return out
            thought = (msg["reasoning_content"] or "").strip() if o.reasoning == "keep" else ""
            at = out.text.find(thought, s, e) if thought else -1
            if thought:
                n_reasoning[at < 0] += 1
            if at >= 0 and not o.train_on_reasoning:  # cut edges inside the turn snap to whole tokens
                out.runs += [(False, (s, at), (False, True)), (True, (at + len(thought), e), (True, False))]
            else:
                out.runs.append((True, (s, e), (False, False)))
            out.starts.append(s)
        out.runs = sorted((r for r in out.runs if r[1][1] > r[1][0]), key=lambda r: r[1])
        out.reasoning = tuple(n_reasoning)
        return out

    def _stop(self, out, i, e, tmsgs, tools, kw) -> int | None:
        """Where turn i ends: at its own special token, else through the special token the template prints
        next (GLM-4's next role token), else through an EOS appended to the example when the turn ends it;
        None when none of these: the template's end of turn is plain text to this tokenizer (a chatml
        template on GPT-2's vocabulary) and other text follows."""
        text = out.text
        if any(text.endswith(t, 0, e) for t in self.stop_texts):
            return e
        rest = text[e:e + 256]  # whitespace and a stop token, if one follows
        if e >= len(text.rstrip()):  # the example ends here: ask the template what it prints next
            rest = templates.continuation(self.opts.template, tmsgs, tools, i, **kw)
            stop = self._leading_stop(rest) or self.tok.eos_token or ""
            out.text = text[:e] + stop + text[e:]
            shift = lambda span: (span[0] + len(stop), span[1] + len(stop)) if span[0] >= e else span  # noqa: E731
            out.runs = [(end, shift(span), loose) for end, span, loose in out.runs]
            out.quiet = [(k, shift(span)) for k, span in out.quiet]
            return e + len(stop)
        stop = self._leading_stop(rest)
        return e + len(stop) if stop else None

    def _leading_stop(self, rest: str) -> str | None:
        """Whitespace then a special token at the start of `rest`, or None."""
        body = rest.lstrip()
        hit = next((t for t in self.stop_texts if body.startswith(t)), None)
        return rest[: len(rest) - len(body) + len(hit)] if hit else None

    def _check_turn(self, turn: str, msg, calls) -> tuple | None:
        """The turn must print the message's answer and every call: name and each argument value."""
        if msg["content"].strip() and msg["content"].strip() not in turn:
            return ("template_changed_content", "an assistant answer is not printed inside its turn")
        for call in calls:
            fn = call["function"]
            missing = [] if _printed(fn["name"], turn) else [f"name {fn['name']!r}"]
            missing += [f"argument {k!r}" for k, v in fn["arguments"].items() if not _printed(v, turn)]
            if missing:
                return ("tool_call_not_rendered", f"call {fn['name']}: {', '.join(missing)} not printed in the turn")
        return None

    # ------------------------------------------------ tokens
    def _encode(self, examples):
        todo = [ex for ex in examples if ex.reason is None]
        for ex, enc in zip(todo, self.backend.encode_batch([ex.text for ex in todo], add_special_tokens=False)):
            ex.enc = enc

    def _prompts_match(self, ex) -> bool:
        """Every trained turn starts on a token boundary, and the tokens before it are the tokens of that
        prompt on its own. Tokenization is local between added tokens, so only the stretch since the last
        added token before the turn (its tail) needs tokenizing again."""
        enc, ids = ex.enc, ex.enc.ids
        for s in ex.starts:
            a = _first_token_from(enc, s, len(ex.text), len(ids))
            if a < len(ids) and enc.token_to_chars(a)[0] < s:
                return False
            k = a
            while k > 0 and ids[k - 1] not in self.added_ids:
                k -= 1
            k = max(k - 1, 0)
            q = enc.token_to_chars(k)[0] if k < a else s
            tail = ex.text[q:s]
            if tail and self._tail(tail) != ids[k:a]:
                return False
        return True

    def _tail(self, text) -> list[int]:
        if text not in self.tails:
            self.tails[text] = self.backend.encode(text, add_special_tokens=False).ids
        return self.tails[text]

    def _retokenize(self, examples, redo, columns) -> list[_Ex]:
        """Examples whose prompts would tokenize differently: a one-turn example is tokenized as prompt +
        turn; a row in one multi-turn example is split per turn first (or refused, `multi_turn: joint`)."""
        rows = {ex.row for ex in redo if len(ex.starts) > 1}
        if self.opts.multi_turn == "joint":
            for ex in redo:
                if len(ex.starts) > 1:
                    ex.reason = ("prompt_tokenized_differently", "a turn's prompt tokenizes differently on its "
                                 "own (multi_turn: joint keeps the row whole)")
            rows = set()
        fresh = {r: self._examples(r, *(columns[c][r] for c in columns), split_why=_SPLIT_TOKENS) for r in sorted(rows)}
        self._encode([ex for exs in fresh.values() for ex in exs])
        check = [ex for ex in redo if len(ex.starts) == 1] + [ex for exs in fresh.values() for ex in exs]
        for ex in check:
            if ex.reason is None and len(ex.starts) == 1 and (ex.row not in rows or not self._prompts_match(ex)):
                at = ex.starts[0]
                ex.enc = _Joined([self.backend.encode(part, add_special_tokens=False)
                                  for part in (ex.text[:at], ex.text[at:])], at)
        return [new for ex in examples for new in (fresh.pop(ex.row, []) if ex.row in rows else [ex])]

    # ------------------------------------------------ labels
    def _label(self, ex: _Ex) -> dict:
        o = self.opts
        ids = ex.enc.ids if ex.enc is not None else []
        row = {"input_ids": ids, "labels": [-100] * len(ids), "drop": None, "detail": None,
               "n_tokens": len(ids), "n_trained": 0, "truncated": False, "row": ex.row,
               "n_messages": ex.n_messages, "turns": ex.turns, "split": ex.split,
               "reasoning_trained": ex.reasoning[0], "reasoning_unprinted": ex.reasoning[1], "notes": ex.notes,
               "_bounds": []}
        if ex.reason:
            return {**row, "drop": ex.reason[0], "detail": ex.reason[1]}
        enc, text, labels, bounds = ex.enc, ex.text, row["labels"], row["_bounds"]
        for ends_turn, (s, e), (loose_start, loose_end) in ex.runs:
            # Tokens wholly inside [s, e) form one run [a, b).
            a, b = _first_token_from(enc, s, len(text), len(ids)), _first_token_from(enc, e, len(text), len(ids))
            cut = [t for t, at in ((a, s), (b, e)) if t < len(ids) and enc.token_to_chars(t)[0] < at]
            if loose_start and a in cut:  # a cut inside a turn (reasoning left untrained): whole tokens only
                a, cut = a + 1, [t for t in cut if t != a]
            if loose_end and b in cut:
                cut = [t for t in cut if t != b]
            if loose_start or loose_end:
                if a >= b:
                    continue
                s, e = (enc.token_to_chars(a)[0] if loose_start else s), (enc.token_to_chars(b - 1)[1] if loose_end else e)
            if o.verify and cut:
                start, end = enc.token_to_chars(cut[0])
                return {**row, "drop": "token_crosses_turn_boundary",
                        "detail": f"token {text[start:end]!r} straddles a turn boundary"}
            if a in cut:  # unverified: the straddling first token stays untrained
                a = min(a + 1, b)
            if o.verify and not o.train_on_inputs and (
                    a >= b or enc.token_to_chars(a)[0] != s or enc.token_to_chars(b - 1)[1] != e):
                return {**row, "drop": "trained_span_not_token_aligned",
                        "detail": f"tokens do not cover {text[s:e][:40]!r} exactly"}
            if o.verify and ends_turn and not self._ends_turn(text[s:e], ids[b - 1] if b > a else None):
                want = repr(o.end_of_turn) if o.end_of_turn else "a special token"
                return {**row, "drop": "end_of_turn_not_trained", "detail": f"trained turn does not end with {want}"}
            labels[a:b] = ids[a:b]
            bounds.append((a, b, s, e))
        for i, (s, e) in ex.quiet:
            if any(s < be and bs < e for _, _, bs, be in bounds):
                return {**row, "drop": "trained_token_in_untrained_turn", "detail": f"message {i} overlaps a trained span"}
        return row

    def _ends_turn(self, turn_text, last_id) -> bool:
        """A trained turn ends with the template's declared end of turn; undeclared, with a special token
        (EOS, <|eot_id|>, <|end|>, ...), so the model always learns to stop."""
        if self.opts.end_of_turn:
            return turn_text.endswith(self.opts.end_of_turn)
        return last_id in self.stop_ids

    def _verify_decoding(self, rows, examples):
        """Trained tokens must decode to exactly the trained text (one batched decode per batch)."""
        spans = [(r, a, b, s, e) for r in rows if r["drop"] is None for a, b, s, e in r["_bounds"]]
        decoded = self.backend.decode_batch([r["input_ids"][a:b] for r, a, b, _, _ in spans],
                                            skip_special_tokens=False)
        texts = {id(r): ex.text for r, ex in zip(rows, examples)}
        for (r, a, b, s, e), got in zip(spans, decoded):
            want = texts[id(r)][s:e]
            if got != want:  # a normalizer that is not undone on decode (Phi-3 adds "▁" after special tokens)
                want = self.backend.decode(self.backend.encode(want, add_special_tokens=False).ids,
                                           skip_special_tokens=False)
            if r["drop"] is None and got != want:
                r.update(drop="decode_mismatch", detail=f"trained tokens decode to {got[:40]!r}, not {want[:40]!r}",
                         labels=[-100] * len(r["labels"]), n_trained=0)


class _Joined:
    """Two encodings side by side (a prompt and its turn, tokenized apart), offset into one text."""

    def __init__(self, parts, at):
        first, second = parts
        self.ids = first.ids + second.ids
        self.offsets = first.offsets + [(s + at, e + at) for s, e in second.offsets]
        self.starts = [s for s, _ in self.offsets]

    def token_to_chars(self, t):
        return self.offsets[t]

    def char_to_token(self, pos):
        t = bisect.bisect_right(self.starts, pos) - 1
        while t > 0 and self.offsets[t - 1][0] <= pos < self.offsets[t - 1][1]:
            t -= 1  # several byte tokens of one character: the first
        return t if t >= 0 and self.offsets[t][0] <= pos < self.offsets[t][1] else None


def _arguments_as_text(tmsgs):
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]} if "tool_calls" in m else m
        for m in tmsgs]


def _printed(value, turn: str) -> bool:
    """An argument value appears in the turn as templates print it: raw text, JSON, or Jinja's str()."""
    if isinstance(value, str) and value in turn:  # most values: printed raw or inside JSON quotes
        return True
    forms = {json.dumps(value, ensure_ascii=False), json.dumps(value), str(value)}
    if isinstance(value, str):
        forms |= {value, json.dumps(value, ensure_ascii=False)[1:-1]}
    return any(f in turn for f in forms)


def _backend(tokenizer):
    """The Rust tokenizer, reset as `tokenizer(...)` would reset it (no padding, no truncation: long
    rows are our truncation policy's job), without the wrapper's per-row Python conversion."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None:
        backend.no_padding()
    if backend.truncation is not None:
        backend.no_truncation()
    return backend


def _locate(rendered, messages, by_msg):
    """Find each message's content in the rendered text, in order; assistant content inside its span."""
    located, cursor = {}, 0
    for i, m in enumerate(messages):
        pieces = _pieces(m)
        if not pieces:  # a turn that only calls tools: later messages still start after it
            cursor = max(cursor, by_msg.get(i, (0, cursor))[1])
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
