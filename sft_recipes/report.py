"""Reports of a run: loss curves from the trainer's log history (`python -m sft_recipes.report OUTPUT_DIR`
writes loss.png) and the model card written into output_dir.

    plot_loss("runs/tiny_alpaca")                    # reads trainer_state.json (or the newest checkpoint's)
    plot_loss(trainer.state.log_history, "loss.png")  # straight from a finished Trainer
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .errors import RecipeError, cli
from .keys import docs

logger = logging.getLogger("sft_recipes")


def log_history(output_dir) -> list[dict]:
    """The log history saved in `output_dir`, else in its newest checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint  # here, not at the top: `report --help` stays quick

    out = Path(output_dir)
    state = out / "trainer_state.json"
    if not state.is_file() and out.is_dir():
        last = get_last_checkpoint(str(out))
        state = Path(last) / "trainer_state.json" if last else state
    if not state.is_file():
        raise RecipeError(f"{out}: no trainer_state.json here or in a checkpoint-* folder")
    try:
        return json.loads(state.read_text())["log_history"]
    except (ValueError, KeyError) as e:
        raise RecipeError(f"{state}: not a trainer state file ({e})") from None


def curves(history: list[dict]) -> dict[str, tuple[list, list]]:
    """{'train': (steps, losses), 'eval': (steps, losses)}, for whichever were logged."""
    found = {}
    for name, key in (("train", "loss"), ("eval", "eval_loss")):
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if points:
            found[name] = tuple(map(list, zip(*points)))
    return found


def plot_loss(source, path=None) -> Path | None:
    """Plot train and eval loss against step; `source` is an output dir or a log-history list.
    Returns the PNG path, or None (and writes nothing) when no loss was logged."""
    if isinstance(source, (str, Path)):
        history, path = log_history(source), path or Path(source) / "loss.png"
    elif path is None:
        raise ValueError("plot_loss(log_history, path): give the PNG path")
    else:
        history = source
    found = curves(history)
    if not found:
        logger.warning("no loss in the log history (fewer steps than logging_steps?): no plot written")
        return None
    _draw(found, Path(path))
    return Path(path)


def _draw(found, path: Path):
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    styles = {"train": dict(color="tab:blue", marker="o", markersize=3),
              "eval": dict(color="tab:orange", marker="s", markersize=5, linestyle="--")}
    for name, (steps, losses) in found.items():
        ax.plot(steps, losses, label=f"{name} loss", **styles[name])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per trained token)")
    ax.set_title("Training and evaluation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def model_card(recipe_values: dict, stats: dict, metrics: dict) -> str:
    """README.md for output_dir: what was trained on, how it was masked, with what settings, how it did."""
    import yaml

    from .summary import cleaned, data_notes

    data = "\n".join(f"- `{d.get('path')}` (format {d.get('format', 'auto')}"
                     + (f", weight {d['weight']}" if d.get("weight") else "") + ")"
                     for d in recipe_values.get("datasets", []))
    rows = "\n".join(f"| {split} | {st['rows']:,} | {st['examples']:,} | "
                     f"{', '.join(f'{k}: {v}' for k, v in {**st['dropped'], **st['refused']}.items()) or 'none'}"
                     f" | {cleaned(st)} | {st['truncated']:,} | {st['trained_fraction']:.1%} |"
                     for split, st in stats.items() if st)
    notes = "\n".join(f"- {line}" for line in data_notes(stats))
    scores = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"""---
library_name: transformers
base_model: {recipe_values.get("model_name_or_path")}
tags: [sft, sft_recipes, trl]
---
# {Path(str(recipe_values.get("output_dir", "model"))).name}

Fine-tuned from `{recipe_values.get("model_name_or_path")}` with sft_recipes (TRL `SFTTrainer`).

## Data
{data}

| split | rows | examples | dropped or refused | cleaned | truncated | tokens trained |
|---|---|---|---|---|---|---|
{rows}
{notes}

## Template and masking
Chat template: `{recipe_values.get("chat_template", "the tokenizer's own")}` (saved with the tokenizer).
Loss on {"every token" if recipe_values.get("train_on_inputs") else f"assistant turns ({recipe_values.get('train_on', 'all_assistant')}) and their end-of-turn token"};
every row's mask verified before training; truncation `{recipe_values.get("truncation", "keep_start")}`.

## Recipe
```yaml
{yaml.safe_dump(recipe_values, sort_keys=False).strip()}
```

## Final metrics
| metric | value |
|---|---|
{scores}
"""


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.report", epilog=docs("training"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a training output dir")
    parser.add_argument("--output", help="PNG path (default OUTPUT_DIR/loss.png)")
    args = parser.parse_args(argv)
    written = plot_loss(args.output_dir, args.output)
    print(f"wrote {written}" if written else "no loss logged: nothing to plot")


if __name__ == "__main__":
    main()
