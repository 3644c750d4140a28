"""Packing: several examples in one row (padding-free, positions restarting per example) must train
exactly like the same examples padded, on the real model and trl's own collator."""

from __future__ import annotations

import json

import torch
from conftest import EXAMPLES
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lorakit.data import prepare
from lorakit.recipe.schema import DataConfig


def token_losses(model, batch) -> torch.Tensor:
    """Per-token cross-entropy of the trained tokens, in order."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=-100
    )
    return losses[labels != -100]


def test_packed_and_padded_batches_agree(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    rows = [json.loads(line) for line in (EXAMPLES / "train.jsonl").read_text().splitlines()[:6]]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare(DataConfig(train=str(path)), tok, seed=0)
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(data.train.input_ids, data.train.labels)]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # padding really happens

    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist().count(0) == len(examples)

    results = []
    for batch in (padded, packed):
        model.zero_grad()
        losses = token_losses(model, batch)
        losses.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses.detach(), grads))
    (loss_pad, grad_pad), (loss_pack, grad_pack) = results
    assert loss_pad.shape == loss_pack.shape
    assert torch.allclose(loss_pad, loss_pack, atol=1e-4), (loss_pad - loss_pack).abs().max()
    for name, grad in grad_pad.items():
        assert torch.allclose(grad, grad_pack[name], atol=1e-4, rtol=1e-3), name


def test_a_kv_cache_would_join_packed_examples_so_lorakit_loads_without_one(tiny_model, tmp_path):
    from lorakit.model import base as model_mod
    from lorakit.model.setup import for_loading
    from lorakit.recipe.schema import ModelConfig

    cfg = ModelConfig(name_or_path=str(tiny_model))
    model = model_mod.load_base(cfg, for_loading(cfg))
    assert model.config.use_cache is False
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in (EXAMPLES / "train.jsonl").read_text().splitlines()[:4]]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare(DataConfig(train=str(path)), tok, seed=0)
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(data.train.input_ids, data.train.labels)]
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    with torch.no_grad():
        reference = model(**padded).loss
        assert torch.allclose(model(**packed).loss, reference, atol=1e-5)
        assert not torch.allclose(model(**packed, use_cache=True).loss, reference, atol=1e-2)  # the trap
