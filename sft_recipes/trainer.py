"""Wire a recipe into TRL: the data (`prepare.py`), tokenizer and model (`models.py`), PEFT, `SFTTrainer`, train, save.

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
from pathlib import Path

import yaml
from accelerate import PartialState
from transformers import EarlyStoppingCallback, TrainerCallback, set_seed
from trl import get_peft_config

from . import distributed, fit, report
from .packing import Trainer
from .prepare import build_datasets, mask_options, masked_datasets  # noqa: F401 (imported from here too)
from .config import Recipe, changed_values
from .errors import RecipeError
from .models import load_model, load_tokenizer
from .summary import print_summary

logger = logging.getLogger("sft_recipes")


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
    fit_notes = fit.apply(recipe, model)  # defaults that fit the model and the device, for keys left unset
    trainer = Trainer(model=model, args=recipe.sft, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=_peft_config(recipe, tokenizer, model),
                         callbacks=_callbacks(recipe))
    _expose_head_bias(trainer.model)
    trainer.sft_stats, trainer.fit_notes = stats, fit_notes
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
