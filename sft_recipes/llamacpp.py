"""Proof that an exported GGUF serves what was trained (`export --verify`), in two independent engines.

transformers' own GGUF loader reads the file back: its logits against the trained model's on a few prompts
(within a tolerance per weight type) and the tokenizer it rebuilds from the file against ours. llama.cpp
(llama-cpp-python) loads the file; llama-cpp-python's Jinja chat formatter, built from the file's metadata as
`Llama` builds it, renders each prompt conversation, and llama.cpp's tokens for it must equal the tokens we
train and generate with (`generate.prompt_text` + the tokenizer); then llama.cpp continues each prompt greedily
(argmax of its logits, ending where llama.cpp ends generation) and the tokens are compared with transformers'
greedy continuation on the file's own weights and on the trained model; both should end at the trained end of
turn. The prompts are the run's eval rows as `evaluate` picks them, else a few built-in ones."""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import generate as gen
from . import models
from .errors import RecipeError
from .export import FILE_TYPES
from .messages import chat_messages

# max |logit difference| allowed between the file read back by transformers and the trained model, as a fraction
# of the largest |logit| (f16 keeps 11 bits of each weight, bf16 8, q8_0 8 per block of 32)
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2}
BUILTIN = ["What is the capital of France?", "Reverse the word 'banana'.", "Sort these numbers: 5, 2, 9, 1.",
           "Write one sentence about the sea.", "What is 12 + 7?", "Name three colours."]
INSTALL = ("llama-cpp-python is not installed: `pip install 'sft_recipes[export]'` compiles llama.cpp (about 14 "
           "minutes on 2 cores); a wheel built once (`pip wheel llama-cpp-python -w DIR`) installs in seconds")


def verify(run_dir, gguf_path, *, prompts: int = 16, max_new_tokens: int = 64, free_prompts: int = 4) -> dict:
    """The figures of the proof. `passed` is False when the file reads back outside the tolerance or with other
    token ids, llama.cpp is missing, its prompt tokens differ from ours, the end of turn does not end its
    generation, or (f32) a greedy continuation differs from transformers' on the file's weights."""
    start = time.perf_counter()
    gguf_path = Path(gguf_path)
    model, tokenizer = models.load_trained(str(run_dir), dtype="float32")
    convs, source = eval_prompts(str(run_dir), tokenizer, prompts)
    ids = [tokenizer(gen.prompt_text(tokenizer, m, t, k), add_special_tokens=False)["input_ids"] for m, t, k in convs]
    file_model, round_trip = read_back(gguf_path, model.eval(), tokenizer, ids, free_prompts)
    report = {"file": str(gguf_path), "outtype": round_trip["outtype"], "prompts": len(ids), "source": source,
              "max_new_tokens": max_new_tokens, "end_of_turn": _end_of_turn(tokenizer), "round_trip": round_trip}
    report.update(_llama_figures(gguf_path, convs, ids, model, file_model, tokenizer, max_new_tokens, free_prompts))
    report["passed"] = _passed(report)
    report["seconds"] = time.perf_counter() - start
    return report


