"""Export a trained model to one GGUF file that llama.cpp and Ollama serve, with the trained chat template:

    python -m sft_recipes.export RUN_DIR --gguf [--outtype f32|f16|bf16|q8_0] [--output FILE.gguf]
                                 [--verify [--prompts N] [--max_new_tokens N]]

RUN_DIR is any output folder of a run: a full model, a LoRA adapter (merged into its base on the way, as
`merge` does, without a separate step), a checkpoint-* folder or a merged model. The file carries the weights
(1-D tensors stay float32), the vocabulary with its merges and the pre-tokenizer llama.cpp needs for it, the
BOS/EOS/pad/unk and end-of-turn ids, added special tokens as control tokens, `add_bos_token` as the tokenizer
does, and the saved tokenizer's chat template as it is. An Ollama `Modelfile` is written beside it
(`ollama create NAME -f Modelfile`). Architectures: llama (SmolLM2, Llama 3.x), mistral, qwen2, qwen3, gpt2.

`--verify` proves the file (see `sft_recipes/llamacpp.py`): transformers' own GGUF loader reads it back
(logits against the trained model, tokenizer ids), and llama.cpp (llama-cpp-python, the `export` extra) builds
the prompt from the embedded template and continues it greedily, token for token against transformers, on
the run's eval prompts (as `evaluate` picks them; built-in prompts for a folder without a recipe).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from . import models
from .errors import RecipeError, cli
from .gguf import is_gguf
from .keys import docs

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# transformers model_type -> llama.cpp architecture (llama.cpp runs Mistral as llama)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
# --outtype -> gguf.LlamaFileType, the file's general.file_type
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def export(run_dir, output=None, outtype: str = "f16") -> Path:
    """Write `output` (default RUN_DIR/gguf/NAME-OUTTYPE.gguf) and its Modelfile; returns the .gguf path."""
    from . import modelfile

    run_dir = str(run_dir)
    if outtype not in OUTTYPES:
        raise RecipeError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    arch = architecture(source_config(run_dir), run_dir)
    path = Path(output) if output else _default_output(run_dir, outtype)
    if path.suffix.lower() != ".gguf":
        raise RecipeError(f"--output {path}: give a file name ending in .gguf")
    model, tokenizer = models.load_trained(run_dir, dtype="float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(path, model, tokenizer, arch, outtype, name=_run_name(run_dir))
    modelfile.write(path, tokenizer, models.trained_kwargs(run_dir))
    return path


def source_config(run_dir: str):
    """The config of the model RUN_DIR holds (an adapter's base), read before any weights are loaded."""
    from transformers import AutoConfig

    folder = models.local_name(run_dir) if is_gguf(run_dir) else run_dir
    kind = models._kind(folder)  # refuses a folder that holds no model
    if kind == "hub":
        raise RecipeError(f"{run_dir}: no such folder; give a run's output_dir, a checkpoint-* folder in it, "
                          "or a merged model")
    return AutoConfig.from_pretrained(models.base_of(Path(folder)) if kind == "adapter" else folder)


def architecture(config, run_dir: str) -> str:
    """The llama.cpp architecture for the model, or one line naming what was found and what is supported."""
    kind = config.model_type
    if kind not in ARCHS:
        found = f"{kind} ({', '.join(config.architectures or [])})" if config.architectures else kind
        raise RecipeError(f"{run_dir}: architecture {found} cannot be exported to GGUF; supported: "
                          f"{', '.join(sorted(ARCHS))}")
    act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if act not in (("gelu_new", "gelu_pytorch_tanh") if kind == "gpt2" else ("silu",)):
        raise RecipeError(f"{run_dir}: {kind} with activation {act!r} cannot be exported: llama.cpp's {ARCHS[kind]} "
                          "runs " + ("tanh GELU" if kind == "gpt2" else "SiLU"))
    return ARCHS[kind]


def _default_output(run_dir: str, outtype: str) -> Path:
    if is_gguf(run_dir):
        raise RecipeError(f"{run_dir} is a GGUF file: give --output FILE.gguf for the export")
    return Path(run_dir) / "gguf" / f"{_run_name(run_dir)}-{outtype}.gguf"


def _run_name(run_dir: str) -> str:
    folder = Path(run_dir).resolve()
    return f"{folder.parent.name}-{folder.name}" if folder.name.startswith("checkpoint-") else folder.stem


# ---------------------------------------------------------------- the file
def write_gguf(path: Path, model, tokenizer, arch: str, outtype: str, name: str) -> None:
    import gguf

    from . import gguf_vocab

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[outtype]])
    n_vocab = model.get_input_embeddings().num_embeddings
    _hparams(writer, model.config, arch, n_vocab)
    gguf_vocab.add_vocab(writer, tokenizer, n_vocab)
    writer.add_chat_template(tokenizer.chat_template)  # as trained, byte for byte
    for tensor_name, data in gguf_tensors(model, arch):
        encoded, qtype = encode(tensor_name, data, outtype)
        writer.add_tensor(tensor_name, encoded, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hparams(writer, config, arch: str, n_vocab: int) -> None:
    c = config
    writer.add_vocab_size(n_vocab)
    if arch == "gpt2":
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        return
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope(c)["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if _rope(c).get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(_rope(c)["factor"])


def _rope(config) -> dict:
    """transformers 5 keeps rope_theta and the scaling in `rope_parameters`; older configs at the top level."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


# ---------------------------------------------------------------- tensors
def gguf_tensors(model, arch: str):
    """(llama.cpp name, float32 array in llama.cpp's layout) for every weight of `model`."""
    import gguf
    from transformers.pytorch_utils import Conv1D

    config = model.config
    n_layers = config.n_layer if arch == "gpt2" else config.num_hidden_layers
    names = gguf.get_tensor_name_map(_model_arch(arch), n_layers)
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    rope = _rope(config)
    if arch != "gpt2" and rope["rope_type"] not in ("default", "linear", "llama3"):
        raise RecipeError(f"rope scaling {rope['rope_type']!r} cannot be exported yet (default, linear and llama3 can)")
    if rope["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_freq_factors(config)
    for hf_name, param in model.named_parameters():  # tied weights appear once: no output.weight, as llama.cpp reads it
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RecipeError(f"tensor {hf_name} has no llama.cpp name for architecture {arch}: this variant of "
                              f"{config.model_type} cannot be exported")
        data = param.detach().float().cpu().numpy()
        if hf_name in conv1d:  # GPT-2's Conv1D stores (in, out); llama.cpp reads (out, in) like nn.Linear
            data = data.T
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if name.split(".")[-2] == "attn_q" else config.num_key_value_heads
            data = permute_rope(data, heads)
        yield name, np.ascontiguousarray(data)


def permute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's llama rotates q/k in adjacent pairs where HF rotates the two halves of each head: each head's
    rows reordered from (half, pair index) to (pair index, half). Biases (1-D) the same way."""
    shape = weight.shape
    half = shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _llama3_freq_factors(config) -> np.ndarray:
    """Llama 3.x rope scaling as llama.cpp applies it: a divisor per rotary frequency (`rope_freqs`), the base
    frequencies over the scaled ones transformers computes."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = 1.0 / (_rope(config)["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return (base / scaled.double().numpy()).astype(np.float32)


def _model_arch(arch: str):
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)


def encode(name: str, data: np.ndarray, outtype: str):
    """(array, raw dtype) as the file stores it: 1-D tensors (norms, biases) and rope factors stay float32;
    q8_0 needs rows in blocks of 32 (others fall back to f16)."""
    import gguf
    from gguf.quants import quantize

    if data.ndim == 1 or outtype == "f32" or name == "rope_freqs.weight":
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if outtype == "bf16":
        return quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return data.astype(np.float16), None


# ---------------------------------------------------------------- command
@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.export", epilog=docs("export"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (full model or LoRA adapter), a "
                                                           "checkpoint-* folder, or a merged model")
    parser.add_argument("--gguf", action="store_true", required=True, help="write a GGUF file (the one format)")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES, help="weights in the file (default: f16)")
    parser.add_argument("--output", help="the .gguf file (default: RUN_DIR/gguf/NAME-OUTTYPE.gguf)")
    parser.add_argument("--verify", action="store_true", help="prove the file in transformers and llama.cpp")
    parser.add_argument("--prompts", type=int, default=16, help="eval prompts to verify on (default 16)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="greedy tokens per prompt in --verify")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise RecipeError("--prompts and --max_new_tokens must be at least 1")
    start = time.perf_counter()
    path = export(args.run_dir, args.output, args.outtype)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {args.outtype}, {time.perf_counter() - start:.1f} s)")
    print(f"wrote {path.parent / 'Modelfile'}: ollama create {_ollama_name(path)} -f {path.parent / 'Modelfile'}")
    if args.verify:
        from . import llamacpp

        report = llamacpp.verify(args.run_dir, path, prompts=args.prompts, max_new_tokens=args.max_new_tokens)
        print(llamacpp.summary(report))
        if report["llama_cpp"] is None:
            raise RecipeError(f"--verify: {llamacpp.INSTALL}")
        if not report["passed"]:
            raise SystemExit(1)


def _ollama_name(path: Path) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in path.stem.lower())


if __name__ == "__main__":
    main()
