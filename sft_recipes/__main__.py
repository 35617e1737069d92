"""`sft-recipes COMMAND ...` runs `python -m sft_recipes.<module> ...`; bare, or with --help, it lists them."""
from __future__ import annotations

import difflib
import runpy
import sys

from .errors import flush_stdout, reader_gone

# command -> (module, what it does)
COMMANDS = {
    "run": ("run", "train from a recipe: RECIPE.yaml [--key value ...]"),
    "train": ("run", "the same as run"),
    "inspect": ("inspect", "show what a recipe will train (trained tokens highlighted), before training"),
    "prepare": ("prepare", "load, clean and mask a recipe's data once into dataset_prepared_path; run reads it"),
    "data": ("sources", "check a data file: format found, rows kept and dropped, first conversation"),
    "generate": ("generate", "answer a prompt, or every row of a file, with a trained model"),
    "chat": ("chat", "chat with a trained model in the terminal"),
    "evaluate": ("evaluate", "score a trained model on its recipe's eval split, optionally beside a baseline"),
    "merge": ("merge", "merge a LoRA adapter into its base model"),
    "export": ("export", "write a trained model as one GGUF file for llama.cpp and Ollama (--verify proves it)"),
    "report": ("report", "plot a run's train and eval loss to loss.png"),
    "tiny": ("tiny", "regenerate the embedded default's shipped data files"),
}


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(["usage: sft-recipes COMMAND [arguments]", "", "commands:", *lines, "",
                      "`sft-recipes COMMAND --help` describes one. Each is also `python -m sft_recipes.MODULE`."])


def main():
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in ("-h", "--help"):
        try:
            print(overview())
        except BrokenPipeError:
            reader_gone()
        flush_stdout()
        return
    if command is None:
        print(overview(), file=sys.stderr)
        sys.exit(2)
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        print(f"error: unknown command '{command}'; {guess}`sft-recipes --help` lists the commands", file=sys.stderr)
        sys.exit(2)
    module = f"sft_recipes.{COMMANDS[command][0]}"
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
