"""Test-only: `python -m sft_recipes.run` under `accelerate launch` with an FSDP config, on CPU processes (gloo).

accelerate 1.15 turns an FSDP launch into FSDP only on GPUs (`AcceleratorState` sets `DistributedType.FSDP`
for MULTI_GPU and its kin, never for MULTI_CPU). This script lifts that one check, so accelerate's own FSDP2
code (fully_shard of each decoder block and the root, sharded checkpoints, resume) runs our trainer unchanged.
Environment:
  FSDP_CPU_REPORT=DIR    each rank writes DIR/rank<N>.json: how its parameters are held after training
  FSDP_CPU_DIE_AT=STEP   each rank dies (SIGKILL) right after checkpoint-STEP is saved, as a crashed run
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from sft_recipes import run, trainer

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs


class _Probe(TrainerCallback):
    """Dies after checkpoint `die_at` is saved (as a crashed run); writes the parameters' layout at the end."""

    def __init__(self, die_at: int | None, report: Path | None):
        self.die_at, self.report = die_at, report

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.die_at:
            dist.barrier()  # every rank's shards and RNG state are on disk
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.report:  # after the last optimizer step: FSDP2 has resharded every parameter
            _report(self.report, model)


def _report(folder: Path, model):
    from torch.distributed.tensor import DTensor

    params = {name: {"type": type(p).__name__, "placements": [str(x) for x in getattr(p, "placements", [])],
                     "local": list(p.to_local().shape if isinstance(p, DTensor) else p.shape), "global": list(p.shape),
                     "trainable": p.requires_grad} for name, p in model.named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{dist.get_rank()}.json").write_text(json.dumps(params))


def _build_trainer(recipe, _build=trainer.build_trainer):
    t = _build(recipe)
    die_at, report = os.environ.get("FSDP_CPU_DIE_AT"), os.environ.get("FSDP_CPU_REPORT")
    t.add_callback(_Probe(int(die_at) if die_at else None, Path(report) if report else None))
    return t


if __name__ == "__main__":
    AcceleratorState.__init__ = _fsdp_on_cpu
    trainer.build_trainer = _build_trainer
    run.main(sys.argv[1:])
