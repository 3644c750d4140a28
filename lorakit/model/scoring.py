"""The loss of a model on prepared data, with one definition: the mean cross-entropy per trained token.

`lorakit eval` reports it, and `lorakit train` reports the run's final eval loss with it, so the two
figures for the same adapter and data are the same number. (The trainer's own periodic `eval_loss` in
metrics.jsonl is transformers': the mean of per-batch means, which weighs a short batch's tokens more.)

Preference pairs are scored by the summed log-probability of each reply's trained tokens
(`sequence_logps`), the quantity DPO compares.

Exports `token_loss`, `sequence_logps`.
"""

from __future__ import annotations

import torch

from lorakit import upstream


def _token_logps(model, input_ids: list, labels: list, pad_token_id: int, batch_size: int):
    """(log-probability of each next token, trained mask) per padded batch, logits never kept beyond one."""
    collate = upstream.padding_collator(pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(input_ids), batch_size):
        batch = collate(
            [
                {"input_ids": i, "labels": lab}
                for i, lab in zip(input_ids[start : start + batch_size], labels[start : start + batch_size])
            ]
        )
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        logits = logits[:, -batch["input_ids"].shape[1] :]  # prompt tuning prepends its virtual tokens' logits
        target = batch["labels"][:, 1:].to(device)
        trained = target != -100
        logps = -torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), target.masked_fill(~trained, 0), reduction="none"
        )
        del logits
        yield logps * trained, trained


@torch.no_grad()
def token_loss(model, input_ids: list, labels: list, pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """Mean loss per trained token over the examples (the sum over every trained token, divided by their
    count), one padded batch at a time."""
    total, count = 0.0, 0
    for logps, trained in _token_logps(model, input_ids, labels, pad_token_id, batch_size):
        total -= logps.sum().item()
        count += int(trained.sum())
    return total / max(count, 1), count


@torch.no_grad()
def sequence_logps(model, input_ids: list, labels: list, pad_token_id: int, batch_size: int) -> list[float]:
    """Each example's summed log-probability of its trained tokens (a reply given its prompt)."""
    out: list[float] = []
    for logps, _ in _token_logps(model, input_ids, labels, pad_token_id, batch_size):
        out += logps.sum(dim=1).tolist()
    return out
