"""Chat templates: find them by name, path or inline text, render conversations, and say which text is
each trained assistant turn.

Turn boundaries come from the template itself, never from per-template code:
- with `{% generation %}` markers, the marked character spans;
- without them (a model's own template), by asking the template what inference asks it: the prompt
  for turn i is `render(msgs[:i], add_generation_prompt=True)` and the turn is what
  `render(msgs[:i+1])` adds after it, trailing whitespace excluded.
A row is one example when every trained turn's rendering is a prefix of the whole conversation's
(trailing whitespace aside). Templates that rewrite history (drop earlier reasoning, end the last
turn differently) get one example per trained turn instead: example i is `render(msgs[:i+1])` with
only turn i trained, which is exactly what inference renders for that turn.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template

try:  # transformers' cached compile and marker tracking (private; render_jinja_template otherwise)
    from transformers.utils.chat_template_utils import _compile_jinja_template as _compile
    from transformers.utils.chat_template_utils import _render_with_assistant_indices as _with_indices
except ImportError:  # pragma: no cover
    _compile = _with_indices = None

from .errors import RecipeError

_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_META = re.compile(r"\{#-?\s*(end_of_turn|special_tokens):(.*?)-?#\}")


def _template_dir() -> Path:
    # Installed wheels carry the templates as package data; a source checkout has them at the root.
    try:
        return Path(resources.files("sft_recipes.chat_templates"))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "chat_templates"


class TurnError(ValueError):
    """The template can't be trusted on this row: args are (reason_key, detail)."""


def template_names() -> list[str]:
    return sorted(p.stem for p in _template_dir().glob("*.jinja"))


def load_template(spec: str | None, tokenizer) -> str:
    """`spec` is a shipped name, a `.jinja` path, inline Jinja, or `tokenizer`/None for the model's own.
    A template that does not compile stops here, once, rather than refusing every row."""
    source = _source(spec, tokenizer)
    try:
        if _compile is not None:
            _compile(source)
    except jinja2.TemplateSyntaxError as e:
        where = "the tokenizer's chat template" if spec in (None, "", "tokenizer") else "chat_template"
        raise RecipeError(f"{where}: Jinja syntax error on line {e.lineno}: {e.message}") from None
    return source


