"""sft_recipes: supervised fine-tuning with data handling and assistant-only masks you can trust."""
from importlib import import_module

__version__ = "0.1.0"
_API = {"Recipe": "config", "load_recipe": "config", "RecipeError": "errors", "build_datasets": "trainer",
        "build_trainer": "trainer", "load_tokenizer": "models", "train": "trainer"}
__all__ = sorted(_API)


def __getattr__(name):  # lazy: `python -m sft_recipes.sources` need not import torch and TRL
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'sft_recipes' has no attribute {name!r}")
