"""Generate responses with a trained model: one prompt, or every row of a data file.

    python -m sft_recipes.generate --model DIR --prompt "..." [--input ...] [--system ...]
    python -m sft_recipes.generate --model DIR --file IN.jsonl [--output OUT.jsonl]

The prompt is the model's saved chat template rendered exactly as in training up to the assistant's
turn (`add_generation_prompt`); generation stops at the end-of-turn token and only the response is
returned. Temperature 0 is greedy decoding.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from datasets import Value
from tqdm.auto import tqdm
from transformers import set_seed

from . import formats, sources, templates
from .errors import RecipeError, cli
from .models import load_trained, stop_ids

logger = logging.getLogger("sft_recipes")
DEFAULTS = {"temperature": 0.7, "top_p": None, "top_k": None, "max_new_tokens": 256, "seed": None}


# ---------------------------------------------------------------- model
def context_budget(model, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit beside `max_new_tokens` in the model's context (None: no limit known)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return None
    if max_new_tokens >= limit:
        raise RecipeError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's "
                          f"{limit}-token context")
    return limit - max_new_tokens


# ---------------------------------------------------------------- prompts
def alpaca_messages(prompt: str, input: str | None = None, system: str | None = None) -> list[dict]:
    """The canonical user turn the Alpaca converter builds from instruction/input/system, so a prompt
    typed here renders exactly like a training row (its `### Input:` block included)."""
    if not prompt or not prompt.strip():
        raise RecipeError("--prompt is empty")
    row = {"instruction": prompt, "input": input, "system": system, "output": ""}
    messages, _ = formats._alpaca(row, formats._Where("--prompt", 0, {}), None, None, [])
    return messages[:-1]  # without the (empty) assistant turn


def prompt_messages(messages: list[dict]) -> list[dict]:
    """A conversation minus its final assistant turn: what the model is asked to continue."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def prompt_text(tokenizer, messages: list[dict], tools=None) -> str:
    """Render with the same call and special-token values that masking uses for training."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    return templates.render(tokenizer.chat_template, formats.chat_messages(messages), tools,
                            add_generation_prompt=True, bos_token=tokenizer.bos_token,
                            eos_token=tokenizer.eos_token)


# ---------------------------------------------------------------- generation
def sampling_kwargs(temperature=0.7, top_p=None, top_k=None, max_new_tokens=256) -> dict:
    if temperature is None or temperature < 0:
        raise RecipeError(f"temperature must be 0 (greedy) or more, got {temperature}")
    if max_new_tokens is None or max_new_tokens < 1:
        raise RecipeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature == 0:
        return {"do_sample": False, "max_new_tokens": max_new_tokens}
    chosen = {"top_p": top_p, "top_k": top_k}
    return {"do_sample": True, "temperature": temperature, "max_new_tokens": max_new_tokens,
            **{k: v for k, v in chosen.items() if v is not None}}


def generate(model, tokenizer, conversations, *, tools=None, batch_size=16, progress=False, streamer=None,
             seed=None, temperature=0.7, top_p=None, top_k=None, max_new_tokens=256, **generate_kwargs) -> list[str]:
    """One response per conversation (a list of canonical messages, or a plain string sent as is).

    `tools`: optional list parallel to `conversations`. Extra keyword arguments go to `model.generate`.
    """
    tools = tools or [None] * len(conversations)
    prompts = [c if isinstance(c, str) else prompt_text(tokenizer, c, t) for c, t in zip(conversations, tools)]
    kwargs = {**sampling_kwargs(temperature, top_p, top_k, max_new_tokens), **generate_kwargs,
              "eos_token_id": stop_ids(model, tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer needs exactly one conversation")
    if seed is not None:
        set_seed(seed)
    budget = context_budget(model, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    out = [""] * len(prompts)
    with tqdm(total=len(prompts), desc="Generating", unit="row", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            texts = _generate_batch(model, tokenizer, [prompts[i] for i in chunk], kwargs, budget, streamer)
            for i, text in zip(chunk, texts):
                out[i] = text
            bar.update(len(chunk))
    return out


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts, kwargs, budget, streamer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's last prompt token sits where generation continues
    try:
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    if budget is not None and enc["input_ids"].shape[1] > budget:
        # Keep each prompt's end (the generation prompt); left padding makes that the last columns.
        logger.warning("a prompt is longer than the %d tokens the context leaves; its start was cut", budget)
        enc = {k: v[:, -budget:] for k, v in enc.items()}
    enc = {k: v.to(model.device) for k, v in enc.items()}
    ids = model.generate(**enc, **kwargs, streamer=streamer)
    new = ids[:, enc["input_ids"].shape[1]:].tolist()
    return [response_text(tokenizer, row, kwargs["eos_token_id"]) for row in new]


def response_text(tokenizer, new_ids: list[int], stops) -> str:
    """The generated tokens up to (not including) the first stop token, decoded and trimmed."""
    cut = next((k for k, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:cut], skip_special_tokens=True).strip()


# ---------------------------------------------------------------- files
def read_file(path: str, format: str | None = None, columns: dict | None = None, roles: dict | None = None):
    """(raw rows, canonical rows) of a local data file in any format `formats` knows (`format`, `columns`
    and `roles` as in a recipe's dataset entry). Rows need no answer: an Alpaca/instruction file without
    `output`/`response`, or prompts without `completion`, get a blank one (the row is then all prompt)."""
    spec = sources.DatasetSpec.from_dict({"path": path, "format": format or "auto", "columns": columns,
                                          "roles": roles}, path)
    files = sources._local_files(spec)
    if not files:
        raise RecipeError(f"{path}: file not found")
    raw = sources._load_local(files, spec)
    if len(raw) == 0:
        raise RecipeError(f"{path}: no records")
    ds = _with_blank_answers(raw, columns)
    fmt = spec.format if spec.format != "auto" else formats.detect_format(ds.column_names, path, columns=columns)
    return raw, formats.convert(ds, fmt, source=path, columns=columns, roles=roles)


def _with_blank_answers(ds, columns: dict | None = None):
    """Generation needs no answers: a missing answer column, or a row without an answer, gets a blank one.
    `columns` maps fields to the file's own column names, as in a recipe."""
    cols, named = set(ds.column_names), lambda field: (columns or {}).get(field, field)
    for prompt, answers in (("instruction", ("output", "response")), ("prompt", ("completion",))):
        present = [named(a) for a in answers if named(a) in cols]
        if named(prompt) not in cols:
            continue
        if not present:
            ds = ds.add_column(named(answers[0]), [""] * len(ds))
        elif ds.features[present[0]] == Value("string"):
            ds = ds.map(_blank_nulls, input_columns=present[0], batched=True, fn_kwargs={"column": present[0]})
    return ds


def _blank_nulls(values, column):
    return {column: ["" if v is None else v for v in values]}


def generate_file(model, tokenizer, path, output, *, system=None, batch_size=16, read=None, **sampling) -> int:
    """`read`: the file's `format`, `columns` and `roles` (see `read_file`)."""
    raw, rows = read_file(path, **(read or {}))
    prompts = [r["text"] if r["text"] is not None else _with_system(prompt_messages(r["messages"]), system)
               for r in rows]
    responses = generate(model, tokenizer, prompts, tools=rows["tools"], batch_size=batch_size, progress=True,
                         **sampling)
    sink = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for row, response in zip(raw, responses):
            # Arrow gives every row every column; keys a row lacked come back as null: leave them out.
            kept = {k: v for k, v in row.items() if v is not None}
            sink.write(json.dumps({**kept, "response": response}, ensure_ascii=False, default=str) + "\n")
    finally:
        if output:
            sink.close()
    return len(responses)


def _with_system(messages, system):
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system, "input": None, "train": None}, *messages]


