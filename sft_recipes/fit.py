"""Training defaults that fit the model and the device, decided once the model is loaded, for the keys a recipe
leaves unset (a recipe that sets one keeps its value).

- `activation_checkpointing`: recomputing each layer's forward costs about a third more compute, so it is on only
  when a memory estimate says training would not fit the GPU without it (TRL's default is always on).
- `use_liger_kernel`: Liger's Triton layer kernels (RMSNorm, RoPE, SwiGLU), on CUDA, when `liger_kernel` is
  installed and supports the architecture. TRL 1.16 applies only these (its fused LM head already computes the
  loss in chunks, without the full logits).
- Fused AdamW needs nothing: transformers' default `optim` is `adamw_torch_fused` with torch >= 2.8.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

GiB = 2**30
HEADROOM = 0.85  # of the device's memory: CUDA context, allocator fragmentation, the loss chunks, eval batches
ADAM_STATE = 8  # bytes per trainable parameter: two float32 moments
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")  # the second a deprecated alias


@dataclass
class Shape:
    """What the memory estimate needs to know of a model and its training."""
    weight_bytes: int  # as stored: 4 bytes a parameter in float32, 2 in bfloat16, about 0.5 in 4 bits
    trainable: int  # parameters
    layers: int
    hidden: int
    intermediate: int
    tokens: int  # per device and micro-batch
    activation_bytes: int  # 2 under bf16/fp16 autocast, else 4
    shards: int = 1  # processes that FSDP splits weights, gradients and optimizer state over


LORA_SHARE = 0.02  # of the parameters: an upper bound of what LoRA trains (r=64 on every linear of a 7B: ~2.4 %)


def shape(model, args, peft: bool = False, env=os.environ) -> Shape:
    """The model as loaded (before PEFT wraps it: with `peft`, LoRA's share is assumed trainable); under an FSDP
    launch its state is split over the processes."""
    config = model.config.get_text_config()
    hidden, params = config.hidden_size, list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return Shape(weight_bytes=sum(p.numel() * p.element_size() for p in params),
                 trainable=int(LORA_SHARE * sum(p.numel() for p in params)) if peft else trainable,
                 layers=config.num_hidden_layers, hidden=hidden,
                 intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
                 tokens=args.per_device_train_batch_size * (args.max_length or 1024),
                 activation_bytes=2 if (args.bf16 or args.fp16) else 4,
                 shards=int(env.get("WORLD_SIZE", "1")) if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" else 1)


def training_bytes(s: Shape, checkpointed: bool) -> int:
    """Peak bytes of a training step: weights, gradients and AdamW state of the trainable ones, and the activations
    kept for backward. Per layer and token a decoder keeps about 8 hidden-sized tensors (norms, q/k/v, attention
    output, residuals; no scores with sdpa or flash kernels) and 3 MLP-sized ones (gate, up, activation)
    (after Korthikanti et al. 2022, 34·h bytes per layer and token in 16 bits with a 4·h MLP); checkpointed, a
    layer keeps only its input, and one layer at a time is recomputed whole."""
    state = (s.weight_bytes + s.trainable * (4 + ADAM_STATE)) // s.shards  # gradients in float32
    per_layer = (8 * s.hidden + 3 * s.intermediate) * s.tokens * s.activation_bytes
    kept = s.hidden * s.tokens * s.activation_bytes * s.layers + per_layer if checkpointed else per_layer * s.layers
    return state + kept


def needs_checkpointing(s: Shape, device_bytes: int | None) -> tuple[bool, str]:
    """(on?, why) for `activation_checkpointing`; `device_bytes` None: not a GPU (CPU memory is not the limit)."""
    if device_bytes is None:
        return False, "activation checkpointing off (no GPU)"
    without, budget = training_bytes(s, False), HEADROOM * device_bytes
    figures = f"{without / GiB:.1f} GiB estimated without it, of {device_bytes / GiB:.1f} GiB"
    if without <= budget:
        return False, f"activation checkpointing off ({figures})"
    with_it = training_bytes(s, True)
    tight = "" if with_it <= budget else f"; {with_it / GiB:.1f} GiB even with it: lower the batch or shard (FSDP)"
    return True, f"activation checkpointing on ({figures}{tight})"


def liger_supported(model_type: str, cuda: bool) -> tuple[bool, str]:
    """(on?, why) for `use_liger_kernel`."""
    if not cuda:
        return False, "Liger kernels off (no GPU)"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "Liger kernels off (liger_kernel is not installed)"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False, f"Liger kernels off (no kernels for {model_type})"
    return True, "Liger kernels on"


def device_memory() -> int | None:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else None


def apply(recipe, model, device_bytes: int | None = None, cuda: bool | None = None, env=os.environ) -> list[str]:
    """Set the keys the recipe left unset (`recipe.given` holds those it set) on `recipe.sft`, before the trainer is
    built. Returns what was decided and why, one short phrase each."""
    args, given, notes = recipe.sft, recipe.given, []
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not set(CHECKPOINTING_KEYS) & given:
        if env.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true":  # transformers refuses both at once
            on, why = False, "activation checkpointing by FSDP (fsdp_activation_checkpointing)"
        else:
            s = shape(model, args, peft=recipe.model.use_peft, env=env)
            on, why = needs_checkpointing(s, device_memory() if device_bytes is None else device_bytes)
        args.activation_checkpointing = args.gradient_checkpointing = on
        notes.append(why)
    if "use_liger_kernel" not in given:
        args.use_liger_kernel, why = liger_supported(model.config.model_type, cuda)
        notes.append(why)
    return notes
