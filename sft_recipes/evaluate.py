"""Score a trained model on its recipe's eval split, optionally beside a baseline:

    python -m sft_recipes.evaluate RECIPE.yaml [--model DIR] [--baseline DIR_OR_ID|tiny:gpt2] [--output_dir DIR]

For every eval conversation the model answers the conversation up to its last assistant turn (greedy,
batched, with the recipe's chat_template_kwargs). A text answer is scored against that turn with ROUGE-L,
corpus BLEU and normalised exact match; where that turn is a tool call, the model's reply is parsed for
calls (`tool_calls.parse`) and scored by exact match of names and arguments (`tool_call_accuracy`).
Eval loss and perplexity come from a forward pass over the same rows with the training labels (mean
over all trained tokens). The eval rows are chosen as training chose them (same data, split and seed).
The baseline (e.g. `tiny:gpt2`, the untrained starting point of the embedded default) is loaded as
training loads its starting model and prompted with the evaluated model's chat template.
The model is any output folder of a run: a full model, a LoRA adapter (applied to its base), a checkpoint;
or a .gguf file (then --output_dir is needed).
Writes report.md, metrics.json, predictions.jsonl (and loss.png when the model dir has a log history)
into --output_dir (default: the model dir). Recipe keys that choose or mask the eval rows may follow
(e.g. `--eval_split 0.1`); keys only training reads are refused.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from . import generate as gen
from . import masking, metrics, report, sources, templates, tool_calls
from .config import flag_keys, parse_recipe
from .errors import RecipeError, cli
from .gguf import is_gguf
from .models import add_response_template, load_model, load_tokenizer, load_trained
from .trainer import mask_options
from .keys import docs

# The recipe keys evaluation reads from the command line: which rows, how they are masked, the loss batch.
RECIPE_KEYS = ("datasets", "eval_datasets", "eval_split", "seed", "dataset_num_proc", "strict", "train_on",
               "train_on_inputs", "truncation", "max_length", "verify_masks", "per_device_eval_batch_size")
# (key, label, format spec); the change column uses the same spec with a sign.
METRICS = (("rouge_l", "ROUGE-L F", ".4f"), ("bleu", "BLEU (0-100)", ".2f"), ("exact_match", "exact match", ".2%"),
           ("tool_call_accuracy", "tool-call accuracy", ".2%"), ("eval_loss", "eval loss", ".4f"),
           ("perplexity", "perplexity", ".2f"))
TEXT_SCORES = ("rouge_l", "bleu", "exact_match")


# ---------------------------------------------------------------- rows
def eval_conversations(recipe):
    """The eval conversations exactly as `trainer.masked_datasets` picks them (same loader, split, seed)."""
    d, s = recipe.data, recipe.sft
    load = dict(seed=s.seed, num_proc=s.dataset_num_proc, strict=d.strict)
    if d.eval_datasets:
        return sources.load_conversations(d.eval_datasets, **load)[0]
    if not d.eval_split:
        raise RecipeError(f"{recipe.path or 'recipe'}: no eval data; set `eval_split` or `eval_datasets`")
    if not d.datasets:
        raise RecipeError(f"{recipe.path or 'recipe'}: no `datasets:`")
    return sources.split_eval(sources.load_mixture(d.datasets, **load).rows, d.eval_split, s.seed)[1]


def masked_rows(conversations, tokenizer, recipe):
    """Training's masking of `conversations` with this tokenizer: one row per training example (a
    conversation whose template rewrites history gives one per turn), each holding the messages it
    covers, so its last assistant turn is the one to score. Refused rows keep their `drop`."""
    out = masking.tokenize(conversations, tokenizer, mask_options(recipe, tokenizer), desc="Masking eval")
    return out.map(lambda row: {"messages": masking.example_messages(row)}, desc="Examples")


def split_reference(messages):
    """(prompt messages, reference message) around the last assistant turn; (None, None) without one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return (None, None) if last is None else (messages[:last], messages[last])


