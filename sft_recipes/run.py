"""Train from a recipe: `python -m sft_recipes.run RECIPE.yaml [--key value ...]`
(or `accelerate launch [...] -m sft_recipes.run RECIPE.yaml`)."""
from __future__ import annotations

import logging

from .config import parse_recipe
from .errors import cli
from .trainer import train


@cli
def main(argv=None):
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING, force=True)
    train(parse_recipe(argv))


if __name__ == "__main__":
    main()
