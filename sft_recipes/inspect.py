"""See what will be trained, before training: `python -m sft_recipes.inspect RECIPE.yaml [-n 3]
[--export FILE.jsonl] [--key value ...]`. Loads the tokenizer only, never the model weights.

Prints sample rows with the trained tokens highlighted, rows kept and refused per split with reasons,
and length percentiles. Recipe keys may follow as for `run`, and are checked as `run` checks them, so
a run's command line can be inspected as it is."""
from __future__ import annotations

import argparse
import json

import numpy as np
from rich.console import Console
from rich.text import Text

from .config import parse_recipe
from .errors import cli
from .masking import example_messages
from .models import load_tokenizer
from .summary import print_data
from .trainer import masked_datasets
from .keys import docs


def highlight(ids, labels, tokenizer, reasoning=()) -> Text:
    """Trained tokens in bold green, everything else dim: runs decoded together so text reads naturally.
    Reasoning texts are shown in magenta on top (bold when trained, dim when not)."""
    text, start = Text(), 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            piece = tokenizer.decode(ids[start:i])
            text.append(piece, style="bold green" if labels[start] != -100 else "dim")
            start = i
    text.highlight_words([r.strip() for r in reasoning if r and r.strip()], style="magenta")
    return text


def lengths(ds) -> str:
    n = np.asarray(ds["n_tokens"]) if len(ds) else np.zeros(1)
    p50, p90, p99 = np.percentile(n, [50, 90, 99])
    return f"tokens per row: p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {n.max()}"


def export(path, splits: dict, tokenizer):
    """One JSON line per kept example: its tokens and labels, and the messages it covers (`train: false` on
    those not trained in it; reasoning in `reasoning_content`, calls in `tool_calls`), so an independent
    checker can re-render and verify it."""
    with open(path, "w", encoding="utf-8") as f:
        for split, ds in splits.items():
            for row in ds:
                messages = [{k: v for k, v in m.items() if v is not None} for m in example_messages(row)]
                f.write(json.dumps({"split": split, "row": row["row"], "source": row.get("source"),
                                    "record": row.get("record"), "input_ids": row["input_ids"],
                                    "labels": row["labels"], "messages": messages, "tools": row["tools"],
                                    "chat_template_kwargs": row["chat_template_kwargs"], "text": row["text"],
                                    "notes": row["notes"]}, ensure_ascii=False) + "\n")


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.inspect", epilog=docs("masks"), description=__doc__,
                                     usage="%(prog)s RECIPE.yaml [-n N] [--export FILE] [--key value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe to inspect")
    parser.add_argument("-n", type=int, default=3, help="sample rows to show")
    parser.add_argument("--export", help="write every kept row as JSON lines: input_ids, labels, messages")
    args, rest = parser.parse_known_args(argv)
    recipe = parse_recipe([args.recipe, *rest])
    tokenizer = load_tokenizer(recipe)
    train, evals, stats = masked_datasets(recipe, tokenizer)
    console = Console()
    splits = {"train": train, "eval": evals} if evals is not None else {"train": train}
    kept = {k: ds.filter(lambda d: [x is None for x in d], input_columns="drop", batched=True) for k, ds in splits.items()}
    for i, row in enumerate(kept["train"].select(range(min(args.n, len(kept["train"]))))):
        split = f", turn {row['turns']} of a row split per turn" if row["split"] else ""
        console.rule(f"train example {i}: {row['n_tokens']} tokens, {row['n_trained']} trained{split}")
        reasoning = [m["reasoning_content"] for m in example_messages(row)]
        console.print(highlight(row["input_ids"], row["labels"], tokenizer, reasoning))
    console.rule()
    print_data(console, stats)
    for split, ds in kept.items():
        console.print(f"{split}: {lengths(ds)}")
    if args.export:
        export(args.export, kept, tokenizer)
        console.print(f"wrote {sum(len(d) for d in kept.values()):,} rows to {args.export}")


if __name__ == "__main__":
    main()
