"""A recipe = our `ScriptArguments` (data, masks, run options) + TRL's `ModelConfig` + TRL's `SFTConfig`, parsed by `TrlParser` from a
flat YAML file with CLI overrides. Unknown keys are errors that suggest the closest valid key."""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import torch
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from . import paths
from .cleaning import CleanOptions
from .errors import RecipeError
from .messages import check_kwargs
from .keys import LIST_KEYS as _LIST_KEYS, MAP_KEYS as _MAP_KEYS, MULTI_TURN, REASONING, TRAIN_ON, TRUNCATION
from .keys import ScriptArguments, flag_keys, recipe_help_parser  # noqa: F401  (in keys.py: light to import)
from .sources import flag_value


@dataclass
class Recipe:
    data: ScriptArguments
    model: ModelConfig
    sft: SFTConfig
    path: str | None = None
    given: frozenset = frozenset()  # the keys the recipe file and flags set (the rest are defaults)


# TRL's own data-preparation keys: sft_recipes hands TRL rows it has tokenized and masked, so setting one of
# these would change nothing (or undo our work): refused, pointing at ours.
_TRL_DATA_KEYS = {"assistant_only_loss": "use `train_on`", "completion_only_loss": "use `train_on_inputs`",
                  "dataset_text_field": "use a dataset entry's `columns: {text: your_column}`",
                  "dataset_kwargs": "use the `datasets:` entries", "chat_template_path": "use `chat_template`",
                  "truncation_mode": "use `truncation`", "eos_token": "the `chat_template` names the end of a turn"}


class _Parser(TrlParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _yaml_flags(self)

    def error(self, message):  # argparse would print the whole usage and exit; we want one line
        raise RecipeError(message)


def _yaml_flags(parser):
    """List and mapping keys take one YAML or JSON value on the command line (argparse would want one dict
    per word)."""
    for action in parser._actions:
        if action.dest in _LIST_KEYS:
            action.type, action.nargs, action.metavar = _entries, None, "YAML"
        elif action.dest in _MAP_KEYS:
            action.type, action.metavar = _mapping, "YAML"


def _entries(text: str) -> list:
    """`--datasets data.jsonl`, `--datasets '{path: a.json, format: sharegpt}'` or a YAML/JSON list of them."""
    value = flag_value(text)
    return value if isinstance(value, list) else [value]


def _mapping(text: str) -> dict:
    """`--chat_template_kwargs '{enable_thinking: false}'` (YAML or JSON)."""
    value = flag_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{enable_thinking: false}}', got {text!r}")
    return value


def _defaults(recipe_path: str | None) -> dict:
    """Defaults that differ from SFTConfig's, chosen for the machine we are on (a recipe overrides them)."""
    cuda = torch.cuda.is_available()
    stem = Path(recipe_path).stem if recipe_path else "run"
    return {"output_dir": f"runs/{stem}", "report_to": "none", "use_cpu": not cuda,
            "bf16": cuda and torch.cuda.is_bf16_supported(),
            "activation_checkpointing": False,  # unless set, decided from a memory estimate (fit.py)
            "dataloader_pin_memory": cuda, "ddp_find_unused_parameters": False}


def _valid_keys(parser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest != "help"]


def _unknown(rest: list[str], parser, where: str):
    keys = flag_keys(rest) or rest
    if keys:
        raise _unknown_key(keys[0], _valid_keys(parser), where)


