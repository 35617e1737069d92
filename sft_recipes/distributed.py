"""Runs across processes: say when the launch is not what the accelerate config asked, and save a sharded
(FSDP) model as an ordinary folder.

`accelerate launch` passes the config's choice to each process in the environment (`ACCELERATE_USE_FSDP`,
`ACCELERATE_USE_DEEPSPEED`), but accelerate 1.15 applies FSDP and DeepSpeed only on GPUs: on a CPU machine the
same launch trains as DDP (`MULTI_CPU`) or as independent single processes (`NO`), whole model on each, and says
nothing. We compare the two before training.
"""
from __future__ import annotations

import os

from accelerate.utils import DistributedType

_NAMES = {DistributedType.NO: "one process", DistributedType.MULTI_CPU: "DDP on CPU (gloo)",
          DistributedType.MULTI_GPU: "DDP on GPUs", DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}


def asked(env=os.environ) -> str | None:
    """The sharding the accelerate config asked for ("FSDP2", "DeepSpeed ZeRO-3"), or None."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return f"DeepSpeed ZeRO-{stage}" if stage else "DeepSpeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"FSDP{env.get('FSDP_VERSION', '1')}"
    return None


def launched(accelerator) -> str:
    """What this run really is: "FSDP2, 2 processes", "DDP on CPU (gloo), 2 processes", "one process"."""
    kind = accelerator.distributed_type
    name = _NAMES.get(kind, kind.value)
    if kind == DistributedType.FSDP:
        name += str(accelerator.state.fsdp_plugin.fsdp_version)
    n = accelerator.num_processes
    return name if n == 1 and kind == DistributedType.NO else f"{name}, {n} process{'es' * (n > 1)}"


def mismatch(accelerator, env=os.environ) -> str | None:
    """One line when the config asked for FSDP/DeepSpeed and this run is something else, else None."""
    want, kind = asked(env), accelerator.distributed_type
    if want is None or kind == (DistributedType.DEEPSPEED if want.startswith("DeepSpeed") else DistributedType.FSDP):
        return None
    started = int(env.get("WORLD_SIZE", "1"))
    alone = (f"; {started} processes were started and each trains alone, writing the same output_dir"
             if started > accelerator.num_processes else "")
    return (f"the accelerate config asks for {want}, but this run is {launched(accelerator)}: every process holds "
            f"the whole model, nothing is sharded{alone} (accelerate applies FSDP and DeepSpeed only on GPUs)")


def save_model(trainer):
    """`trainer.save_model()`, except under FSDP with a sharded state dict, where transformers 5.23 writes nothing
    at all: the shards are gathered on the main process into an ordinary safetensors folder (the checkpoints
    stay sharded). Every process must call it (the gather is collective)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or "SHARDED" not in str(plugin.state_dict_type):
        return trainer.save_model()
    trainer._save(trainer.args.output_dir, state_dict=trainer.accelerator.get_state_dict(trainer.model))
