"""Wire a recipe into TRL: masked datasets, tokenizer and model (`models.py`), PEFT, `SFTTrainer`, train, save.

Library use:
    from sft_recipes import load_recipe, train
    train(load_recipe("recipes/tiny_alpaca.yaml", max_steps=20))
"""
from __future__ import annotations

import gc
import json
import logging
import math
import signal
from collections import Counter
from pathlib import Path

import yaml
from accelerate import PartialState
from transformers import EarlyStoppingCallback, TrainerCallback, set_seed
from trl import get_peft_config

from . import cleaning, distributed, masking, report, sources
from .packing import Trainer
from .config import Recipe, changed_values, clean_options
from .errors import RecipeError
from .models import load_model, load_tokenizer
from .summary import print_summary

logger = logging.getLogger("sft_recipes")


# ---------------------------------------------------------------- masks
def mask_options(recipe: Recipe, tokenizer) -> masking.MaskOptions:
    d = recipe.data
    return masking.MaskOptions(template=tokenizer.chat_template, end_of_turn=getattr(tokenizer, "end_of_turn", None),
                               train_on=d.train_on, train_on_inputs=d.train_on_inputs,
                               max_length=recipe.sft.max_length, truncation=d.truncation, verify=d.verify_masks,
                               multi_turn=d.multi_turn, reasoning=d.reasoning, train_on_reasoning=d.train_on_reasoning,
                               chat_template_kwargs=d.chat_template_kwargs)


# ---------------------------------------------------------------- datasets
def build_datasets(recipe: Recipe, tokenizer):
    """Canonical conversations -> masked token rows ready for TRL. Returns (train, eval or None, stats)."""
    train, evals, stats = masked_datasets(recipe, tokenizer)
    return _trainable(train), _trainable(evals) if evals is not None else None, stats


def masked_datasets(recipe: Recipe, tokenizer):
    """Like `build_datasets`, keeping every column (messages, drop reason, counts) and refused rows."""
    d, s = recipe.data, recipe.sft
    if not d.datasets:
        raise RecipeError(f"{recipe.path or 'recipe'}: no `datasets:` to train on")
    with PartialState().main_process_first():  # rank 0 fills the datasets cache, the others read it
        train, drops, repeats = sources.load_mixture(d.datasets, seed=s.seed, num_proc=s.dataset_num_proc,
                                                     strict=d.strict)
        evals, eval_drops = None, sources.Drops()
        if d.eval_datasets:
            evals, eval_drops = sources.load_conversations(d.eval_datasets, seed=s.seed,
                                                           num_proc=s.dataset_num_proc, strict=d.strict)
        elif d.eval_split:
            train, evals = sources.split_eval(train, d.eval_split, s.seed)
        train, cleaned = cleaning.clean(train, evals, clean_options(d), num_proc=s.dataset_num_proc)
        train = sources.repeat(train, repeats, s.seed)  # after dedup, so a deliberate repeat still repeats
        opts = mask_options(recipe, tokenizer)
        train = masking.tokenize(train, tokenizer, opts, num_proc=s.dataset_num_proc, desc="Masking train")
        if evals is not None:
            evals = masking.tokenize(evals, tokenizer, opts, num_proc=s.dataset_num_proc, desc="Masking eval")
    stats = {"train": _stats(train, drops, cleaned), "eval": _stats(evals, eval_drops) if evals is not None else None}
    for split, st in stats.items():
        if st and st["rows"] == 0:
            reason, n = next(iter(st["refused"].items()), ("none", 0))
            example = st["examples_refused"].get(reason, [""])[0]
            raise RecipeError(f"no {split} rows left to train on: {n} refused ({reason}: {example}); "
                              "check chat_template, max_length and the data with `python -m sft_recipes.inspect`")
    if d.strict:
        for split, st in stats.items():
            if st and st["refused"]:
                reason, n = next(iter(st["refused"].items()))
                raise RecipeError(f"strict: {n} {split} examples refused ({reason}: {st['examples_refused'][reason][0]}); "
                                  "fix the data or template, or turn `strict` off to drop them")
            if st and st["reasoning_unprinted"]:
                raise RecipeError(f"strict: the template prints no reasoning for {st['reasoning_unprinted']} {split} "
                                  "turns that have some; choose a template that prints it, set `reasoning: drop`, "
                                  "or turn `strict` off")
    return train, evals, stats


