"""Packed batches that stay rows where the attention is dense.

TRL's `bfd` packing turns on padding-free batches: a step's packed blocks are joined into ONE row. Varlen
flash-attention kernels cost each block on its own there, but sdpa and eager build one mask over the whole
row, so 8 blocks of 512 tokens cost (8*512)^2 attention instead of 8*512^2 (CPU: packed batch 8 ran at 0.5-0.6x
of padded batch 8, benchmarks/train.py). Kept as a [batch, block] tensor with per-document `position_ids`
and no `attention_mask`, transformers builds the same per-document mask row by row
(masking_utils.find_packed_sequence_indices), and the blocks are exactly as TRL packed them.
"""
from __future__ import annotations

import logging

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

DENSE_ATTENTION = {"sdpa", "eager"}  # a mask over the whole row: cost grows with the row's length squared


class PackedRows(DataCollatorForLanguageModeling):
    """TRL's collator with position ids from the packed `seq_lengths`, one row per packed block."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id=pad_token_id, return_position_ids=True, pad_to_multiple_of=pad_to_multiple_of)

    def torch_call(self, examples):
        out = super().torch_call(examples)
        # With a mask, transformers would let the documents of a row attend to each other. Padding at a row's
        # end gets position 0 per token: each pad is a document of its own, never seen by the real tokens.
        del out["attention_mask"]
        # A document's first token is not predicted from the one before it (as in TRL's padding-free rows).
        out["labels"][out["position_ids"] == 0] = -100
        return out


class Trainer(SFTTrainer):
    """`SFTTrainer` that collates packed blocks as rows on sdpa/eager attention."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_rows = self.padding_free and self.model.config._attn_implementation in DENSE_ATTENTION
        if self.packed_rows:
            self.data_collator = PackedRows(self.processing_class.pad_token_id, self.args.pad_to_multiple_of)
            # GPT-2 & co. warn once that a row ending in padding has no attention_mask; position_ids mask it here.
            logging.getLogger("transformers.modeling_utils").addFilter(_not_the_padding_warning)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        ids = inputs["input_ids"]
        if self.packed_rows and model.training and ids.size(0) > 1:
            # TRL counts a batch without attention_mask as one row (`position_ids.size(1)`): add the others.
            rest = torch.tensor(ids.numel() - ids.size(1), device=ids.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(rest).sum().item()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return out


def _not_the_padding_warning(record) -> bool:
    return "since your input_ids may be padded" not in record.getMessage()
