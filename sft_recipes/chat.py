"""Chat with a trained model in the terminal: `python -m sft_recipes.chat --model DIR [--system TEXT]`.

Each line you type is a user turn; the reply streams as it is generated and the whole history is
sent with every turn. Lines are edited as in a shell (arrow keys, Ctrl-A/E, Up for earlier lines).
A line ending in `\\` continues on the next; /paste takes every line up to one that is just /end
as one turn (paste an instruction and its input). Commands: /reset (forget the history),
/system TEXT (set the system prompt; /system alone removes it), /exit (or end of input, Ctrl-D).
Works with piped stdin too.
"""
from __future__ import annotations

import argparse
import sys

from transformers import TextStreamer

from . import generate as gen
from .errors import cli
from .models import load_trained

HELP = "commands: /paste (multi-line, up to /end), /reset, /system TEXT, /exit; a line ending in \\ continues"


class Chat:
    """The conversation state: a system prompt and alternating user/assistant turns."""

    def __init__(self, model, tokenizer, system: str | None = None, **sampling):
        self.model, self.tokenizer, self.system, self.sampling = model, tokenizer, system, sampling
        self.history: list[dict] = []
        self.budget = gen.context_budget(model, sampling.get("max_new_tokens", gen.DEFAULTS["max_new_tokens"]))

    def messages(self) -> list[dict]:
        system = [_message("system", self.system)] if self.system else []
        return system + self.history

    def reply(self, text: str, streamer=None) -> str:
        self.history.append(_message("user", text))
        self._fit()
        response = gen.generate(self.model, self.tokenizer, [self.messages()], streamer=streamer, **self.sampling)[0]
        self.history.append(_message("assistant", response))
        return response

    def _fit(self):
        """Forget the oldest exchanges until the prompt fits the context (the newest turn always stays)."""
        while self.budget is not None and len(self.history) > 1 and self._tokens() > self.budget:
            self.history = self.history[2:]

    def _tokens(self) -> int:
        text = gen.prompt_text(self.tokenizer, self.messages())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _message(role, content):
    return {"role": role, "content": content, "input": None, "train": None}


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
    elif command.startswith("/"):
        print(f"(unknown command {command}; {HELP})", file=out, flush=True)
    else:
        print("assistant: ", end="", file=out, flush=True)
        # The streamer prints words as they are generated and a newline at the end; special tokens
        # (the end of turn) are hidden.
        chat.reply(line, TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True))
    return True


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
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run's output_dir (full model or LoRA adapter), a "
                                                       "checkpoint-* folder in it, or a merged model")
    parser.add_argument("--system", help="system prompt")
    gen.add_sampling_args(parser)
    args = parser.parse_args(argv)
    model, tokenizer = load_trained(args.model)
    loop(Chat(model, tokenizer, args.system, **gen.sampling_from(args)))


if __name__ == "__main__":
    main()