def _stats(ds, drops: sources.Drops, cleaned: cleaning.Cleaned | None = None) -> dict:
    cols = ["drop", "detail", "n_tokens", "n_trained", "truncated", "row", "split", "reasoning_trained",
            "reasoning_unprinted", "notes", "unused", "source", "record"]
    c = ds.select_columns([k for k in cols if k in ds.column_names]).to_dict()  # one read
    refused, examples = Counter(), {}
    where = zip(c.get("source") or [None] * len(c["drop"]), c.get("record") or [None] * len(c["drop"]))
    for reason, detail, (source, record) in zip(c["drop"], c["detail"], where):
        if reason:
            refused[reason] += 1
            if refused[reason] <= 3:  # named by file and record, as data errors are
                examples.setdefault(reason, []).append(f"{source}, record {record}: {detail}" if source else detail)
    kept = [i for i, reason in enumerate(c["drop"]) if reason is None]
    n_tokens, n_trained = sum(c["n_tokens"][i] for i in kept), sum(c["n_trained"][i] for i in kept)
    rows = {c["row"][i] for i in kept}
    split = {}  # row -> token counts of its examples
    for i in kept:
        if c["split"][i]:
            split.setdefault(c["row"][i], []).append(c["n_tokens"][i])
    first = {}  # each conversation's unused fields once (its per-turn examples share them)
    for row, names in zip(c["row"], c.get("unused") or [[]] * len(c["row"])):
        first.setdefault(row, names or [])
    cleaned = cleaned or cleaning.Cleaned()
    return {"rows": len(rows), "examples": len(kept), "dropped": dict(drops),
            "drop_examples": drops.examples, "cleaned": cleaned.counts,
            "cleaning_examples": cleaned.examples, "refused": dict(refused.most_common()),
            "examples_refused": examples, "truncated": sum(c["truncated"]), "tokens": n_tokens,
            "trained_tokens": n_trained, "trained_fraction": n_trained / max(n_tokens, 1),
            "split_rows": len(split), "split_examples": sum(map(len, split.values())),
            # what one example per row would have cost: its longest (last) example
            "split_extra_tokens": sum(sum(t) - max(t) for t in split.values()),
            "reasoning_trained": sum(c["reasoning_trained"][i] for i in kept),
            "reasoning_unprinted": sum(c["reasoning_unprinted"][i] for i in kept),
            "notes": dict(Counter(n for i in kept for n in c["notes"][i]).most_common()),
            "unused": dict(Counter(n for names in first.values() for n in names).most_common())}


def _trainable(ds):
    ds = ds.filter(lambda drop: [d is None for d in drop], input_columns="drop", batched=True, desc="Dropping refused")
    return ds.select_columns(["input_ids", "labels"])


# ---------------------------------------------------------------- trainer
def build_trainer(recipe: Recipe) -> Trainer:
    """A ready `SFTTrainer` (our masked datasets, TRL's collator and packing, packed rows on dense attention,
    PEFT if asked)."""
    set_seed(recipe.sft.seed)
    tokenizer = load_tokenizer(recipe)
    train_ds, eval_ds, stats = build_datasets(recipe, tokenizer)
    if eval_ds is None and recipe.sft.eval_strategy != "no":
        raise RecipeError(f"eval_strategy is '{recipe.sft.eval_strategy.value}' but there is no eval data: "
                          "set `eval_split` or `eval_datasets`")
    model = load_model(recipe, tokenizer)
    trainer = Trainer(model=model, args=recipe.sft, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=_peft_config(recipe, tokenizer, model),
                         callbacks=_callbacks(recipe))
    _expose_head_bias(trainer.model)
    trainer.sft_stats = stats
    trainer.recipe = recipe
    # Everything alive now lives for the whole run: keep it out of the cyclic GC's full passes, which
    # otherwise walk the data-preparation heap during training (steps/s 0.84x -> 1.0x of a plain TRL
    # script, benchmarks/overhead.py).
    gc.collect()
    gc.freeze()
    return trainer


