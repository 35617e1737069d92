"""The Ollama Modelfile beside an exported GGUF, and the turn shape of a chat template it is made from.

The shape is read off the trained Jinja template itself, not from a table of models: a probe conversation
(system, user, assistant, user, assistant, with marker contents) is rendered with and without its system
message and with the generation prompt, and the text around each content is what that role's turn prints
before and after it (the first turn may differ from later ones: Alpaca separates turns with a blank line).
The shape is then checked by rendering other conversations both ways; a template of another shape (tools in
the system turn, content rewritten, turns that depend on their position) gets a Modelfile without TEMPLATE and
a note saying why. TEMPLATE is Ollama's Go-template syntax over `.Messages`, every literal a quoted string, so
Go's whitespace trimming never eats the template's own newlines. Tools are not rendered by it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import templates
from .errors import RecipeError
from .messages import chat_messages

_S, _U1, _A1, _U2, _A2 = "PROBE_SYSTEM_71", "PROBE_USER_72", "PROBE_ASSISTANT_73", "PROBE_USER_74", "PROBE_ASSISTANT_75"


@dataclass
class Shape:
    """What a template prints around each turn's content."""
    head: str              # before everything (a BOS the template prints)
    default_system: str | None  # the system content printed when the conversation has none (None: no system turn)
    system: tuple          # (before, after) the system content
    user_first: str        # before the first message's content when it is a user turn
    user: tuple            # (before a later user turn's content, after any user content)
    assistant: tuple       # (before: the generation prompt, after: the end of the turn)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text this shape gives `messages` (what the Go template prints)."""
        out = [self.head]
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            out += [self.system[0], self.default_system, self.system[1]]
        for i, m in enumerate(messages):
            if m["role"] == "system":
                out += [self.system[0], m["content"], self.system[1]]
            elif m["role"] == "user":
                out += [self.user_first if i == 0 else self.user[0], m["content"], self.user[1]]
            else:  # a last assistant turn stays open: the model continues it
                out += [self.assistant[0], m["content"], self.assistant[1] if i < len(messages) - 1 else ""]
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            out.append(self.assistant[0])
        return "".join(out)


class ShapeError(ValueError):
    """The template is not of the common system/user/assistant shape."""


