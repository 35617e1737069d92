"""The keys sft_recipes adds to a recipe (`ScriptArguments`, beside TRL's ModelConfig and SFTConfig) and their
allowed values. Standard library only: `run --help` prints them without importing torch, TRL or datasets."""
from __future__ import annotations

import argparse
import textwrap
from dataclasses import MISSING, dataclass, field, fields

TRAIN_ON = ("all_assistant", "last_assistant")
TRUNCATION = ("keep_start", "turn_boundary", "drop_row")
MULTI_TURN = ("auto", "joint", "per_turn")
REASONING = ("keep", "drop")
DEDUP = ("none", "exact", "near")
LIST_KEYS = ("datasets", "eval_datasets")  # a YAML list on the command line
MAP_KEYS = ("chat_template_kwargs",)  # a YAML mapping on the command line


@dataclass
class ScriptArguments:
    datasets: list[dict] = field(default_factory=list, metadata={
        "help": "Training data: a list of {path, format, split, name, data_files, weight, columns, roles}."})
    eval_datasets: list[dict] = field(default_factory=list, metadata={"help": "Separate evaluation data, same keys."})
    eval_split: float = field(default=0.0, metadata={"help": "Fraction of the training rows held out for eval."})
    chat_template: str | None = field(default=None, metadata={
        "help": "A shipped template name (chatml, alpaca, ...), `trl:NAME` (a released template TRL ships, e.g. "
                "trl:qwen3), a .jinja path, inline Jinja, or `tokenizer` (the model's own, the default)."})
    train_on: str = field(default="all_assistant", metadata={"help": "Which assistant turns are trained.",
                                                             "choices": list(TRAIN_ON)})
    train_on_inputs: bool = field(default=False, metadata={"help": "Train on every token, prompts included."})
    truncation: str = field(default="keep_start", metadata={"help": "Policy for rows over max_length.",
                                                            "choices": list(TRUNCATION)})
    verify_masks: bool = field(default=True, metadata={"help": "Prove every row's mask; refuse rows that fail."})
    multi_turn: str = field(default="auto", metadata={
        "help": "auto: one example per row when the template is prefix-stable on it, else one per trained turn; "
                "joint: always one (rows it cannot keep whole are refused); per_turn: always one per turn.",
        "choices": list(MULTI_TURN)})
    reasoning: str = field(default="keep", metadata={
        "help": "keep: assistant reasoning goes to the template; drop: removed before rendering.",
        "choices": list(REASONING)})
    train_on_reasoning: bool = field(default=True, metadata={
        "help": "Train the reasoning tokens the template prints (false: leave them at -100, train the answer)."})
    chat_template_kwargs: dict = field(default_factory=dict, metadata={
        "help": "Passed to every render, e.g. {enable_thinking: false} or {reasoning_effort: high}; a row's own "
                "`chat_template_kwargs` column overrides them."})
    strict: bool = field(default=False, metadata={"help": "Any dropped or refused row is an error."})
    dataset_prepared_path: str | None = field(default=None, metadata={
        "help": "A folder of masked rows: `sft-recipes prepare` writes it, `run` reads it instead of masking again "
                "(preparing it first when empty); a recipe that would make other rows is refused."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after this many evaluations without improvement of `metric_for_best_model` (eval loss)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Train again into an output_dir that already holds a finished model (else refused)."})
    # cleaning (sft_recipes/cleaning.py): after mixing, before masking; every removal counted by reason
    dedup: str = field(default="exact", metadata={
        "help": "Remove repeated rows: none, exact (same after normalising whitespace and case) or near (MinHash).",
        "choices": list(DEDUP)})
    dedup_threshold: float = field(default=0.9, metadata={"help": "Jaccard similarity that makes a near duplicate."})
    decontaminate: bool | None = field(default=None, metadata={
        "help": "Drop training rows that copy or share an n-gram with an eval row (default: on with eval rows)."})
    decontaminate_ngram: int = field(default=13, metadata={"help": "Words in the n-grams of `decontaminate`."})
    min_turns: int | None = field(default=None, metadata={"help": "Drop rows with fewer user turns."})
    max_turns: int | None = field(default=None, metadata={"help": "Drop rows with more user turns."})
    min_response_chars: int | None = field(default=None, metadata={
        "help": "Drop rows whose assistant text (all turns) is shorter."})
    max_response_chars: int | None = field(default=None, metadata={
        "help": "Drop rows whose assistant text (all turns) is longer."})


def flag_keys(argv: list[str]) -> list[str]:
    """The keys of the `--key value` / `--key=value` flags in `argv`."""
    return [a[2:].split("=")[0] for a in argv if a.startswith("--")]


def docs(*pages: str) -> str:
    """The `--help` line that names the pages explaining a command (docs/ of the sft_recipes repository)."""
    return "Explained in " + " and ".join(f"docs/{p}.md" for p in pages) + " of the sft_recipes repository."


class _KeepParagraphs(argparse.HelpFormatter):
    """Wraps the description and epilog by paragraph, never inside a file name (docs/large-data.md)."""

    def _fill_text(self, text, width, indent):
        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent, subsequent_indent=indent,
                                           break_on_hyphens=False) for p in text.split("\n\n"))


def recipe_help_parser(prog: str, description: str, pages=("recipes",)) -> argparse.ArgumentParser:
    """The `--help` of a command that takes a recipe: what it does, the recipe, our keys, then where TRL's are.
    For printing help and usage errors only: recipes are parsed by `config.parse_recipe`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, usage=f"{prog} RECIPE.yaml [--key value ...]",
                                     epilog="Every key of TRL's ModelConfig (model_name_or_path, dtype, use_peft, lora_r, "
                                            "load_in_4bit, ...) and SFTConfig (learning_rate, max_steps, max_length, "
                                            "packing, output_dir, ...) works too, in the recipe or as a flag; "
                                            f"`{prog} --help-all` lists them all.\n\n" + docs(*pages),
                                     formatter_class=_KeepParagraphs)
    parser.add_argument("recipe", metavar="RECIPE.yaml",
                        help="a flat YAML recipe (see recipes/); flags after it override its keys")
    parser._positionals.title, parser._optionals.title = "positional arguments", "sft_recipes keys"
    for f in fields(ScriptArguments):
        parser.add_argument(f"--{f.name}", metavar=_metavar(f), choices=f.metadata.get("choices"), help=_help(f))
    return parser


def _metavar(f) -> str | None:
    if f.name in LIST_KEYS or f.name in MAP_KEYS:
        return "YAML"
    return None if "choices" in f.metadata else {"bool": "BOOL", "int": "N", "float": "X"}.get(
        str(f.type).split(" ")[0], "VALUE")


def _help(f) -> str:
    """The field's help, with its default unless the help already says what the default does."""
    text = f.metadata.get("help", "")
    if "default" in text:
        return text
    default = f.default_factory() if f.default is MISSING else f.default
    return f"{text} (default: {default})".replace("%", "%%")
