"""Batched generation with left padding and the run's stop tokens, shared by `eval` and `generate`.

Owns: ordering prompts by length into batches, left padding, calling `generate` with the run's
end-of-turn/eos ids, and cutting each output at its first stop token (recording whether it stopped
before `max_new_tokens`). Does not choose prompts or models (lorakit.evaluate.compare, lorakit.cli).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.recipe.schema import EvalConfig


@dataclass
class Generation:
    text: str
    tokens: int  # generated tokens before the stop token
    stopped: bool  # ended with a stop token before max_new_tokens


def stop_ids(model_dir: Path, tokenizer) -> list[int]:
    """The stop tokens a run (or merged model) saved in generation_config.json, else the tokenizer's eos."""
    path = Path(model_dir) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]))


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[list[int]], stops: list[int], settings: EvalConfig, batch_size: int, seed: int = 0
) -> list[Generation]:
    device = next(model.parameters()).device
    check_context(model, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    model.eval()
    if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
        batch_size = 1  # peft drops the position ids of prompt/prefix tuning: left padding would shift positions
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_config(settings, stops, pad))
        for row, i in zip(out[:, width:].tolist(), chunk):
            results[i] = _finished(tokenizer, row, stops)
    return results


def check_context(model, prompts: list[list[int]]) -> None:
    """Refuse a prompt that fills the model's whole context: nothing could be generated after it (a prompt
    far past it ran for minutes before transformers gave up)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for i, prompt in enumerate(prompts, start=1):
        if context and len(prompt) >= context:
            raise LorakitError(
                f"prompt {i} is {len(prompt):,} tokens, and the model's context is {context:,}: nothing can be "
                "generated after it; shorten it"
            )


@torch.no_grad()
def stream(
    model, tokenizer, prompt: list[int], stops: list[int], settings: EvalConfig, write, seed: int = 0
) -> Generation:
    """One reply, its text handed to `write` piece by piece as tokens come (the same decoding as `generate`)."""
    from transformers import TextStreamer

    check_context(model, [prompt])
    hidden = _hidden(tokenizer, stops)

    class _Streamer(TextStreamer):
        def put(self, value):
            kept = [t for t in value.reshape(-1).tolist() if t not in hidden]
            if self.skip_prompt and self.next_tokens_are_prompt:  # the prompt is skipped whole, as upstream
                super().put(value)
            elif kept:
                super().put(torch.tensor(kept))

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                write(text)

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    torch.manual_seed(seed)
    model.eval()
    ids = torch.tensor([prompt], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=_config(settings, stops, pad),
        streamer=_Streamer(tokenizer, skip_prompt=True),
    )
    return _finished(tokenizer, out[0, len(prompt) :].tolist(), stops)


def prompt_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """A conversation rendered with the tokenizer's chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _finished(tokenizer, row: list[int], stops: list[int]) -> Generation:
    """Generated ids cut at the first stop token, as text."""
    end = next((j for j, t in enumerate(row) if t in stops), None)
    kept = row if end is None else row[:end]
    return Generation(_text(tokenizer, kept, stops), len(kept), end is not None)


def _hidden(tokenizer, stops: list[int]) -> set[int]:
    """Tokens left out of a reply's text: the stop tokens and the tokenizer's structural ones. Other special
    tokens stay visible: a run that added `<tool_call>` (model.new_special_tokens) must show it."""
    structural = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return {t for t in (*stops, *structural) if t is not None}


def _text(tokenizer, ids: list[int], stops: list[int]) -> str:
    hidden = _hidden(tokenizer, stops)
    return tokenizer.decode([t for t in ids if t not in hidden], skip_special_tokens=False).strip()


def _config(settings: EvalConfig, stops: list[int], pad: int):
    """Exactly the recipe's decoding: a fresh GenerationConfig, so the model's own defaults (top_k,
    repetition_penalty, min_p, ...) do not creep in."""
    from transformers import GenerationConfig

    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        if settings.do_sample
        else {"do_sample": False}
    )
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True, **sampling
    )