def turn_shape(tokenizer, template_kwargs: dict | None = None) -> Shape:
    """The template's shape, checked against its own renders; ShapeError when it has another."""
    render = _renderer(tokenizer, template_kwargs)
    full = render([("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2)])
    gaps = _gaps(full, [_S, _U1, _A1, _U2, _A2])
    one = render([("system", _S), ("user", _U1)])
    prompt = render([("system", _S), ("user", _U1)], True)
    if not prompt.startswith(one):
        raise ShapeError("the generation prompt does not extend the conversation")
    user_after = one[one.index(_U1) + len(_U1):]
    assistant = (prompt[len(one):], gaps[5])
    user_before = _strip(gaps[3], prefix=assistant[1])
    system = (gaps[0], _strip(gaps[1], suffix=user_before))
    if gaps[2] != user_after + assistant[0] or gaps[4] != gaps[2]:
        raise ShapeError("the text between a user turn and the answer is not the generation prompt")
    bos = tokenizer.bos_token or ""  # printed once before everything, not as part of every turn (ChatML's BOS)
    head = bos if bos and system[0].startswith(bos) and not user_before.startswith(bos) else ""
    system = (system[0][len(head):], system[1])
    alone = render([("user", _U1), ("assistant", _A1)])
    if not alone.startswith(head) or _U1 not in alone:
        raise ShapeError("a conversation without a system message starts differently")
    rest = alone[len(head):alone.index(_U1)]
    default, user_first = None, rest
    if system[0] and rest.startswith(system[0]) and rest.endswith(system[1] + user_before):
        default, user_first = rest[len(system[0]):len(rest) - len(system[1] + user_before)], user_before
    shape = Shape(head, default, system, user_first, (user_before, user_after), assistant)
    _check(shape, render)
    return shape


def end_of_turn(tokenizer, template_kwargs: dict | None = None) -> str | None:
    """The token that ends an assistant turn: the template's declared one (our shipped templates), else the first
    special token printed after the answer, else EOS."""
    declared = templates.template_meta(tokenizer.chat_template or "", tokenizer)["end_of_turn"]
    if declared:
        return declared
    try:
        answered = _renderer(tokenizer, template_kwargs)([("user", _U1), ("assistant", _A1)])
        after = answered[answered.index(_A1) + len(_A1):] if _A1 in answered else ""
    except ShapeError:
        after = ""
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    found = [(after.find(t), t) for t in specials if t in after]
    return min(found)[1] if found else tokenizer.eos_token


# ---------------------------------------------------------------- the Modelfile
def write(gguf_path: Path, tokenizer, template_kwargs: dict | None = None) -> Path:
    """`Modelfile` beside `gguf_path`: FROM the file, TEMPLATE from the trained template, stops at the end of
    turn, every special token the template ends a turn with (gpt-oss's `<|call|>`), and EOS."""
    from .gguf_vocab import added_specials

    lines = [f"# Ollama: ollama create NAME -f {gguf_path.parent / 'Modelfile'}", f"FROM ./{gguf_path.name}"]
    try:
        shape = turn_shape(tokenizer, template_kwargs)
        if shape.head and added_specials(tokenizer)[0]:
            shape.head = ""  # the runner adds BOS itself, as this tokenizer does
        lines.append(f'TEMPLATE """{go_template(shape)}"""')
    except ShapeError as e:
        lines.append(f"# no TEMPLATE: {e}; Ollama reads the chat template from the GGUF as it can")
    ends = templates.turn_stops(tokenizer.chat_template, tokenizer) if tokenizer.chat_template else []
    for stop in dict.fromkeys(t for t in (end_of_turn(tokenizer, template_kwargs), *ends, tokenizer.eos_token) if t):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def go_template(shape: Shape) -> str:
    """The shape as an Ollama TEMPLATE over `.Messages`."""
    q = _quote
    first = f'{{{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}' \
            f'{q(shape.system[0] + shape.default_system + shape.system[1])}{{{{ end }}}}' \
        if shape.default_system is not None else ""
    text = (f"{q(shape.head)}{first}"
            "{{- range $i, $m := .Messages }}"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
            f'{{{{- if eq $m.Role "system" }}}}{q(shape.system[0])}{{{{ $m.Content }}}}{q(shape.system[1])}'
            f'{{{{- else if eq $m.Role "user" }}}}{{{{ if eq $i 0 }}}}{q(shape.user_first)}{{{{ else }}}}'
            f'{q(shape.user[0])}{{{{ end }}}}{{{{ $m.Content }}}}{q(shape.user[1])}'
            f'{{{{- else if eq $m.Role "assistant" }}}}{q(shape.assistant[0])}{{{{ $m.Content }}}}'
            f'{{{{ if not $last }}}}{q(shape.assistant[1])}{{{{ end }}}}'
            "{{- end }}"
            f'{{{{- if and $last (ne $m.Role "assistant") }}}}{q(shape.assistant[0])}{{{{ end }}}}'
            "{{- end }}")
    if '"""' in text:
        raise ShapeError('a turn marker holds """, which a Modelfile cannot quote')
    return text


def _quote(text: str) -> str:
    """A Go template action printing `text` (JSON string escapes are Go's); nothing for empty text."""
    return f"{{{{ {json.dumps(text, ensure_ascii=False)} }}}}" if text else ""


# ---------------------------------------------------------------- reading the template
def _renderer(tokenizer, template_kwargs):
    source = tokenizer.chat_template
    if not source:
        raise RecipeError(f"{tokenizer.name_or_path}: the tokenizer has no chat template")
    kwargs = {**templates.special_tokens(tokenizer), **(template_kwargs or {})}

    def render(turns, add_generation_prompt=False):
        messages = chat_messages([{"role": r, "content": c} for r, c in turns])
        try:
            return templates.render(source, messages, None, add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # the template's own raise_exception, or a shape it cannot print
            roles = "/".join(r for r, _ in turns)
            raise ShapeError(f"the template refuses a plain {roles} conversation ({e})") from None

    return render


def _gaps(text: str, contents: list[str]) -> list[str]:
    """The text before, between and after `contents`, which must appear once each, in order."""
    gaps, pos = [], 0
    for content in contents:
        at = text.find(content, pos)
        if at < 0 or text.count(content) != 1:
            raise ShapeError("the template does not print each message's content once, as given")
        gaps.append(text[pos:at])
        pos = at + len(content)
    return gaps + [text[pos:]]


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(prefix) + len(suffix) > len(text):
        raise ShapeError("a turn's end and the next turn's start do not join as the other turns do")
    return text[len(prefix):len(text) - len(suffix)]


def _check(shape: Shape, render) -> None:
    """The shape must reproduce the template on conversations it was not read from."""
    convs = [[("user", "hi")], [("system", "be brief"), ("user", "hi")],
             [("user", "a"), ("assistant", "b"), ("user", "c")],
             [("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e")]]
    for turns in convs:
        messages = [{"role": r, "content": c} for r, c in turns]
        if shape.render(messages) != render(turns, True):
            raise ShapeError(f"the template prints a {'/'.join(r for r, _ in turns)} conversation in a way a "
                             "system/user/assistant shape does not")
