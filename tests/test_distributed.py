"""Launches across processes, on CPU: a run says when it is not what the accelerate config asked (FSDP on CPU is
silently DDP), and the shipped FSDP2 config, with accelerate's GPU-only check lifted (tests/fsdp_cpu.py),
really shards our trainer over 2 gloo processes: parameters are DTensors holding half the rows, checkpoints are
sharded, a crashed run resumes to the same losses, and the final model is an ordinary folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

from sft_recipes import distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny_alpaca.yaml"
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}


def fake(kind, n, version=2):
    return SimpleNamespace(distributed_type=kind, num_processes=n,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))


# ---------------------------------------------------------------- what was asked vs what runs
def test_a_config_asking_for_sharding_that_did_not_happen_is_named_in_one_line():
    ddp = distributed.mismatch(fake(DistributedType.MULTI_CPU, 2), FSDP_ENV)
    assert ddp.startswith("the accelerate config asks for FSDP2, but this run is DDP on CPU (gloo), 2 processes")
    assert "nothing is sharded" in ddp and "\n" not in ddp and "each trains alone" not in ddp
    alone = distributed.mismatch(fake(DistributedType.NO, 1), FSDP_ENV)  # use_cpu false on a CPU machine
    assert "this run is one process" in alone and "2 processes were started and each trains alone" in alone
    zero3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "2"}
    assert "asks for DeepSpeed ZeRO-3" in distributed.mismatch(fake(DistributedType.MULTI_CPU, 2), zero3)


def test_a_launch_that_is_what_was_asked_says_nothing():
    assert distributed.mismatch(fake(DistributedType.FSDP, 2), FSDP_ENV) is None
    assert distributed.mismatch(fake(DistributedType.DEEPSPEED, 2), {"ACCELERATE_USE_DEEPSPEED": "true"}) is None
    assert distributed.mismatch(fake(DistributedType.MULTI_CPU, 2), {"WORLD_SIZE": "2"}) is None  # DDP asked
    assert distributed.mismatch(fake(DistributedType.NO, 1), {}) is None
    assert distributed.launched(fake(DistributedType.FSDP, 2)) == "FSDP2, 2 processes"
    assert distributed.launched(fake(DistributedType.NO, 1)) == "one process"


# ---------------------------------------------------------------- 2 CPU processes
def fsdp_config(tmp_path) -> Path:
    """The shipped FSDP2 config, on 2 CPU processes in float32, checkpoints sharded (one file per rank)."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    config.pop("gpu_ids")
    config.update(num_processes=2, mixed_precision="no", main_process_port=0)
    config["fsdp_config"]["fsdp_state_dict_type"] = "SHARDED_STATE_DICT"
    path = tmp_path / "fsdp2_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, script: list[str], out: Path, *args, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *script, TINY,
           "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "no",
           "--logging_steps", "1", "--disable_tqdm", "true", "--output_dir", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def gathered(checkpoint: Path, tmp_path) -> dict:
    """A sharded checkpoint's model, joined in this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", tmp_path / "joined.pt")
    return torch.load(tmp_path / "joined.pt")["model"]


def layout(report: Path) -> list[dict]:
    return [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp_config_on_cpu_is_said_to_be_ddp(tmp_path):
    proc = launch(fsdp_config(tmp_path), ["-m", "sft_recipes.run"], tmp_path / "ddp", "--max_steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("asks for FSDP2, but this run is DDP on CPU (gloo), 2 processes") == 1  # rank 0 only
    assert "DDP on CPU (gloo), 2 processes" in next(l for l in proc.stderr.splitlines() if l.startswith("launch"))


def test_fsdp2_shards_full_fine_tuning_and_a_crashed_run_resumes_to_the_same_losses(tmp_path):
    from transformers import AutoModelForCausalLM

    config, script = fsdp_config(tmp_path), [str(ROOT / "tests" / "fsdp_cpu.py")]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    proc = launch(config, script, straight, FSDP_CPU_REPORT=str(tmp_path / "layout"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launch      FSDP2, 2 processes" in proc.stderr and "asks for" not in proc.stderr

    ranks = layout(tmp_path / "layout")
    for name, p in ranks[0].items():  # every parameter is a DTensor split by rows between the two ranks
        assert p["type"] == "DTensor" and p["placements"] == ["S(0)"], name
        assert ranks[0][name]["local"][0] + ranks[1][name]["local"][0] == p["global"][0], name
    assert ranks[0]["transformer.wte.weight"]["local"] == [721, 128]  # 1442 rows: half each
    for step in (3, 6):  # sharded checkpoints: one file per rank, no gathered model
        shards = sorted(f.name for f in (straight / f"checkpoint-{step}" / "pytorch_model_fsdp_0").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"]
        assert not (straight / f"checkpoint-{step}" / "model.safetensors").exists()

    # The final model: an ordinary folder holding the trained weights of the last checkpoint.
    model = AutoModelForCausalLM.from_pretrained(straight)
    want = gathered(straight / "checkpoint-6", tmp_path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)

    proc = launch(config, script, crashed, FSDP_CPU_DIE_AT="3")
    assert proc.returncode != 0 and not (crashed / "config.json").exists()  # it died after checkpoint-3
    assert sorted(losses(crashed / "checkpoint-3")) == [1, 2, 3]
    proc = launch(config, script, crashed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {crashed / 'checkpoint-3'}" in proc.stderr
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-6) and sorted(losses(straight)) == [1, 2, 3, 4, 5, 6]


def test_fsdp2_shards_lora_and_saves_an_ordinary_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_recipes import tiny

    out = tmp_path / "lora"
    proc = launch(fsdp_config(tmp_path), [str(ROOT / "tests" / "fsdp_cpu.py")], out, "--use_peft", "true",
                  "--lora_target_modules", "all-linear", "--max_steps", "4", "--save_steps", "2",
                  FSDP_CPU_REPORT=str(tmp_path / "layout"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = layout(tmp_path / "layout")
    lora = {n: p for n, p in ranks[0].items() if "lora_" in n}
    assert lora and all(p["trainable"] and p["type"] == "DTensor" and p["placements"] == ["S(0)"] for p in lora.values())
    assert all(not p["trainable"] and p["type"] == "DTensor" for n, p in ranks[0].items() if "lora_" not in n)
    assert sorted(f.name for f in (out / "checkpoint-4" / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]

    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.tiny_model_path()), out)
    want = gathered(out / "checkpoint-4", tmp_path)  # the adapter's weights only, named without PEFT's ".default"
    trained = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(trained) == sorted(want) and len(want) == len(lora)
    assert any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)  # B starts at 0: it trained
    for name, value in trained.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
