"""Chat with a trained model in the terminal: `python -m sft_recipes.chat --model DIR [--system TEXT] [--tools FILE]`.

Each line you type is a user turn; the reply streams as it is generated and the whole history is
sent with every turn. Lines are edited as in a shell (arrow keys, Ctrl-A/E, Up for earlier lines).
A line ending in `\\` continues on the next; /paste takes every line up to one that is just /end
as one turn (paste an instruction and its input). Commands: /reset (forget the history),
/system TEXT (set the system prompt; /system alone removes it), /tool RESULT (answer the model's
tool call; it replies), /exit (or end of input, Ctrl-D). With --tools the template gets them and each
call the model makes is printed parsed (`tool call: {...}`) and kept in the history as a call.
Works with piped stdin too.
"""
from __future__ import annotations

import argparse
import json
import sys

from transformers import TextStreamer

from . import generate as gen
from . import tool_calls
from .errors import cli
from .models import load_trained
from .keys import docs

HELP = ("commands: /paste (multi-line, up to /end), /reset, /system TEXT, /tool RESULT, /exit; "
        "a line ending in \\ continues")


class Chat:
    """The conversation state: a system prompt, the tools offered, and the turns so far."""

    def __init__(self, model, tokenizer, system: str | None = None, *, tools=None, template_kwargs=None, **sampling):
        self.model, self.tokenizer, self.system, self.sampling = model, tokenizer, system, sampling
        self.tools, self.template_kwargs = tools, template_kwargs or {}
        self.history: list[dict] = []
        self.budget = gen.context_budget(model, sampling.get("max_new_tokens", gen.DEFAULTS["max_new_tokens"]))

    def messages(self) -> list[dict]:
        system = [_message("system", self.system)] if self.system else []
        return system + self.history

    def reply(self, text: str, streamer=None, role: str = "user") -> dict:
        """Add a user turn (or a tool result) and the model's reply: {"content", "tool_calls"}, calls parsed
        when tools are offered."""
        self.history.append(_message(role, text, name=self._pending_call() if role == "tool" else None))
        self._fit()
        prompt = self._prompt()
        response = gen.generate(self.model, self.tokenizer, [prompt], streamer=streamer, **self.sampling)[0]
        reply = (tool_calls.parse(response, self.tokenizer, prompt=prompt, tools=self.tools) if self.tools
                 else {"content": response, "tool_calls": None})
        self.history.append(_message("assistant", reply["content"], calls=reply["tool_calls"]))
        return reply

    def _pending_call(self) -> str | None:
        """The name of the call a tool result would answer: the next unanswered one of the latest calls made."""
        made = [i for i, m in enumerate(self.history) if m["role"] == "assistant" and m["tool_calls"]]
        if not made:
            return None
        calls = json.loads(self.history[made[-1]]["tool_calls"])
        answered = sum(m["role"] == "tool" for m in self.history[made[-1]:])
        return calls[answered]["function"]["name"] if answered < len(calls) else None

    def _prompt(self) -> str:
        return gen.prompt_text(self.tokenizer, self.messages(), self.tools, self.template_kwargs)

    def _fit(self):
        """Forget the oldest exchanges (a user turn and all that answers it) until the prompt fits the context;
        the newest turn always stays."""
        while self.budget is not None and len(self.history) > 1 and self._tokens() > self.budget:
            later = [i for i, m in enumerate(self.history) if m["role"] == "user" and i > 0]
            self.history = self.history[later[0] if later else len(self.history) - 1:]

    def _tokens(self) -> int:
        return len(self.tokenizer(self._prompt(), add_special_tokens=False)["input_ids"])


def _message(role, content, *, name=None, calls=None):
    return {"role": role, "content": content, "input": None, "train": None, "name": name,
            "tool_calls": json.dumps(calls, ensure_ascii=False) if calls else None}


def handle(chat: Chat, line: str, out=None) -> bool:
    """Act on one input line; False means stop."""
    out = out or sys.stdout  # looked up now: tests and callers may have replaced it
    line = line.strip()
    if not line:
        return True
    command, _, rest = line.partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        chat.history = []
        print("(history cleared)", file=out, flush=True)
    elif command == "/system":
        chat.system = rest.strip() or None
        print(f"(system prompt {'set' if chat.system else 'removed'})", file=out, flush=True)
    elif command == "/tool":
        if chat._pending_call() is None:
            print("(no tool call to answer: /tool RESULT answers the model's latest call)", file=out, flush=True)
        elif not rest.strip():
            print("(give the tool's result: /tool RESULT)", file=out, flush=True)
        else:
            _answer(chat, rest.strip(), "tool", out)
    elif command.startswith("/"):
        print(f"(unknown command {command}; {HELP})", file=out, flush=True)
    else:
        _answer(chat, line, "user", out)
    return True


def _answer(chat: Chat, text: str, role: str, out):
    print("assistant: ", end="", file=out, flush=True)
    # The streamer prints words as they are generated and a newline at the end; special tokens (the end of
    # turn) are hidden. The calls follow, parsed.
    reply = chat.reply(text, TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True), role)
    for line in gen.call_lines({"content": "", "tool_calls": reply["tool_calls"]}).splitlines():
        print(line, file=out, flush=True)
    if not reply["content"] and not reply["tool_calls"]:
        print(f"({gen.EMPTY})", file=out, flush=True)


def loop(chat: Chat, stdin=None):
    stdin = stdin or sys.stdin
    interactive = stdin is sys.stdin and stdin.isatty() and sys.stdout.isatty()
    if interactive:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
        print(HELP, file=sys.stderr)
    read = _reader(stdin, interactive)
    while (text := _turn(read)) is not None:
        if not handle(chat, text):
            return
    if interactive:
        print()


def _reader(stdin, interactive):
    """One line without its newline, None at end of input: `input()` on a terminal (edited by readline),
    else a plain read with no prompt printed."""
    def read(prompt):
        if interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = stdin.readline()
        return line.removesuffix("\n") if line else None
    return read


def _turn(read) -> str | None:
    """The next input: a line, lines joined by a trailing `\\`, or the lines between /paste and /end."""
    line = read("you: ")
    if line is not None and line.strip() == "/paste":
        lines = []
        while (line := read("")) is not None and line.strip() != "/end":
            lines.append(line)
        return "\n".join(lines)
    lines = [line]
    while lines[-1] is not None and lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read("...  "))
    return None if lines == [None] else "\n".join(x for x in lines if x is not None)


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.chat", epilog=docs("evaluation"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run's output_dir (full model or LoRA adapter), a "
                                                       "checkpoint-* folder in it, a merged model, or a .gguf file")
    parser.add_argument("--system", help="system prompt")
    gen.add_prompt_args(parser)
    gen.add_sampling_args(parser)
    args = parser.parse_args(argv)
    tools, kwargs = gen.prompt_options(args)
    model, tokenizer = load_trained(args.model)
    loop(Chat(model, tokenizer, args.system, tools=tools, template_kwargs=kwargs, **gen.sampling_from(args)))


if __name__ == "__main__":
    main()
