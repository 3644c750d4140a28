"""The loss of a model on prepared data, with one definition: the mean cross-entropy per trained token.

`lorakit eval` reports it, and `lorakit train` reports the run's final eval loss with it, so the two
figures for the same adapter and data are the same number. (The trainer's own periodic `eval_loss` in
metrics.jsonl is transformers': the mean of per-batch means, which weighs a short batch's tokens more.)

Exports `token_loss`.
"""

from __future__ import annotations

import torch

from lorakit import upstream


@torch.no_grad()
def token_loss(model, input_ids: list, labels: list, pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """Mean loss per trained token over the examples (the sum over every trained token, divided by their
    count), one padded batch at a time, logits never kept beyond one batch."""
    collate = upstream.padding_collator(pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    ids = input_ids
    for start in range(0, len(ids), batch_size):
        batch = collate(
            [
                {"input_ids": i, "labels": lab}
                for i, lab in zip(ids[start : start + batch_size], labels[start : start + batch_size])
            ]
        )
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        logits = logits[:, -batch["input_ids"].shape[1] :]  # prompt tuning prepends its virtual tokens' logits
        target = batch["labels"][:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((target != -100).sum())
        del logits
    return total / max(count, 1), count
