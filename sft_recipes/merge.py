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
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from . import tiny
from .errors import RecipeError, cli
from .generate import stop_ids
from .hub import from_pretrained

DTYPES = ("auto", "float32", "bfloat16", "float16")


def base_of(adapter_dir: Path, base: str | None = None) -> str:
    """The base model to load: `base`, else the adapter's own record; `tiny:gpt2` becomes its local folder."""
    config_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise RecipeError(f"{adapter_dir}: no such adapter folder")
    if not config_file.is_file():
        found = "a full model, not an adapter" if (adapter_dir / "config.json").is_file() else "no adapter_config.json"
        raise RecipeError(f"{adapter_dir}: not a PEFT adapter folder ({found}); give the output_dir "
                          "(or a checkpoint-* folder) of a run with `use_peft: true`")
    try:
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except ValueError as e:
        raise RecipeError(f"{config_file}: not valid JSON ({e})") from None
    name = base or recorded
    if not name:
        raise RecipeError(f"{config_file} names no base model; pass --base ID_OR_PATH")
    if name == tiny.TINY_MODEL_ID:
        return str(tiny.tiny_model_path())
    if not base and Path(name).is_absolute() and not Path(name).exists():
        raise RecipeError(f"the base model folder {name} (from {config_file}) no longer exists; "
                          "pass --base ID_OR_PATH (`tiny:gpt2` for the embedded tiny model)")
    return name


def merge(adapter_dir, output, base: str | None = None, dtype: str = "auto") -> Path:
    """Merge `adapter_dir` into its base and save everything to `output`; returns the output folder."""
    from peft import PeftModel

    adapter_dir, output = Path(adapter_dir), Path(output)
    base_path = base_of(adapter_dir, base)
    if output.resolve() == adapter_dir.resolve():
        raise RecipeError("--output must be a different folder from the adapter")
    tokenizer = from_pretrained(AutoTokenizer, str(adapter_dir))
    model = from_pretrained(AutoModelForCausalLM, base_path, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # as in training, so the shapes match
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.generation_config.eos_token_id = stop_ids(model, tokenizer)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)  # carries the chat template
    return output


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="a LoRA output_dir or checkpoint-* folder (holds adapter_config.json)")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base model id or folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights' dtype (default: the base's own)")
    args = parser.parse_args(argv)
    print(f"wrote {merge(args.adapter_dir, args.output, args.base, args.dtype)}")


if __name__ == "__main__":
    main()