def reference_calls(reference: dict) -> list | None:
    """The calls a reference turn makes (canonical), or None for a text answer."""
    return json.loads(reference["tool_calls"]) if reference.get("tool_calls") else None


def reference_text(reference: dict) -> str:
    """A reference as shown in reports: its text, or its calls one `{"name", "arguments"}` per line."""
    calls = reference_calls(reference)
    return gen.call_lines({"content": reference["content"], "tool_calls": calls}) if calls else reference["content"]


# ---------------------------------------------------------------- models
def load_evaluated(path: str):
    model, tokenizer = load_trained(path)
    tokenizer.end_of_turn = templates.template_meta(tokenizer.chat_template, tokenizer)["end_of_turn"]
    return model, tokenizer


def load_baseline(spec: str, recipe, template: str):
    """The starting model as training builds it (special tokens, pad, resized embeddings), with `template`."""
    base = copy.copy(recipe)
    base.model = copy.copy(recipe.model)
    base.data = copy.copy(recipe.data)
    base.model.model_name_or_path, base.data.chat_template = spec, template
    tokenizer = load_tokenizer(base)
    add_response_template(tokenizer)
    model = load_model(base, tokenizer)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


# ---------------------------------------------------------------- scoring
@torch.inference_mode()
def eval_loss(model, rows, batch_size: int) -> dict:
    """Mean cross-entropy over every trained (label != -100) token, and its perplexity."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, labels = _pad(batch["input_ids"], 0), _pad(batch["labels"], -100)
        attention = _pad([[1] * len(x) for x in batch["input_ids"]], 0)
        dev = model.device
        logits = model(input_ids=ids.to(dev), attention_mask=attention.to(dev)).logits[:, :-1].float()
        target = labels[:, 1:].to(dev)  # token t is predicted from the tokens before it
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    mean = total / max(count, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50)), "eval_tokens": count}


def _pad(seqs, value):
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def text_scores(predictions, references) -> tuple[dict, dict]:
    """(corpus-level metrics, per-example scores) from our offline metric modules."""
    summary, per_example = {}, {}
    for name in metrics.NAMES:
        result = metrics.load(name).compute(predictions=predictions, references=references, per_example=True)
        key = "rouge_l" if name == "rouge" else name
        summary[key], per_example[key] = result[key], result[f"{key}_scores"]
    return summary, per_example


def prompts_of(tokenizer, rows, template_kwargs: dict) -> list[str]:
    """Each row's prompt up to its last assistant turn, rendered as training rendered it."""
    return [gen.prompt_text(tokenizer, split_reference(m)[0], t, gen.row_kwargs(template_kwargs, k))
            for m, t, k in zip(rows["messages"], rows["tools"], rows["chat_template_kwargs"])]


def score(responses, prompts, rows, tokenizer) -> tuple[dict, dict, list]:
    """(metrics, per-example scores, parsed calls). Text answers get ROUGE-L, BLEU and exact match; turns whose
    reference is a tool call get tool_call_accuracy on the calls parsed from the reply. A per-example score is
    None where its metric does not apply."""
    references = [split_reference(m)[1] for m in rows["messages"]]
    calls = [reference_calls(r) for r in references]
    text = [i for i, c in enumerate(calls) if c is None]
    called = [i for i, c in enumerate(calls) if c is not None]
    tools = rows["tools"]
    parsed = [tool_calls.parse(responses[i], tokenizer, prompt=prompts[i], tools=json.loads(tools[i] or "null"))
              ["tool_calls"] if calls[i] is not None else None for i in range(len(responses))]
    summary, per_example = dict.fromkeys(TEXT_SCORES), {k: [None] * len(responses) for k in (*TEXT_SCORES, "tool_call")}
    if text:
        found, scores = text_scores([responses[i] for i in text], [references[i]["content"] for i in text])
        summary.update(found)
        for key, values in scores.items():
            for i, v in zip(text, values):
                per_example[key][i] = v
    accuracy = tool_calls.tool_call_accuracy([parsed[i] for i in called], [calls[i] for i in called])
    for i, v in zip(called, accuracy["tool_call_accuracy_scores"]):
        per_example["tool_call"][i] = v
    summary.update(tool_call_accuracy=accuracy["tool_call_accuracy"], text_rows=len(text), tool_call_rows=len(called))
    return summary, per_example, parsed


