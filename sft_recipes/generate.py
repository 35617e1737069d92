"""Generate responses with a trained model: one prompt, or every row of a data file.

    python -m sft_recipes.generate --model DIR --prompt "..." [--input ...] [--system ...] [--tools TOOLS.json]
    python -m sft_recipes.generate --model DIR --file IN.jsonl [--output OUT.jsonl] [--tools TOOLS.json]

The prompt is the model's saved chat template rendered exactly as in training up to the assistant's
turn (`add_generation_prompt`), with the chat_template_kwargs it was trained with (its recipe.yaml;
`--chat_template_kwargs` overrides them); generation stops at the end-of-turn token and only the
response is returned. Temperature 0 is greedy decoding. With tools (`--tools`, or a row's own), the
template gets them and the calls the model makes are printed parsed: `tool call: {"name", "arguments"}`
lines after the answer text; with `--file`, each output row gains `tool_calls`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from datasets import Dataset, Value
from tqdm.auto import tqdm
from transformers import set_seed

from . import formats, sources, templates, tool_calls
from .errors import RecipeError, Where, cli
from .messages import chat_messages, check_kwargs, read_tools as _read_tools
from .models import load_trained, stop_ids, trained_kwargs
from .keys import docs

logger = logging.getLogger("sft_recipes")
# An empty reply is a real answer (an end of turn at once), so not an error, but never a silent blank line.
EMPTY = "the model's reply is empty: it ended its turn at once"
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
    messages, _ = formats._alpaca(row, Where("--prompt", 0, {}), None, None, [])
    return messages[:-1]  # without the (empty) assistant turn


def prompt_messages(messages: list[dict]) -> list[dict]:
    """A conversation minus its final assistant turn: what the model is asked to continue."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def prompt_text(tokenizer, messages: list[dict], tools=None, template_kwargs: dict | None = None) -> str:
    """Render with the same call, special-token values and chat_template_kwargs that masking uses for training
    (`tools` and `template_kwargs` as a row stores them, JSON text, or parsed)."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    if isinstance(template_kwargs, str):
        template_kwargs = json.loads(template_kwargs)
    return templates.render(tokenizer.chat_template, chat_messages(messages), tools, add_generation_prompt=True,
                            **{**templates.special_tokens(tokenizer), **(template_kwargs or {})})


def row_kwargs(template_kwargs: dict | None, row_kwargs: str | None) -> dict:
    """A row's own chat_template_kwargs (JSON text, as stored) over the model's, as masking merges them."""
    return {**(template_kwargs or {}), **(json.loads(row_kwargs) if row_kwargs else {})}


def read_tools(path: str) -> list:
    """A `--tools` file: a JSON list of OpenAI tool schemas, bare schemas accepted, as a data row's `tools`."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise RecipeError(f"{path}: file not found") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise RecipeError(f"{path}: not valid JSON ({e})") from None
    tools = _read_tools(value, path)
    if not tools:
        raise RecipeError(f"{path}: no tools in the list")
    return tools


