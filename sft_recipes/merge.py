"""Merge a LoRA adapter into its base model and save a standalone model folder.

    python -m sft_recipes.merge ADAPTER_DIR --output DIR [--base ID_OR_PATH] [--dtype auto|float32|bfloat16|float16]

The base is the adapter's `base_model_name_or_path` unless `--base` names another (`tiny:gpt2` is the
embedded tiny model). It is loaded unquantized, so a QLoRA adapter merges into full-precision weights.
Its embeddings are resized to the adapter's tokenizer (tokens the chat template added), the adapter is
applied and merged, and DIR gets the model, the tokenizer with its chat template, and a generation
config whose EOS list keeps the end-of-turn token, so `python -m sft_recipes.generate --model DIR` stops.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .errors import RecipeError, cli, quiet_stack
from .keys import docs

DTYPES = ("auto", "float32", "bfloat16", "float16")


def merge(adapter_dir, output, base: str | None = None, dtype: str = "auto") -> Path:
    """Merge `adapter_dir` into its base and save everything to `output`; returns the output folder."""
    from .models import base_of, load_trained, recipe_file  # here: `merge --help` need not import torch

    adapter_dir, output = Path(adapter_dir), Path(output)
    base_of(adapter_dir, base)  # refuses anything but an adapter with a base to load
    if output.resolve() == adapter_dir.resolve():
        raise RecipeError("--output must be a different folder from the adapter")
    model, tokenizer = load_trained(str(adapter_dir), base, dtype)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)  # carries the chat template
    recipe = recipe_file(str(adapter_dir))
    if recipe is not None:  # its chat_template_kwargs: prompts render as in training
        shutil.copyfile(recipe, output / "recipe.yaml")
    return output


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.merge", epilog=docs("training"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="a LoRA output_dir or checkpoint-* folder (holds adapter_config.json)")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base model id or folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights' dtype (default: the base's own)")
    args = parser.parse_args(argv)
    from . import models  # noqa: F401  (the stack, imported once the arguments are read)

    quiet_stack()
    print(f"wrote {merge(args.adapter_dir, args.output, args.base, args.dtype)}")


if __name__ == "__main__":
    main()
