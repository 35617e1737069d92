"""Train from a recipe: `python -m sft_recipes.run RECIPE.yaml [--key value ...]`
(or `accelerate launch [...] -m sft_recipes.run RECIPE.yaml`)."""
from __future__ import annotations

import logging
import sys

from .errors import cli, quiet_stack
from .keys import flag_keys, recipe_help_parser  # light: the stack is imported once the arguments ask for work

PROG = "python -m sft_recipes.run"


@cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    helper = recipe_help_parser(PROG, "Fine-tune a model on a recipe's data with assistant-only masks (TRL "
                                      "SFTTrainer underneath), then save the model, its tokenizer and a model card.",
                                ("recipes", "training"))
    if "--help-all" in argv:
        from .config import parse_recipe
        parse_recipe(["--help"])  # TRL's parser: every key of ModelConfig and SFTConfig
    if {"-h", "--help"} & set(argv):
        helper.print_help()
        return
    if not argv or (argv[0].startswith("-") and "model_name_or_path" not in flag_keys(argv)):
        helper.error("give a recipe (e.g. recipes/tiny_alpaca.yaml), or --model_name_or_path and --datasets")
    from .config import parse_recipe
    from .trainer import train

    quiet_stack()  # now that the stack is imported
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING, force=True)
    train(parse_recipe(argv))


if __name__ == "__main__":
    main()