def _llama_figures(path, convs, ids, model, file_model, tokenizer, max_new_tokens, free_prompts) -> dict:
    """llama.cpp against transformers, on the file's weights and on the trained model's."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"llama_cpp": None}
    eot = _end_of_turn(tokenizer)[1]
    stops = set(models.stop_ids(model, tokenizer)) | {eot} - {None}  # the stops we generate with, and the file's
    on_file = [greedy_hf(file_model, p, stops, max_new_tokens) for p in ids]
    on_trained = [greedy_hf(model, p, stops, max_new_tokens) for p in ids]
    # past the end of turn too: an undertrained model that answers with its end of turn at once proves little
    free = [greedy_hf(file_model, p, (), max_new_tokens) for p in ids[:free_prompts]]
    reference = [_logits(file_model, p)[-1] for p in ids]
    llama = llama_cpp_run(path, convs, ids, max_new_tokens, free_prompts, eot)
    return {
        "llama_cpp": llama["version"],
        "prompt_mismatches": sum(a != b for a, b in zip(llama["prompts"], ids)),
        "greedy_equal_file": sum(a == b for a, b in zip(llama["greedy"], on_file)),
        "greedy_equal_trained": sum(a == b for a, b in zip(llama["greedy"], on_trained)),
        "divergences": [(i, _first_difference(a, b))
                        for i, (a, b) in enumerate(zip(llama["greedy"], on_file)) if a != b],
        "free_prompts": len(free), "free_equal": sum(a == b for a, b in zip(llama["free"], free)),
        "llama_logit_diff": max(float(np.abs(a - b).max()) for a, b in zip(llama["logits"], reference)),
        "eot_is_eog": llama["eot_is_eog"],
        "llama_stops": sum(bool(g) and g[-1] == eot for g in llama["greedy"]),
        "transformers_stops": sum(bool(g) and g[-1] == eot for g in on_file),
        "greedy": {"llama_cpp": llama["greedy"], "transformers_file": on_file, "transformers_trained": on_trained,
                   "llama_cpp_free": llama["free"], "transformers_free": free},
    }


def _passed(report: dict) -> bool:
    rt = report["round_trip"]
    if rt["max_abs_diff"] > rt["tolerance"] or rt["token_mismatches"] or report["llama_cpp"] is None:
        return False
    exact = report["outtype"] != "f32" or (report["greedy_equal_file"] == report["prompts"]
                                          and report["free_equal"] == report["free_prompts"])
    return report["prompt_mismatches"] == 0 and report["eot_is_eog"] and exact


def summary(report: dict) -> str:
    """The figures as printed by `export --verify`."""
    n, rt = report["prompts"], report["round_trip"]
    lines = [f"verify {report['file']} ({report['outtype']}) on {n} prompts: {report['source']}",
             f"  transformers' GGUF loader: logits max |diff| {rt['max_abs_diff']:.2e} over {rt['prompts']} prompts "
             f"(tolerance {rt['tolerance']:.2e} = {TOLERANCE.get(report['outtype'], 1):g} x max |logit| "
             f"{rt['logit_scale']:.1f}); tokenizer ids differ on {rt['token_mismatches']}/{n} prompts"]
    if report["llama_cpp"] is None:
        return "\n".join(lines + [f"  llama.cpp: not run ({INSTALL})", "  FAILED"])
    pct = lambda k: f"{report[k]}/{n} ({100 * report[k] / n:.1f}%)"  # noqa: E731
    token, eot = report["end_of_turn"]
    divergence = ", ".join(f"prompt {i} at token {at}" for i, at in report["divergences"][:3])
    return "\n".join(lines + [
        f"  llama.cpp {report['llama_cpp']}: the prompt it builds from the embedded template differs from "
        f"training's on {report['prompt_mismatches']}/{n} prompts",
        f"  greedy, up to {report['max_new_tokens']} tokens: llama.cpp = transformers on the file's weights "
        f"{pct('greedy_equal_file')}, on the trained weights {pct('greedy_equal_trained')}"
        + (f"; first differences: {divergence}" if divergence else ""),
        f"  greedy past the end of turn ({report['max_new_tokens']} tokens, {report['free_prompts']} prompts): "
        f"llama.cpp = transformers on the file's weights {report['free_equal']}/{report['free_prompts']}",
        f"  llama.cpp's logits at the end of each prompt vs transformers' on the file's weights: max |diff| "
        f"{report['llama_logit_diff']:.2e}",
        f"  end of turn {token!r} (id {eot}) ends llama.cpp's generation: {'yes' if report['eot_is_eog'] else 'NO'}; "
        f"continuations ending there: llama.cpp {report['llama_stops']}/{n}, "
        f"transformers {report['transformers_stops']}/{n}",
        f"  {'passed' if report['passed'] else 'FAILED'} ({report['seconds']:.1f} s)",
    ])


def eval_prompts(run_dir: str, tokenizer, n: int):
    """[(prompt messages, tools, chat_template_kwargs)] of the first `n` eval rows `evaluate` would score, and
    where they came from; the built-in prompts for a folder without a recipe or without eval rows."""
    from . import evaluate
    from .config import parse_recipe

    recipe_path = models.recipe_file(run_dir)
    kwargs = models.trained_kwargs(run_dir)
    builtin = [([{"role": "user", "content": p}], None, kwargs) for p in BUILTIN][:n]
    if recipe_path is None:
        return builtin, "built-in prompts (no recipe.yaml)"
    try:
        recipe = parse_recipe([str(recipe_path)])
        masked = evaluate.masked_rows(evaluate.eval_conversations(recipe), tokenizer, recipe)
    except RecipeError as e:  # the data moved, or the recipe has no eval rows: the file is still worth proving
        return builtin, f"built-in prompts ({e})"
    rows = masked.select(evaluate.scored_rows(masked)[:n])  # as `evaluate` picks them
    convs = [(evaluate.split_reference(m)[0], t, gen.row_kwargs(recipe.data.chat_template_kwargs, k))
             for m, t, k in zip(rows["messages"], rows["tools"], rows["chat_template_kwargs"])]
    if not convs:
        return builtin, f"built-in prompts ({recipe_path}: no eval rows)"
    return convs, f"eval rows of {recipe_path}"


def _file_facts(path: Path) -> dict:
    """What the checks need from the file's header, read once (gguf's reader parses every token in Python: five
    seconds for a 49k vocabulary)."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    kind = LlamaFileType(int(reader.fields["general.file_type"].contents())).name
    context = reader.fields.get("gpt2.context_length")
    return {"outtype": {v: k for k, v in FILE_TYPES.items()}.get(kind, kind),
            "gpt2_context": int(context.contents()) if context is not None else None,
            "rope_freqs": any(t.name == "rope_freqs.weight" for t in reader.tensors)}