def _unknown_key(key: str, valid, where: str) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m sft_recipes.run --help`"
    return RecipeError(f"{where}: unknown key '{key}'{hint}")


def _blame(message: str, path: str | None, cli_keys: list[str], cli: str) -> str:
    """Who an argparse complaint is about: `argument --max_steps/--max-steps: ...` names a flag the command line
    gave (then it's the command line's), else a recipe value."""
    named = re.match(r"argument --([\w-]+)", message)
    if path is None or (named and named.group(1).replace("-", "_") in cli_keys):
        return cli
    return path


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)  # safe: a recipe can never construct Python objects
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{path}{at}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys to values")
    return config


def parse_recipe(argv: list[str] | None = None, cli: str = "command line") -> Recipe:
    """`RECIPE.yaml [--key value ...]` (or just flags) -> Recipe; `cli` names where the flags came from in errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and not argv[0].startswith("-") else None
    cli_keys = [k.replace("-", "_") for k in flag_keys(argv)]
    parser = _Parser((ScriptArguments, ModelConfig, SFTConfig))
    parser.set_defaults(**_defaults(path))
    given = set(cli_keys)
    if path:
        given |= set(_read_yaml(path))  # clear errors for missing/malformed files before TRL reads it
        argv = ["--config", path, *argv]
    try:
        data, model, sft, from_yaml, from_cli = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except (ValueError, RecipeError) as e:  # a value argparse or a dataclass __post_init__ rejects
        raise RecipeError(f"{_blame(str(e), path, cli_keys, cli)}: {e}") from None
    _unknown(from_yaml, parser, path or "recipe")
    _unknown(from_cli, parser, cli)
    if sft.eval_strategy == "no":
        sft.eval_on_start = False  # no evaluation means none at all, even if the recipe asked for one at start
    if sft.dataset_num_proc == 1:
        # datasets 5.2 starts a one-worker pool for num_proc=1: tokenizer pickled over, and Rust
        # tokenization single-threaded in the worker (1.4x slower on 2 cores); None works in-process.
        sft.dataset_num_proc = None
    recipe = Recipe(data=data, model=model, sft=sft, path=path, given=frozenset(given))
    if path:
        paths.resolve(recipe, set(cli_keys))  # the recipe's relative paths: beside it when they exist there
    _check_values(recipe)
    return recipe


def _check_values(recipe: Recipe):
    """Values argparse accepts but that cannot work: say so before anything loads."""
    s, d, where = recipe.sft, recipe.data, recipe.path or "recipe"
    positive = {"max_length": s.max_length, "per_device_train_batch_size": s.per_device_train_batch_size,
                "per_device_eval_batch_size": s.per_device_eval_batch_size,
                "gradient_accumulation_steps": s.gradient_accumulation_steps, "learning_rate": s.learning_rate,
                "num_train_epochs": s.num_train_epochs}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise RecipeError(f"{where}: {key} must be positive, got {value}")
    for key, allowed in (("train_on", TRAIN_ON), ("truncation", TRUNCATION), ("multi_turn", MULTI_TURN),
                         ("reasoning", REASONING)):  # argparse checks CLI only
        if getattr(d, key) not in allowed:
            raise RecipeError(f"{where}: {key} must be one of {', '.join(allowed)}, got '{getattr(d, key)}'")
    if not 0 <= d.eval_split < 1:
        raise RecipeError(f"{where}: eval_split is a fraction of the rows in [0, 1), got {d.eval_split}")
    check_kwargs(d.chat_template_kwargs, where)
    for key in _LIST_KEYS:
        entries = getattr(d, key)
        if not isinstance(entries, list) or not all(isinstance(x, (dict, str)) for x in entries):
            raise RecipeError(f"{where}: {key} must be a list of {{path: ..., format: ...}} entries")
    defaults = {f.name: f.default for f in fields(SFTConfig)}
    for key, ours in _TRL_DATA_KEYS.items():
        if getattr(s, key) != defaults[key]:
            raise RecipeError(f"{where}: `{key}` belongs to TRL's data preparation, which sft_recipes does "
                              f"itself: {ours}")
    try:
        clean_options(d)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def clean_options(d: ScriptArguments) -> CleanOptions:
    """The cleaning keys; `decontaminate` is on by default when there are eval rows."""
    has_eval = bool(d.eval_split or d.eval_datasets)
    if d.decontaminate and not has_eval:
        raise RecipeError("decontaminate: true needs eval rows; set eval_split or eval_datasets")
    values = {f.name: getattr(d, f.name) for f in fields(CleanOptions)}  # the keys share the option names
    return CleanOptions(**{**values, "decontaminate": has_eval if d.decontaminate is None else d.decontaminate})


def load_recipe(path: str | None = None, **overrides) -> Recipe:
    """Library entry: `load_recipe("recipes/tiny_alpaca.yaml", max_steps=10, datasets=[...])`."""
    valid = [f.name for cls in (ScriptArguments, ModelConfig, SFTConfig) for f in fields(cls)]
    for key in overrides:
        if key not in valid:
            raise _unknown_key(key, valid, "load_recipe")
    kept = (list, dict, type(None))  # structured values and None can't travel as flags ("None" is a string there)
    argv = [path] if path else []
    for key, value in overrides.items():
        if not isinstance(value, kept):
            argv += [f"--{key}", str(value)]
    recipe = parse_recipe(argv, cli="load_recipe")
    for key, value in overrides.items():
        if isinstance(value, kept):
            setattr(next(o for o in (recipe.data, recipe.model, recipe.sft) if hasattr(o, key)), key, value)
            recipe.given |= {key}
    return recipe


def changed_values(recipe: Recipe) -> dict:
    """The recipe as flat YAML-ready keys, listing only what differs from a recipe that sets nothing (values
    compared after TRL's own normalising, so e.g. a default `accelerator_config` is not listed), and the
    LoRA shape of an adapter run, default or not."""
    base, out = parse_recipe([]), {}
    lora = ("lora_r", "lora_alpha", "lora_dropout") if recipe.model.use_peft else ()
    for obj, default in ((recipe.data, base.data), (recipe.model, base.model), (recipe.sft, base.sft)):
        for f in fields(obj):
            value = _plain(getattr(obj, f.name))
            if f.init and not f.name.startswith("_") and (value != _plain(getattr(default, f.name)) or f.name in lora):
                out[f.name] = value
    return out


def _plain(value):
    if hasattr(value, "value"):  # enums
        return value.value
    if is_dataclass(value):  # e.g. accelerator_config
        return _plain(asdict(value))
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
