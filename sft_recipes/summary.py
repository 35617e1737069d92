"""The one screen printed before training: model, parameters, data kept and dropped, masks, batch, steps."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from .distributed import launched


def data_table(stats: dict, title: str = "data") -> Table:
    """Counts only, so the table fits 80 columns; the reasons behind them are `reason_lines`."""
    table = Table(title=title, show_header=True, header_style="bold")
    for col in ("split", "rows", "examples", "dropped", "cleaned", "tokens", "trained"):
        table.add_column(col, justify="left" if col == "split" else "right", overflow="fold")
    for split, st in stats.items():
        if not st:
            continue
        lost = sum(st["dropped"].values()) + sum(st["refused"].values())
        table.add_row(split, f"{st['rows']:,}", f"{st['examples']:,}", f"{lost:,}",
                      f"{sum(st.get('cleaned', {}).values()):,}", f"{st['tokens']:,}", f"{st['trained_fraction']:.1%}")
    return table


def reason_lines(stats: dict) -> list[str]:
    """Each split's drops and cleaning by reason, and its truncations, in full: plain lines wrap on a narrow
    terminal, never cut."""
    lines = []
    for split, st in stats.items():
        if not st:
            continue
        lost = {**st["dropped"], **st["refused"]}
        if lost:
            lines.append(f"{split} dropped (rows or examples): " + ", ".join(f"{k}: {v:,}" for k, v in lost.items()))
        if st.get("cleaned"):
            lines.append(f"{split} cleaned (rows): {cleaned(st)}")
        if st["truncated"]:
            lines.append(f"{split} truncated to max_length: {st['truncated']:,} examples")
    return lines


def print_data(console: Console, stats: dict):
    """The data part of the summary (and of `inspect`): the table, reasons, notes, first refused examples."""
    console.print(data_table(stats))
    for line in reason_lines(stats) + data_notes(stats) + refusal_examples(stats):
        console.print(line, markup=False)


def data_notes(stats: dict) -> list[str]:
    """What the table can't say, per split: see `note_lines`."""
    return [f"{split}: {line}" for split, st in stats.items() if st for line in note_lines(st)]


def note_lines(st: dict) -> list[str]:
    """Per-turn splits and their cost, reasoning, template habits, unused fields: of one split's stats, or of one
    template's in the data checker."""
    lines = []
    if st["split_rows"]:
        base = st["tokens"] - st["split_extra_tokens"]
        lines.append(f"{st['split_rows']:,} rows trained as one example per turn ({st['split_examples']:,} "
                     f"examples; the 'one example per turn' notes below say why): "
                     f"+{st['split_extra_tokens']:,} tokens, {st['split_extra_tokens'] / max(base, 1):.1%} more")
    if st["reasoning_trained"] or st["reasoning_unprinted"]:
        lines.append(f"reasoning trained on {st['reasoning_trained']:,} turns"
                     + (f"; {st['reasoning_unprinted']:,} turns have reasoning the template does not print "
                        "(not trained; `strict: true` makes this an error)" if st["reasoning_unprinted"] else ""))
    lines += [f"{n:,} examples: {note}" for note, n in st["notes"].items()]
    if st["unused"]:
        lines.append("fields not used: " + ", ".join(f"{k} ({v:,} rows)" for k, v in st["unused"].items()))
    return lines


def cleaned(st: dict) -> str:
    """Rows removed by each cleaning check that ran (zeros too, so the checks show)."""
    return ", ".join(f"{k}: {v:,}" for k, v in st.get("cleaned", {}).items()) or "none"


def refusal_examples(stats: dict) -> list[str]:
    return [f"  {split} {reason}: {ex}" for split, st in stats.items() if st
            for key in ("drop_examples", "cleaning_examples", "examples_refused")
            for reason, exs in st.get(key, {}).items() for ex in exs[:2]]


def print_summary(trainer, console: Console | None = None):
    console = console or Console(stderr=True)
    args, model = trainer.args, trainer.model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world = args.world_size
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    rows = len(trainer.train_dataset)  # after TRL's preparation: packed blocks when packing
    per_epoch = math.ceil(math.ceil(rows / (args.per_device_train_batch_size * world)) / args.gradient_accumulation_steps)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
    head = Table.grid(padding=(0, 2))
    head.add_row("model", f"{trainer.recipe.model.model_name_or_path} ({type(model).__name__})")
    head.add_row("parameters", f"{trainable:,} trainable of {total:,} ({trainable / max(total, 1):.1%})")
    head.add_row("template", _template_name(trainer.recipe.data.chat_template))
    head.add_row("batch", f"{effective} = {args.per_device_train_batch_size} per device x "
                          f"{args.gradient_accumulation_steps} accumulation x {world} processes")
    head.add_row("launch", launched(trainer.accelerator))
    if getattr(trainer, "fit_notes", None):
        head.add_row("defaults", "; ".join(trainer.fit_notes))
    head.add_row("steps", f"{steps:,} ({rows:,} {'packed blocks' if args.packing else 'examples'}, "
                          f"{per_epoch:,} steps/epoch)")
    head.add_row("output", args.output_dir)
    console.print(head)
    print_data(console, trainer.sft_stats)


def _template_name(spec):
    if spec is None or spec == "tokenizer":
        return "the tokenizer's own"
    return "inline Jinja" if "{" in spec else spec