def _source(spec, tokenizer) -> str:
    if spec in (None, "", "tokenizer"):
        if not tokenizer.chat_template:
            raise RecipeError(
                "the tokenizer has no chat template; set `chat_template:` in the recipe to one of "
                f"{', '.join(template_names())}, a .jinja path, or inline Jinja")
        return tokenizer.chat_template
    if "{{" in spec or "{%" in spec:
        return spec
    if spec.startswith("trl:"):
        return _trl_template(spec[4:])
    shipped = _template_dir() / f"{spec}.jinja"
    if shipped.is_file():
        return shipped.read_text()
    path = Path(spec)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise RecipeError(f"chat_template: file not found: {spec}")
        return path.read_text()
    close = difflib.get_close_matches(spec, template_names(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(f"chat_template: unknown template '{spec}'.{hint} Known: {', '.join(template_names())}, "
                      "or give a .jinja path, inline Jinja, or `tokenizer`.")


def trl_template_names() -> list[str]:
    return sorted(p.stem for p in _trl_dir().glob("*.jinja")) if _trl_dir() else []


def _trl_dir() -> Path | None:
    """The released templates TRL ships (`trl/chat_templates/*.jinja`), so they can be named offline."""
    try:
        return Path(resources.files("trl") / "chat_templates")
    except ModuleNotFoundError:
        return None


def _trl_template(name: str) -> str:
    path = (_trl_dir() or Path("/nonexistent")) / f"{name}.jinja"
    if path.is_file():
        return path.read_text()
    names = trl_template_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean 'trl:{close[0]}'?" if close else ""
    raise RecipeError(f"chat_template: TRL has no template 'trl:{name}'.{hint} "
                      f"Known: {', '.join('trl:' + n for n in names) or 'none (is trl installed?)'}")


def template_meta(source: str, tokenizer) -> dict:
    """The end-of-turn text and special tokens a shipped template declares in its header comments."""
    meta = {k: v.strip() for k, v in _META.findall(source)}
    end = meta.get("end_of_turn") or None
    if end == "eos_token":
        end = tokenizer.eos_token
    return {"end_of_turn": end, "special_tokens": meta.get("special_tokens", "").split()}


@lru_cache(maxsize=8)
def is_shipped(source: str) -> bool:
    """One of our own templates, whose markers the test suite checks against inference on every turn."""
    return any(p.read_text() == source for p in _template_dir().glob("*.jinja"))


@lru_cache(maxsize=8)
def has_markers(source: str) -> bool:
    return bool(_MARKER.search(source))


def special_tokens(tokenizer) -> dict:
    """The special-token variables a template reads, as `apply_chat_template` passes them: only the ones the
    tokenizer has (Qwen has no BOS: `{{ bos_token }}` prints nothing, not "None")."""
    return dict(tokenizer.special_tokens_map)


def render(source: str, messages: list[dict], tools=None, *, add_generation_prompt=False, **kwargs) -> str:
    """One conversation rendered; `kwargs` are the special tokens and chat_template_kwargs.

    Our messages, tools and kwargs are plain JSON data already (`messages.chat_messages`), so the
    compiled template (transformers' sandboxed Jinja environment and helpers) renders them directly;
    `render_jinja_template`'s per-call copy of every input costs about a sixth of a render, and
    masking renders twice per trained turn."""
    if _compile is None:
        texts, _ = render_jinja_template([messages], tools=tools, chat_template=source,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
        return texts[0]
    return _compile(source).render(messages=messages, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **kwargs)


@dataclass
class Example:
    """One training sequence made from a row: its text, the messages it covers (`messages[:n_messages]`),
    and the character span of each assistant turn trained in it."""
    text: str
    n_messages: int
    spans: dict = field(default_factory=dict)  # message index -> (start, end)
    split: bool = False                         # one of several examples made from one row
    notes: list = field(default_factory=list)   # how the template made a turn differ from the simple case


def examples(source: str, messages: list[dict], tools, trained: list[int], *, per_turn: bool = False,
             joint_only: bool = False, trust_markers: bool = False, **kwargs) -> list[Example]:
    """The examples for a conversation (`messages` as templates read them) whose assistant turns
    `trained` are trained: one when the template is prefix-stable on it (and `per_turn` is off), else
    one per trained turn. Generation markers give the spans; unless trusted (our shipped templates,
    checked by the test suite), the text before each marked turn must still be the generation prompt.
    Raises TurnError when the template can't be trusted on the row."""
    split = len(trained) > 1
    if has_markers(source):
        if not per_turn or not split:
            joint = _joint_marked(source, messages, tools, trained, trust_markers, kwargs)
            if joint:
                return [joint]
            _refuse_if(joint_only)
        return [_noted(_turn_marked(source, messages[: i + 1], tools, i, trust_markers, kwargs, split), per_turn)
                for i in trained]
    turns = {i: _turn(source, messages, tools, i, kwargs) for i in trained}
    if not per_turn or not split:
        joint = _joint(source, messages, tools, turns, kwargs)
        if joint:
            return [joint]
        _refuse_if(joint_only)
    return [_noted(Example(t.text, i + 1, {i: t.span}, split, list(t.notes)), per_turn) for i, t in turns.items()]


SPLIT_REWRITES = "one example per turn: the template prints earlier turns differently once later ones exist"


def _noted(example, asked):
    """A split the template caused (not the caller) says so, for the summary."""
    if example.split and not asked:
        example.notes.append(SPLIT_REWRITES)
    return example


def _refuse_if(joint_only):
    if joint_only:
        raise TurnError("template_rewrites_earlier_turns", "rendering up to a trained turn is not a prefix "
                        "of the whole conversation (multi_turn: joint)")


def _joint(source, messages, tools, turns, kwargs):
    last = turns.get(len(messages) - 1)  # the conversation ends with a trained turn: its render is the whole
    full = last.text if last and not last.rewritten else render(source, messages, tools, **kwargs)
    if all(not t.rewritten and full.startswith(t.text.rstrip()) for t in turns.values()):
        return Example(full, len(messages), {i: t.span for i, t in turns.items()},
                       notes=[n for t in turns.values() for n in t.notes])
    return None


def _joint_marked(source, messages, tools, trained, trust, kwargs):
    text, spans = render_with_spans(source, messages, tools, **kwargs)
    by_message = dict(zip([i for i, m in enumerate(messages) if m["role"] == "assistant"], spans))
    chosen = {i: by_message[i] for i in trained}
    if not trust and any(text[:s] != _prompt(source, messages, tools, i, kwargs) for i, (s, _) in chosen.items()):
        return None
    return Example(text, len(messages), chosen)


def _turn_marked(source, messages, tools, i, trust, kwargs, split):
    text, spans = render_with_spans(source, messages, tools, **kwargs)
    if not trust and text[: spans[-1][0]] != _prompt(source, messages, tools, i, kwargs):
        raise TurnError("generation_prompt_mismatch", f"the text before marked message {i} is not the "
                        "template's generation prompt, so the turn is not trained as inference asks for it")
    return Example(text, i + 1, {i: spans[-1]}, split)


def _prompt(source, messages, tools, i, kwargs):
    return render(source, messages[:i], tools, add_generation_prompt=True, **kwargs)


def render_with_spans(source, messages, tools=None, **kwargs):
    """(text, one span per assistant message) from the template's generation markers."""
    if _with_indices is None:
        texts, indices = render_jinja_template([messages], tools=tools, chat_template=source,
                                               return_assistant_tokens_mask=True, **kwargs)
        text, indices = texts[0], indices[0]
    else:  # plain JSON inputs, as in `render`
        text, indices = _with_indices(_compile(source), messages, tools, None, False, **kwargs)
    spans = [(s, e) for s, e in indices if e > s]
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != n_assistant:
        raise TurnError("template_marks_wrong_turns",
                        f"{len(spans)} generation blocks for {n_assistant} assistant messages")
    return text, spans


@dataclass
class _Turn:
    text: str          # the example text ending with turn i
    span: tuple        # where turn i is in it
    rewritten: bool = False
    notes: list = field(default_factory=list)


def _turn(source, messages, tools, i, kwargs) -> _Turn:
    """Turn i as inference asks for it: the text after `render(messages[:i], add_generation_prompt=True)`.
    Normally `render(messages[:i+1])` starts with that prompt. Two template habits break this, and both
    are handled without per-template code:
    - the generation prompt pre-fills text the rendered turn lacks (DeepSeek-R1's `<think>\n`): the
      render is kept as it is and the turn starts where it parts from the prompt; the pre-fill is noted;
    - the history is printed differently once the turn exists. Where only reasoning is left out (gpt-oss
      drops the analysis of earlier tool calls once a final answer follows: its authors' training view),
      the template's own rendering is trained, as `apply_chat_template` prints it; where a message is
      left out (Mistral prints the system message in the last user turn only, so it vanishes once the
      turn exists), the turn, as the template prints it after the previous message, is trained after
      the prompt inference shows."""
    prompt = _prompt(source, messages, tools, i, kwargs)
    upto = render(source, messages[: i + 1], tools, **kwargs)
    if upto.startswith(prompt):
        return _Turn(upto, (len(prompt), len(upto.rstrip())))
    base = render(source, messages[:i], tools, **kwargs)
    if not prompt.startswith(base):
        raise TurnError("generation_prompt_mismatch", f"the generation prompt for message {i} changes the "
                        "conversation before it")
    gen = prompt[len(base):]
    if upto.startswith(base):
        # Measured against a stand-in answer too, so an answer that happens to open like the pre-fill
        # ("<!DOCTYPE" after "<think>") does not lose its first characters to the prompt.
        stand_in = render(source, [*messages[:i], {"role": "assistant", "content": "\u27e6\u27e7"}], tools, **kwargs)
        turn = upto[len(base):]
        common = min(len(_common_prefix(gen, turn)), len(_common_prefix(gen, stand_in[len(base):])))
        return _Turn(upto, (len(base) + common, len(upto.rstrip())),
                     notes=[f"generation prompt pre-fills {gen[common:]!r}, which the rendered turn lacks"])
    at = _after_previous(upto, messages[i - 1]) if i else -1
    if gen:
        start = upto.find(gen, at) if at >= 0 else -1
    else:  # no generation prompt (Mistral): the turn follows what the prompt prints after the previous message
        end = _after_previous(prompt, messages[i - 1]) if i else -1
        gen = prompt[end:] if end >= 0 else ""
        start = at if gen and at >= 0 and upto.startswith(gen, at) else -1
    if start < 0:
        raise TurnError("generation_prompt_mismatch", f"message {i} is not printed after its generation prompt")
    if _prints_every_message(upto, messages[: i + 1]):
        return _Turn(upto, (start + len(gen), len(upto.rstrip())), rewritten=True, notes=[REWRITES_REASONING])
    text = prompt + upto[start + len(gen):]
    return _Turn(text, (len(prompt), len(text.rstrip())), rewritten=True, notes=[REWRITES_MESSAGES])


REWRITES_REASONING = ("history printed differently once the turn exists (earlier reasoning left out, every message "
                      "kept); trained in the template's own rendering")
REWRITES_MESSAGES = "history printed differently once the turn exists, a message left out; trained after the inference prompt"


def _prints_every_message(text: str, messages: list[dict]) -> bool:
    """Every message's content and every call's name is in `text`: what the template left out is reasoning only."""
    for m in messages:
        if (m.get("content") or "").strip() and _after_previous(text, m) < 0:
            return False
        if any(c["function"]["name"] not in text for c in m.get("tool_calls") or ()):
            return False
    return True


def _common_prefix(a: str, b: str) -> str:
    n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def _after_previous(text: str, message: dict) -> int:
    """Where the previous message's content ends in `text` (printed as is, trimmed, or JSON-encoded)."""
    content = message.get("content") or ""
    for form in (content, content.strip(), json.dumps(content, ensure_ascii=False), json.dumps(content)):
        if form.strip() and form in text:
            return text.rindex(form) + len(form)
    return -1


def turn_stops(source: str, tokenizer) -> list[str]:
    """The special tokens the template prints right after an assistant answer, as the last turn and before
    a user turn (Phi-3's `<|end|>`, gpt-oss's `<|return|>` and `<|end|>`, GLM's next `<|user|>`): what a
    trained model writes to stop, whether or not its config or EOS names it."""
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    answer = "\u27e6answer\u27e7"
    found = []
    for tail in ([], [{"role": "user", "content": "\u27e6next\u27e7"}]):
        messages = [{"role": "user", "content": "\u27e6question\u27e7"}, {"role": "assistant", "content": answer}, *tail]
        try:
            text = render(source, messages, None, **special_tokens(tokenizer))
        except Exception:  # a template that refuses the probe (one that needs a system message): none known
            continue
        after = text[text.index(answer) + len(answer):].lstrip() if answer in text else ""
        found += [t for t in specials if after.startswith(t)][:1]
    call = {"type": "function", "function": {"name": "\u27e6tool\u27e7", "arguments": {}}}
    calls = [messages[0], {"role": "assistant", "content": "", "tool_calls": [call]}]
    try:  # a turn that calls a tool ends with its own token (gpt-oss's `<|call|>`), else at the result's (GLM's)
        text = render(source, calls, None, **special_tokens(tokenizer)).rstrip()
        ends = [t for t in specials if text.endswith(t)][:1]
        if not ends:
            after = render(source, [*calls, {"role": "tool", "content": "\u27e6result\u27e7"}], None,
                           **special_tokens(tokenizer))
            rest = after[len(text):].lstrip() if after.startswith(text) else ""
            ends = [t for t in specials if rest.startswith(t)][:1]
        found += ends
    except Exception:  # templates without tool calls
        pass
    return list(dict.fromkeys(found))


def continuation(source: str, messages: list[dict], tools, i: int, **kwargs) -> str:
    """What the template prints right after assistant turn i: from the next message when there is one,
    else from a stand-in reply (a tool result after calls, a user turn otherwise). Templates without an
    end-of-turn token (GLM-4) stop generation at the next role token, which this finds."""
    upto = render(source, messages[: i + 1], tools, **kwargs).rstrip()
    nxt = messages[i + 1] if i + 1 < len(messages) else {
        "role": "tool" if messages[i].get("tool_calls") else "user", "content": "\u27e6next\u27e7"}
    try:
        after = render(source, [*messages[: i + 1], nxt], tools, **kwargs)
    except Exception:  # a template that refuses the stand-in: no continuation known
        return ""
    return after[len(upto):] if after.startswith(upto) else ""
