"""Loading models and tokenizers: a recipe's starting point for training (the tokenizer with its chat template
and added tokens, the model resized to it), and any output folder of ours for generation, chat, evaluation and
merging (a full model, or a LoRA adapter applied to its base exactly as training built it), with the token
ids that end a response. Names that are no HF folder or Hub id (`tiny:gpt2`, a .gguf file) load from the folder
they are built into once (`local_name`)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import yaml
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import get_quantization_config

from . import gguf, hub, templates, tiny
from .config import Recipe
from .errors import RecipeError

PAD_TOKEN = "<|pad|>"


# ---------------------------------------------------------------- a recipe's starting point
def model_path(recipe: Recipe) -> str:
    name = recipe.model.model_name_or_path
    if not name:
        raise RecipeError("the recipe has no `model_name_or_path`")
    return local_name(name, recipe.model.model_revision)


def local_name(name: str, revision: str | None = None) -> str:
    """The name to load: `tiny:gpt2` and .gguf files become the HF folder built from them once, anything else
    stays as it is."""
    if name != tiny.TINY_MODEL_ID and not gguf.is_gguf(name):
        return name
    with PartialState().main_process_first():  # one process builds, the others wait and load
        return str(tiny.tiny_model_path() if name == tiny.TINY_MODEL_ID else gguf.hf_folder(name, revision))


def load_tokenizer(recipe: Recipe):
    """The tokenizer with the recipe's chat template set, its special tokens and a pad token added."""
    m = recipe.model
    tokenizer = hub.from_pretrained(AutoTokenizer, model_path(recipe), revision=m.model_revision,
                                    trust_remote_code=recipe.sft.trust_remote_code)
    source = templates.load_template(recipe.data.chat_template, tokenizer)
    meta = templates.template_meta(source, tokenizer)
    missing = [t for t in meta["special_tokens"] if t not in tokenizer.get_vocab()]
    if missing:  # so each marker is one token: no BPE merge across a turn boundary, and a clean stop
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    tokenizer.template_token_ids = tokenizer.convert_tokens_to_ids(missing)  # new rows to train under LoRA
    if tokenizer.pad_token is None:  # distinct from EOS, so EOS is never mistaken for padding
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.chat_template = source
    tokenizer.end_of_turn = meta["end_of_turn"]
    return tokenizer


def load_model(recipe: Recipe, tokenizer):
    m = recipe.model
    quantization = get_quantization_config(m)
    if quantization is not None:
        import torch
        if not torch.cuda.is_available():
            raise RecipeError("load_in_4bit / load_in_8bit (QLoRA) need a CUDA GPU and bitsandbytes; "
                              "remove them to train on CPU")
    if recipe.sft.trust_remote_code:
        warnings.warn("trust_remote_code is true: the model repository's own Python code will run", stacklevel=2)
    kwargs = dict(revision=m.model_revision, trust_remote_code=recipe.sft.trust_remote_code, dtype=m.dtype or "auto",
                  attn_implementation=m.attn_implementation, quantization_config=quantization,
                  device_map=_quantized_device_map(quantization))
    model = hub.from_pretrained(AutoModelForCausalLM, model_path(recipe), **kwargs, **(recipe.sft.model_init_kwargs or {}))
    if gguf.is_gguf(m.model_name_or_path):  # what a LoRA adapter records as its base: the file, not our cache
        model.name_or_path = gguf.portable_name(m.model_name_or_path)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # tokens the template or pad added
        model.resize_token_embeddings(len(tokenizer))
    _set_stops(model, tokenizer)
    return model


def _quantized_device_map(quantization):
    """A quantized model is placed on this process's GPU, except under ZeRO-3 / FSDP, which place it themselves."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    sharded = is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return None if quantization is None or sharded else {"": PartialState().local_process_index}


# ---------------------------------------------------------------- an output folder of ours
def load_trained(path: str, base: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) from a run's output_dir, a checkpoint-* folder in it, or a merged model. An adapter
    is applied to its base (`base`, else the one it records), resized to the saved tokenizer as training
    resized it, and merged in. The tokenizer must carry its chat template. A .gguf file is a base model as it is."""
    name, path = path, local_name(path) if gguf.is_gguf(path) else path
    adapter = _kind(path) == "adapter"
    tokenizer = hub.from_pretrained(AutoTokenizer, path)
    if not tokenizer.chat_template:
        hint = ("train on it with a `chat_template` first" if gguf.is_gguf(name) else
                "is this a folder written by `python -m sft_recipes.run`?")
        raise RecipeError(f"{name}: the tokenizer has no chat template; {hint}")
    add_response_template(tokenizer)
    if adapter:
        from peft import PeftModel

        model = hub.from_pretrained(AutoModelForCausalLM, base_of(Path(path), base), dtype=dtype)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # as in training, so the shapes match
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = hub.from_pretrained(AutoModelForCausalLM, path, dtype=dtype)
    _set_stops(model, tokenizer)
    return model, tokenizer