def evaluate_model(model, tokenizer, rows, *, batch_size, loss_batch_size, max_new_tokens, template_kwargs=None) -> dict:
    """Generate for every row and score it; the loss covers the rows this tokenizer's masking keeps.
    `rows`: eval conversations masked with this tokenizer (`masked_rows`); `template_kwargs`: the recipe's."""
    trainable = rows.filter(lambda d: [x is None for x in d], input_columns="drop", batched=True)
    loss = eval_loss(model, trainable, loss_batch_size) if len(trainable) else {}
    prompts = prompts_of(tokenizer, rows, template_kwargs or {})
    responses = gen.generate(model, tokenizer, prompts, batch_size=batch_size, progress=True, temperature=0,
                             max_new_tokens=max_new_tokens)
    summary, per_example, parsed = score(responses, prompts, rows, tokenizer)
    return {"metrics": {**summary, **loss, "loss_rows": len(trainable), "generated_rows": len(responses)},
            "prompts": prompts, "responses": responses, "scores": per_example, "tool_calls": parsed}


# ---------------------------------------------------------------- output
def changed_most(model_run, base_run, n: int) -> list[int]:
    """Indices of the `n` examples whose ROUGE-L (then exact match), or tool-call score, moved most, either way."""
    def delta(i):
        keys = ("tool_call", "tool_call") if model_run["scores"]["tool_call"][i] is not None else ("rouge_l", "exact_match")
        return tuple(abs(model_run["scores"][k][i] - base_run["scores"][k][i]) for k in keys)
    return sorted(range(len(model_run["responses"])), key=delta, reverse=True)[:n]


def metric_rows(runs: dict) -> list[list[str]]:
    """[label, value per run..., change (with two runs)] for each metric, formatted."""
    rows = []
    for key, label, spec in METRICS:
        values = [r["metrics"].get(key) for r in runs.values()]
        cells = [format(v, spec) if v is not None else "-" for v in values]
        if len(values) == 2:
            cells.append(format(values[1] - values[0], "+" + spec) if None not in values else "-")
        rows.append([label, *cells])
    return rows


def metrics_table(runs: dict) -> Table:
    table = Table(title="evaluation", header_style="bold")
    for col in ["metric", *runs, *(["change"] if len(runs) == 2 else [])]:
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in metric_rows(runs):
        table.add_row(*row)
    return table


