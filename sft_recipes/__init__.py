"""sft_recipes: supervised fine-tuning with data handling and assistant-only masks you can trust."""
from .config import Recipe, load_recipe
from .errors import RecipeError
from .trainer import build_datasets, build_trainer, load_tokenizer, train

__all__ = ["Recipe", "RecipeError", "build_datasets", "build_trainer", "load_recipe", "load_tokenizer", "train"]
__version__ = "0.1.0"
