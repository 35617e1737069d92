"""`sft-recipes COMMAND ...` runs `python -m sft_recipes.<module> ...`."""
from __future__ import annotations

import runpy
import sys

COMMANDS = {"run": "run", "train": "run", "inspect": "inspect", "data": "sources", "generate": "generate",
            "chat": "chat", "evaluate": "evaluate", "merge": "merge", "report": "report", "tiny": "tiny"}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: sft-recipes {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    module = f"sft_recipes.{COMMANDS[sys.argv[1]]}"
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