def _fence(text: str) -> str:
    """A fenced block that survives any backticks inside the text."""
    ticks = "`" * max(3, max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def markdown(info: dict, runs: dict, examples: list[dict]) -> str:
    names = list(runs)
    lines = [f"# Evaluation of `{info['model']}`", "",
             f"Recipe `{info['recipe']}`; {info['rows']} eval rows ({info['tool_call_rows']} answered with tool "
             f"calls); greedy decoding, at most {info['max_new_tokens']} new tokens.", "", *_md_table(runs), "",
             "ROUGE-L, BLEU and exact match score the text answers: ROUGE-L and exact match are means over examples "
             "(exact match after lowercasing and removing punctuation, articles and extra spaces); BLEU is corpus "
             "BLEU (sacrebleu). Tool-call accuracy is the share of the turns answered with tool calls in the data "
             "whose calls the model made exactly (names and arguments, in any order). Eval loss is the mean "
             "cross-entropy over all trained tokens, perplexity its exponential.", ""]
    if info.get("loss_png"):
        lines += ["![train and eval loss](loss.png)", ""]
    lines += ["## " + ("Examples whose score changed most" if len(names) == 2 else "Examples"), ""]
    for k, ex in enumerate(examples, 1):
        lines += _md_example(k, ex, names)
    return "\n".join(lines)


def _md_table(runs: dict) -> list[str]:
    head = ["metric", *(f"{n} (`{r['path']}`)" for n, r in runs.items()), *(["change"] if len(runs) == 2 else [])]
    return ["| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *metric_rows(runs)]]


def _md_example(k: int, ex: dict, names: list[str]) -> list[str]:
    scores = ", ".join(f"{n}: tool call {ex[n]['tool_call']:.0f}" if ex[n]["tool_call"] is not None else
                       f"{n}: ROUGE-L {ex[n]['rouge_l']:.2f}, EM {ex[n]['exact_match']:.0f}" for n in names)
    lines = [f"### {k}. {scores}", "", "Prompt:", _fence(ex["prompt"]), "Reference:", _fence(ex["reference"])]
    for n in names:
        response = ex[n]["response"]
        lines += [f"{n.capitalize()}:", _fence(response) if response else "*(empty response)*"]
    return lines + [""]


def example(i, prompts, references, runs) -> dict:
    """One example for the report and predictions.jsonl; a run's parsed `tool_calls` where the reference is calls."""
    def result(r):
        calls = {"tool_calls": r["tool_calls"][i]} if r["scores"]["tool_call"][i] is not None else {}
        return {"response": r["responses"][i], **calls, **{k: v[i] for k, v in r["scores"].items()}}
    return {"prompt": prompts[i], "reference": references[i], **{n: result(r) for n, r in runs.items()}}


def write_outputs(out: Path, info: dict, runs: dict, prompts, references, n_examples: int, console: Console):
    out.mkdir(parents=True, exist_ok=True)
    names = list(runs)
    if len(names) == 2:
        picked = changed_most(runs[names[1]], runs[names[0]], n_examples)
    else:
        picked = list(range(min(n_examples, len(prompts))))
    examples = [example(i, prompts, references, runs) for i in picked]
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i in range(len(prompts)):
            f.write(json.dumps(example(i, prompts, references, runs), ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(
        {**info, **{n: {"path": r["path"], **r["metrics"]} for n, r in runs.items()}}, indent=2))
    (out / "report.md").write_text(markdown(info, runs, examples), encoding="utf-8")
    console.print(metrics_table(runs))
    if len(names) == 2:
        show = Table(title="examples whose score changed most", header_style="bold", show_lines=True)
        for col in ("prompt", "reference", *names):
            show.add_column(col, overflow="fold", max_width=40)
        for ex in examples:
            show.add_row(ex["prompt"][-200:], ex["reference"][:200], *(ex[n]["response"][:200] for n in names))
        console.print(show)
    console.print(f"wrote {out / 'report.md'}, {out / 'metrics.json'}, {out / 'predictions.jsonl'}")


# ---------------------------------------------------------------- command
def scored_rows(masked) -> list[int]:
    """The masked eval rows that are scored: those training could use (not refused) that end in an answer."""
    return [i for i, (drop, msgs) in enumerate(zip(masked["drop"], masked["messages"]))
            if drop is None and split_reference(msgs)[0] is not None]


def run(recipe, model_dir: str, *, baseline=None, max_rows=None, max_new_tokens=128, batch_size=16, output=None,
        examples=5, console=None) -> dict:
    """The whole evaluation; returns {name: {"path", "metrics", "prompts", "responses", "scores", "tool_calls"}}."""
    console = console or Console()
    model, tokenizer = load_evaluated(model_dir)
    masked = masked_rows(eval_conversations(recipe), tokenizer, recipe)
    keep = scored_rows(masked)[:max_rows]
    if not keep:
        raise RecipeError("no eval rows with an assistant turn to score")
    masked = masked.select(keep)
    sizes = dict(batch_size=batch_size, loss_batch_size=recipe.sft.per_device_eval_batch_size or batch_size,
                 max_new_tokens=max_new_tokens, template_kwargs=recipe.data.chat_template_kwargs)
    runs = {}
    if baseline:
        base_model, base_tok = load_baseline(baseline, recipe, tokenizer.chat_template)
        base_rows = masked_rows(masked.select_columns(["messages", "tools", "chat_template_kwargs", "text"]),
                                base_tok, recipe)
        runs["baseline"] = {"path": baseline, **evaluate_model(base_model, base_tok, base_rows, **sizes)}
        del base_model
    runs["model"] = {"path": model_dir, **evaluate_model(model, tokenizer, masked, **sizes)}
    out = Path(output or model_dir)
    prompts = runs["model"]["prompts"]
    references = [reference_text(split_reference(m)[1]) for m in masked["messages"]]
    info = {"recipe": recipe.path, "model": model_dir, "rows": len(keep),
            "tool_call_rows": runs["model"]["metrics"]["tool_call_rows"], "max_new_tokens": max_new_tokens,
            "decoding": "greedy", "loss_png": _plot(model_dir, out)}
    write_outputs(out, info, runs, prompts, references, examples, console)
    return runs


def _plot(model_dir, out: Path) -> bool:
    try:
        return report.plot_loss(model_dir, out / "loss.png") is not None
    except RecipeError:  # no log history saved with this model
        return False


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.evaluate", epilog=docs("evaluation"), description=__doc__, allow_abbrev=False,
                                     usage="%(prog)s RECIPE.yaml [--model DIR] [options] [--recipe_key value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe the model was trained with")
    parser.add_argument("--model", help="a run's output_dir (full model or LoRA adapter), a checkpoint-* folder, "
                                        "a merged model or a .gguf file (default: the recipe's output_dir)")
    parser.add_argument("--baseline", help="model to compare with: an output dir, a Hub id, a .gguf file, or tiny:gpt2")
    parser.add_argument("--max_rows", type=int, help="evaluate only the first N eval rows")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16, help="generation batch size")
    parser.add_argument("--examples", type=int, default=5, help="examples shown in the report")
    parser.add_argument("--output_dir", "--output", dest="output",
                        help="folder for report.md, metrics.json, predictions.jsonl (default: the model dir)")
    args, rest = parser.parse_known_args(argv)
    _refuse_unread(rest, parser)
    recipe = parse_recipe([args.recipe, *rest])
    model_dir = args.model or recipe.sft.output_dir
    if is_gguf(model_dir) and not args.output:  # the report goes beside a model folder, not into a file
        raise RecipeError(f"--model {model_dir} is a GGUF file: give --output_dir for the report")
    if not is_gguf(model_dir) and not Path(model_dir).is_dir():
        raise RecipeError(f"model folder not found: {model_dir}")
    if args.max_rows is not None and args.max_rows < 1:
        raise RecipeError(f"--max_rows must be at least 1, got {args.max_rows}")
    run(recipe, model_dir, baseline=args.baseline, max_rows=args.max_rows, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, output=args.output, examples=args.examples)


def _refuse_unread(rest: list[str], parser):
    """A flag that is neither ours nor a recipe key evaluation reads would change nothing: say so."""
    ours = [o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    for key in flag_keys(rest):
        if key.replace("-", "_") not in RECIPE_KEYS:  # TRL takes --eval-split for --eval_split too
            close = difflib.get_close_matches(key, ours + list(RECIPE_KEYS), n=1, cutoff=0.6)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise RecipeError(f"--{key}: evaluate does not use it; {hint}it takes {', '.join('--' + o for o in ours)}"
                              f" and the recipe keys {', '.join(RECIPE_KEYS)}")


if __name__ == "__main__":
    main()