# ---------------------------------------------------------------- transformers
def read_back(path: Path, model, tokenizer, ids, n: int):
    """(the file as transformers loads it, {max_abs_diff, tolerance, prompts, token_mismatches, seconds})."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder, name = str(path.parent), path.name
    facts = _file_facts(path)
    file_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                      **_config_fixes(facts, model.config)).eval()
    file_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    pairs = [(_logits(model, p), _logits(file_model, p)) for p in ids[:n]]
    diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    scale = max(float(np.abs(a).max()) for a, _ in pairs)
    texts = [tokenizer.decode(p) for p in ids]
    mismatches = sum(file_tokenizer(t, add_special_tokens=False)["input_ids"] != p for t, p in zip(texts, ids))
    return file_model, {"outtype": facts["outtype"], "max_abs_diff": diff, "logit_scale": scale,
                        "tolerance": TOLERANCE.get(facts["outtype"], 1.0) * max(1.0, scale),
                        "prompts": len(pairs), "token_mismatches": mismatches, "seconds": time.perf_counter() - start}


def _config_fixes(facts: dict, config) -> dict:
    """What transformers' GGUF loader does not read from our files: gpt2.context_length it reads as `n_ctx`,
    which GPT2Config ignores (`n_positions` stays 1024 and the position embeddings do not fit), so it is passed
    under its own name; Llama 3 rope scaling (the file's `rope_freqs`) it drops, so the run's is passed."""
    fixes = {"n_positions": facts["gpt2_context"]} if facts["gpt2_context"] else {}
    if facts["rope_freqs"]:
        fixes["rope_parameters"] = dict(config.rope_parameters)
    return fixes


@torch.inference_mode()
def _logits(model, ids) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


@torch.inference_mode()
def greedy_hf(model, ids, stops, max_new_tokens: int) -> list[int]:
    """transformers' argmax continuation of `ids`, ending at (and keeping) a token of `stops` (none: all
    `max_new_tokens`). A plain loop over the KV cache: no generation config of the model's can change it."""
    from transformers import DynamicCache

    # the cache argument was renamed in transformers 5.24 (`past_key_values` before); the cache fills in place
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out, cache, x = [], DynamicCache(config=model.config), torch.tensor([ids])
    for _ in range(max_new_tokens):
        token = int(model(input_ids=x, use_cache=True, **{name: cache}).logits[0, -1].argmax())
        out.append(token)
        if token in stops:
            break
        x = torch.tensor([[token]])
    return out


# ---------------------------------------------------------------- llama.cpp
def llama_cpp_run(path: Path, convs, ids, max_new_tokens: int, free_prompts: int, eot: int | None) -> dict:
    """llama.cpp's prompt tokens (from the embedded template), greedy continuations of our prompt tokens, its
    logits at the end of each prompt, and whether the end of turn `eot` ends its generation."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    n_ctx = max(map(len, ids)) + max_new_tokens + 8
    # an f32 KV cache (llama.cpp's default is f16): the comparison measures the file, not the cache
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        formatter = _formatter(llm, Jinja2ChatFormatter)
        prompts = [_llama_prompt(llm, formatter, m, t) for m, t, _ in convs]
        runs = [greedy_llama(llm, p, max_new_tokens) for p in ids]
        free = [greedy_llama(llm, p, max_new_tokens, stop=False)[0] for p in ids[:free_prompts]]
        eot_is_eog = eot is not None and bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, eot))
    finally:
        llm.close()
    return {"version": llama_cpp.__version__, "prompts": prompts, "greedy": [g for g, _ in runs],
            "logits": [x for _, x in runs], "free": free, "eot_is_eog": eot_is_eog}


def _formatter(llm, Jinja2ChatFormatter):
    """The formatter `Llama` makes from the file's metadata (`chat_template.default`), built the same way."""
    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        raise RecipeError("llama.cpp found no tokenizer.chat_template in the file")
    text = lambda i: llm._model.token_get_text(i) if i != -1 else ""  # noqa: E731
    return Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()),
                               stop_token_ids=[llm.token_eos()])


def _llama_prompt(llm, formatter, messages, tools) -> list[int]:
    """The tokens llama-cpp-python's chat completion feeds llama.cpp for this conversation."""
    tools = json.loads(tools) if isinstance(tools, str) else tools
    result = formatter(messages=chat_messages(messages), tools=tools)
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def greedy_llama(llm, ids, max_new_tokens: int, stop: bool = True) -> tuple[list[int], np.ndarray]:
    """(argmax continuation in llama.cpp, ending at and keeping the first token llama.cpp ends generation on
    (`stop=False`: all `max_new_tokens`); the logits at the end of the prompt)."""
    import llama_cpp

    llm.reset()
    llm.eval(ids)
    out, first = [], None
    for _ in range(max_new_tokens):
        # the last position's logits straight from llama.cpp (`logits_all` copies every row: 40x slower)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        first = logits.copy() if first is None else first
        out.append(int(np.argmax(logits)))
        if stop and llama_cpp.llama_vocab_is_eog(llm._model.vocab, out[-1]):
            break
        llm.eval([out[-1]])
    return out, first


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _end_of_turn(tokenizer) -> tuple:
    """(token, id) of the trained end of turn."""
    from .gguf_vocab import _token_id
    from .modelfile import end_of_turn

    token = end_of_turn(tokenizer)
    return token, _token_id(tokenizer, token)