# ---------------------------------------------------------------- command
def add_sampling_args(parser, temperature=DEFAULTS["temperature"]):
    parser.add_argument("--temperature", type=float, default=temperature, help="0 is greedy decoding")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULTS["max_new_tokens"])
    parser.add_argument("--seed", type=int, default=None, help="for reproducible sampling")


def sampling_from(args) -> dict:
    return {k: getattr(args, k) for k in DEFAULTS}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run's output_dir (full model or LoRA adapter), a "
                                                       "checkpoint-* folder in it, or a merged model")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the instruction")
    what.add_argument("--file", help="a .json/.jsonl/.csv/.parquet file of rows in any supported format")
    parser.add_argument("--input", help="Alpaca `input` for --prompt (printed as its ### Input block)")
    parser.add_argument("--system", help="system prompt (for --file: added where a row has none)")
    parser.add_argument("--output", help="--file results as JSON lines: each row + `response` (default stdout)")
    parser.add_argument("--batch_size", type=int, help="--file rows generated together (default 16)")
    sources.add_file_options(parser, "--file")
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    file_only = {"--output": args.output, "--batch_size": args.batch_size, "--format": args.format,
                 "--columns": args.columns, "--roles": args.roles}
    given = [flag for flag, value in file_only.items() if value is not None]
    if args.prompt is not None and given:
        raise RecipeError(f"{given[0]} goes with --file; --prompt prints its one response")
    if args.file and args.input:
        raise RecipeError("--input goes with --prompt; with --file each row carries its own")
    model, tokenizer = load_trained(args.model)
    if args.prompt is not None:
        messages = alpaca_messages(args.prompt, args.input, args.system)
        print(generate(model, tokenizer, [messages], **sampling_from(args))[0])
        return
    n = generate_file(model, tokenizer, args.file, args.output, system=args.system, batch_size=args.batch_size or 16,
                      read=dict(format=args.format, columns=args.columns, roles=args.roles), **sampling_from(args))
    if args.output:
        print(f"wrote {n} responses to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
