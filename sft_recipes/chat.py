"""Chat with a trained model in the terminal: `python -m sft_recipes.chat --model DIR [--system TEXT]`.

Each line you type is a user turn; the reply streams as it is generated and the whole history is
sent with every turn. Commands: /reset (forget the history), /system TEXT (set the system prompt;
/system alone removes it), /exit (or end of input). Works with piped stdin too.
"""
from __future__ import annotations

import argparse
import sys

from transformers import TextStreamer
from transformers.utils import logging as hf_logging

from . import generate as gen
from .errors import cli

HELP = "commands: /reset, /system TEXT, /exit"


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
    interactive = stdin.isatty()  # piped input gets no prompts, only the replies
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        if interactive:
            print("you: ", end="", flush=True)
        line = stdin.readline()
        if not line:  # end of input
            if interactive:
                print()
            return
        if not handle(chat, line):
            return


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained output dir (model + tokenizer + template)")
    parser.add_argument("--system", help="system prompt")
    gen.add_sampling_args(parser)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    model, tokenizer = gen.load(args.model)
    loop(Chat(model, tokenizer, args.system, **gen.sampling_from(args)))


if __name__ == "__main__":
    main()