def call_lines(reply: dict) -> str:
    """A parsed reply as printed: its answer text, then one `tool call: {"name", "arguments"}` line per call."""
    calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
             for c in reply["tool_calls"] or []]
    return "\n".join([reply["content"]] * bool(reply["content"]) + [f"tool call: {c}" for c in calls])


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
    """One response per conversation (a list of canonical messages, or a prompt rendered with `prompt_text`).

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
    out, cut = [""] * len(prompts), 0
    with tqdm(total=len(prompts), desc="Generating", unit="row", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            texts, n = _generate_batch(model, tokenizer, [prompts[i] for i in chunk], kwargs, budget, streamer)
            for i, text in zip(chunk, texts):
                out[i] = text
            cut += n
            bar.update(len(chunk))
    if cut:  # said once for the call, not once a batch
        logger.warning("%d of %d prompts are longer than the %d tokens the context leaves beside max_new_tokens; "
                       "their start was cut", cut, len(prompts), budget)
    return out


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts, kwargs, budget, streamer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's last prompt token sits where generation continues
    try:
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    cut = 0
    if budget is not None and enc["input_ids"].shape[1] > budget:
        # Keep each prompt's end (the generation prompt); left padding makes that the last columns.
        cut = int((enc["attention_mask"].sum(dim=1) > budget).sum())
        enc = {k: v[:, -budget:] for k, v in enc.items()}
    enc = {k: v.to(model.device) for k, v in enc.items()}
    ids = model.generate(**enc, **kwargs, streamer=streamer)
    new = ids[:, enc["input_ids"].shape[1]:].tolist()
    return [response_text(tokenizer, row, kwargs["eos_token_id"]) for row in new], cut


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
    if not isinstance(raw, Dataset):  # valid JSON whose columns Arrow cannot type
        raise RecipeError(f"{path}: could not load its fields as columns; check with `sft-recipes data {path}`")
    if len(raw) == 0:
        raise RecipeError(f"{path}: no records")
    ds = _with_blank_answers(raw, columns)
    fmt = spec.format if spec.format != "auto" else formats.detect_format(ds.column_names, path, columns=columns)
    rows = formats.convert(ds, fmt, source=path, columns=columns, roles=roles)
    bad = next((d for d, r in zip(rows["detail"], rows["drop"]) if r == "malformed"), None)
    if bad is not None:  # every row gets an answer line, so a row that cannot be read stops the file
        raise RecipeError(f"{path}, {bad}")
    return raw, rows


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


def generate_file(model, tokenizer, path, output, *, system=None, batch_size=16, read=None, tools=None,
                  template_kwargs=None, **sampling) -> int:
    """`read`: the file's `format`, `columns` and `roles` (see `read_file`). `tools` (parsed) serve the rows
    that carry none of their own; `template_kwargs` are the model's, under each row's own."""
    raw, rows = read_file(path, **(read or {}))
    offered = [None if r["text"] is not None else r["tools"] or (tools and json.dumps(tools)) for r in rows]
    prompts = [r["text"] if r["text"] is not None else
               prompt_text(tokenizer, _with_system(prompt_messages(r["messages"]), system), t,
                           row_kwargs(template_kwargs, r["chat_template_kwargs"]))
               for r, t in zip(rows, offered)]
    responses = generate(model, tokenizer, prompts, batch_size=batch_size, progress=True, **sampling)
    sink = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for row, prompt, t, response in zip(raw, prompts, offered, responses):
            # Arrow gives every row every column; keys a row lacked come back as null: leave them out.
            out = {**{k: v for k, v in row.items() if v is not None}, "response": response}
            if t:  # the calls the model made, parsed (null: none)
                out["tool_calls"] = tool_calls.parse(response, tokenizer, prompt=prompt, tools=json.loads(t))["tool_calls"]
            sink.write(json.dumps(out, ensure_ascii=False, default=str) + "\n")
    finally:
        if output:
            sink.close()
    if empty := sum(not r for r in responses):
        logger.warning("%d of %d responses are empty: the model ended its turn at once", empty, len(responses))
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


def add_prompt_args(parser):
    """The flags that shape the prompt besides the conversation: tools and chat_template_kwargs."""
    parser.add_argument("--tools", metavar="FILE.json",
                        help="a JSON list of tool schemas (OpenAI's, or bare {name, description, parameters}) "
                             "given to the template; the model's calls are printed parsed")
    parser.add_argument("--chat_template_kwargs", type=sources.flag_value, metavar="YAML",
                        help="template options over those the model was trained with (its recipe.yaml), "
                             "e.g. '{enable_thinking: false}'")


def prompt_options(args) -> tuple[list | None, dict]:
    """(tools, chat_template_kwargs) for a model folder from the flags of `add_prompt_args`."""
    tools = read_tools(args.tools) if args.tools else None
    flag = check_kwargs(args.chat_template_kwargs, "--chat_template_kwargs") \
        if args.chat_template_kwargs is not None else {}
    return tools, {**trained_kwargs(args.model), **flag}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.generate", epilog=docs("evaluation"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run's output_dir (full model or LoRA adapter), a "
                                                       "checkpoint-* folder in it, a merged model, or a .gguf file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the instruction")
    what.add_argument("--file", help="a .json/.jsonl/.csv/.parquet file of rows in any supported format")
    parser.add_argument("--input", help="Alpaca `input` for --prompt (printed as its ### Input block)")
    parser.add_argument("--system", help="system prompt (for --file: added where a row has none)")
    parser.add_argument("--output", help="--file results as JSON lines: each row + `response` (default stdout)")
    parser.add_argument("--batch_size", type=int, help="--file rows generated together (default 16)")
    sources.add_file_options(parser, "--file")
    add_prompt_args(parser)
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    file_only = {"--output": args.output, "--batch_size": args.batch_size, "--format": args.format,
                 "--columns": args.columns, "--roles": args.roles}
    given = [flag for flag, value in file_only.items() if value is not None]
    if args.prompt is not None and given:
        raise RecipeError(f"{given[0]} goes with --file; --prompt prints its one response")
    if args.file and args.input:
        raise RecipeError("--input goes with --prompt; with --file each row carries its own")
    tools, kwargs = prompt_options(args)
    model, tokenizer = load_trained(args.model)
    if args.prompt is not None:
        prompt = prompt_text(tokenizer, alpaca_messages(args.prompt, args.input, args.system), tools, kwargs)
        response = generate(model, tokenizer, [prompt], **sampling_from(args))[0]
        text = call_lines(tool_calls.parse(response, tokenizer, prompt=prompt, tools=tools)) if tools else response
        print(text)
        if not text:
            print(f"note: {EMPTY}", file=sys.stderr)
        return
    n = generate_file(model, tokenizer, args.file, args.output, system=args.system, batch_size=args.batch_size or 16,
                      read=dict(format=args.format, columns=args.columns, roles=args.roles), tools=tools,
                      template_kwargs=kwargs, **sampling_from(args))
    if args.output:
        print(f"wrote {n} responses to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
