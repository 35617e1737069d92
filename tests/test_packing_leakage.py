"""No document of a packed batch sees another: through our trainer's own collator, each document's loss equals
its loss alone, and changing the other documents changes nothing of it. On sdpa the packed blocks are rows
(sft_recipes.packing); on flex attention, the document-mask candidate for packed rows on GPU (issue 25), the
whole batch is TRL's one padding-free row and transformers builds the mask from position_ids. Flex runs
uncompiled here (the same mask, PyTorch's reference kernel: inductor's CPU build takes minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A tiny randomly initialised Qwen3 (flex attention supports it; GPT-2 does not) with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from sft_recipes import tiny

    tokenizer = AutoTokenizer.from_pretrained(tiny.tiny_model_path())
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("qwen3")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def doc_losses(model, batch, positions: bool = True) -> list[float]:
    """Mean cross-entropy of each document's trained tokens, documents in order (found from position_ids, which
    the model is given unless `positions` is False)."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch and (positions or k == "input_ids")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels, starts = batch["labels"][:, 1:], batch["position_ids"] == 0
    doc = (starts.flatten().cumsum(0) - 1).view(starts.shape)[:, 1:]  # document index of each predicted token
    out = []
    for d in range(int(doc.max()) + 1):
        keep = (doc == d) & (labels != -100)
        if keep.any():
            out.append(F.cross_entropy(logits[keep], labels[keep]).item())
    return out


def documents(blocks) -> list[dict]:
    """The packed blocks cut back into their documents, each a batch of its own (the unpacked reference)."""
    docs = []
    for block in blocks:
        start = 0
        for n in block["seq_lengths"]:
            ids, labels = block["input_ids"][start:start + n], list(block["labels"][start:start + n])
            docs.append({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                         "position_ids": torch.arange(n)[None]})
            start += n
    return docs


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_each_packed_document_scores_as_it_does_alone(qwen3_dir, attention, tmp_path, monkeypatch):
    from transformers.integrations import flex_attention

    from sft_recipes import build_trainer, load_recipe

    monkeypatch.setattr(flex_attention, "is_torchdynamo_compiling", lambda: True)  # transformers then calls it uncompiled
    trainer = build_trainer(load_recipe(
        str(ROOT / "recipes" / "tiny_alpaca.yaml"), model_name_or_path=str(qwen3_dir), attn_implementation=attention,
        packing=True, eval_strategy="no", eval_split=0, output_dir=str(tmp_path)))  # tasks and tool chats
    model = trainer.model.eval()
    assert model.config._attn_implementation == attention
    several = [i for i, n in enumerate(trainer.train_dataset["seq_lengths"]) if len(n) > 1]
    blocks = [trainer.train_dataset[i] for i in several[-3:]]  # the last are the least full: unequal lengths
    batch = trainer.data_collator(blocks)
    assert "attention_mask" not in batch
    # sdpa: one row per block (our collator); flex: TRL's one padding-free row
    assert batch["input_ids"].shape[0] == (3 if attention == "sdpa" else 1) and trainer.packed_rows == (attention == "sdpa")
    docs = documents(blocks)
    assert len(docs) > len(blocks) and len({len(b["input_ids"]) for b in blocks}) > 1

    packed = doc_losses(model, batch)
    alone = [x for d in docs for x in doc_losses(model, d)]
    assert len(packed) == len(alone) == len(docs)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(alone), rtol=0, atol=1e-5)

    # Control: without position_ids the model sees each row as one text, and later documents' losses move.
    blended = doc_losses(model, batch, positions=False)
    assert max(abs(a - b) for a, b in zip(blended, alone)) > 1e-2

    # Leakage 0: every other document replaced by other tokens leaves the first one's logits as they were.
    first = int(blocks[0]["seq_lengths"][0])
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"].view(-1)[first:] = (changed["input_ids"].view(-1)[first:] + 7) % model.config.vocab_size
    with torch.no_grad():
        before, after = (model(**x, use_cache=False).logits.flatten(0, 1)[:first] for x in (inputs, changed))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