def recipe_file(path: str) -> Path | None:
    """The `recipe.yaml` a model folder was trained with: its own (an output_dir, or a merged model, which
    gets a copy), or its run's beside a checkpoint-* folder; None without one."""
    folder = Path(path)
    for recipe in (folder / "recipe.yaml", folder.parent / "recipe.yaml"):
        if recipe.is_file() and (recipe.parent == folder or folder.name.startswith("checkpoint-")):
            return recipe
    return None


def add_response_template(tokenizer):
    """So that `tokenizer.parse_response` reads the model's replies (tool calls, reasoning): a tokenizer saved
    without a response template gets TRL's for its chat template where TRL knows one (trl:qwen3, trl:llama3_1,
    trl:gptoss, ...). Other templates keep none; `tool_calls` reads our shipped ones itself."""
    if getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None):
        return
    from trl.chat_template_utils import add_response_schema

    try:
        add_response_schema(tokenizer)
    except ValueError:  # a template TRL has no parser for
        pass


def trained_kwargs(path: str) -> dict:
    """The `chat_template_kwargs` a model was trained with (its `recipe_file`), so that prompts render as its
    training rows did; {} without a recipe."""
    recipe = recipe_file(path)
    if recipe is None:
        return {}
    try:
        values = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{recipe}: not valid YAML ({e})") from None
    return dict(values.get("chat_template_kwargs") or {}) if isinstance(values, dict) else {}


def _kind(path: str) -> str:
    """'adapter', 'model', or 'hub' (a name that is no local path); a local path that is neither says so."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    if folder.exists():
        raise RecipeError(f"{path}: not a model folder (no config.json or adapter_config.json); give a run's "
                          "output_dir, a checkpoint-* folder in it, or a merged model")
    return "hub"


def base_of(adapter_dir: Path, base: str | None = None) -> str:
    """The base model to load: `base`, else the adapter's own record; `tiny:gpt2` and a .gguf file become their
    local folder."""
    config_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise RecipeError(f"{adapter_dir}: no such adapter folder")
    if not config_file.is_file():
        found = "a full model, not an adapter" if (adapter_dir / "config.json").is_file() else "no adapter_config.json"
        raise RecipeError(f"{adapter_dir}: not a PEFT adapter folder ({found}); give the output_dir "
                          "(or a checkpoint-* folder) of a run with `use_peft: true`")
    try:
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except ValueError as e:
        raise RecipeError(f"{config_file}: not valid JSON ({e})") from None
    name = base or recorded
    if not name:
        raise RecipeError(f"{config_file} names no base model; pass --base ID_OR_PATH")
    if name == tiny.TINY_MODEL_ID or gguf.is_gguf(name):
        return local_name(name)
    if not base and Path(name).is_absolute() and not Path(name).exists():
        raise RecipeError(f"the base model folder {name} (from {config_file}) no longer exists; "
                          "pass --base ID_OR_PATH (`tiny:gpt2` for the embedded tiny model)")
    return name


# ---------------------------------------------------------------- stopping
def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a response: the generation config's EOS list, plus the template's declared
    end-of-turn token, the special tokens it prints after an answer, and the tokenizer's EOS (for models
    saved without that config, or trained on a template the config does not know)."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    source = tokenizer.chat_template or ""
    end = templates.template_meta(source, tokenizer)["end_of_turn"]
    after = templates.turn_stops(source, tokenizer) if source else []
    for token in (end, *after, tokenizer.eos_token):
        if token and token in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(i for i in ids if i is not None)


def _set_stops(model, tokenizer):
    """Saved with the model, so `generate` in any library stops at the end of the turn and pads with our pad."""
    model.generation_config.eos_token_id = stop_ids(model, tokenizer)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