def _peft_config(recipe: Recipe, tokenizer, model):
    config = get_peft_config(recipe.model)
    new = getattr(tokenizer, "template_token_ids", [])
    if config is not None and new and not config.trainable_token_indices:
        # The template's new tokens must learn, and travel with the adapter: their input rows, and their
        # output rows too when the head is not tied to the input embeddings (else the model can hardly
        # learn to emit the end-of-turn token it is trained to stop on).
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        tied = outputs is None or outputs.weight is inputs.weight  # PEFT then ties the head's rows itself
        config.trainable_token_indices = new if tied else {
            name: new for name, module in model.named_modules() if module is inputs or module is outputs}
    return config


def _expose_head_bias(model):
    """TRL's fused loss reads `lm_head.weight` and `lm_head.bias`. PEFT's trainable-token wrapper of the LM head
    (tied embeddings, or new tokens trained in the head) serves `weight` with the trained rows but has no `bias`."""
    head = model.get_output_embeddings()
    if type(head).__name__ == "TrainableTokensWrapper" and "bias" not in vars(head):
        object.__setattr__(head, "bias", getattr(head.original_module, "bias", None))


def _callbacks(recipe: Recipe):
    patience = recipe.data.early_stopping_patience
    if patience is None:
        return None
    if recipe.sft.eval_strategy == "no" or not recipe.sft.load_best_model_at_end:
        raise RecipeError("early_stopping_patience needs evaluation and the best model kept: set "
                          "`eval_strategy: steps` and `load_best_model_at_end: true` (with save_strategy "
                          "matching eval_strategy)")
    return [EarlyStoppingCallback(early_stopping_patience=patience)]


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, write a checkpoint, stop. The same command resumes."""

    def __init__(self):
        self.signal = None

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = control.should_training_stop = True


def train(recipe: Recipe) -> Trainer:
    """Build, summarise, train (resuming from the last checkpoint in output_dir), save everything."""
    resume = _resume_point(recipe)  # before any work: a refusal should come at once
    trainer = build_trainer(recipe)
    state = PartialState()
    if state.is_main_process:
        if line := distributed.mismatch(trainer.accelerator):
            logger.warning(line)
        print_summary(trainer)
    stop = StopOnSignal().install()
    trainer.add_callback(stop)
    result = trainer.train(resume_from_checkpoint=resume)
    if stop.signal is not None:
        raise RecipeError(f"stopped by {signal.Signals(stop.signal).name} at step {trainer.state.global_step}; "
                          f"checkpoint saved in {recipe.sft.output_dir}; run the same command to resume")
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        evaluation = trainer.evaluate()
        evaluation["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50))
        metrics.update(evaluation)
    distributed.save_model(trainer)  # model (or adapter) + tokenizer with its chat template
    if state.is_main_process:
        _save_run(trainer, metrics)
    return trainer


def _resume_point(recipe: Recipe):
    """An existing output_dir is resumed from its last checkpoint, or refused: never silently overwritten."""
    out, asked = Path(recipe.sft.output_dir), recipe.sft.resume_from_checkpoint
    if asked and asked != "auto":
        if not Path(asked).is_dir():
            raise RecipeError(f"resume_from_checkpoint: no checkpoint folder at {asked}")
        return asked
    if recipe.data.overwrite_output_dir or not out.is_dir():
        return None
    last = _last_complete_checkpoint(out)
    if last:
        logger.warning("resuming from %s", last)
        return last
    if (out / "config.json").exists() or (out / "adapter_config.json").exists():
        raise RecipeError(f"output_dir {out} already holds a trained model; choose another output_dir "
                          "or set `overwrite_output_dir: true`")
    return None


def _last_complete_checkpoint(out: Path) -> str | None:
    """The newest checkpoint-N saved to the end. Its trainer_state.json is written last, so a run killed while
    saving leaves a folder without it (or with it cut short): skipped, with a warning."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            logger.warning("skipping %s: not saved to the end (the run stopped while saving it)", folder)
    return None


def _save_run(trainer, metrics: dict):
    out = Path(trainer.args.output_dir)
    trainer.state.save_to_json(str(out / "trainer_state.json"))  # the loss history, for plots and reports
    report.plot_loss(trainer.state.log_history, out / "loss.png")
    values = changed_values(trainer.recipe)
    (out / "recipe.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    (out / "README.md").write_text(report.model_card(values, trainer.sft_stats, metrics))
    (out / "sft_run.json").write_text(json.dumps({"data": trainer.sft_stats, "metrics": metrics}, indent=2))
    trainer.log_metrics("final", metrics)
