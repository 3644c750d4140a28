"""Synthetic chat data with realistic, skewed lengths, for benchmarks (never for tests of behaviour).

Total tokens per example follow a lognormal distribution (median about `median_tokens`, clipped to
[16, `max_tokens`]); 30% of conversations are multi-turn (2-4 exchanges) and 30% have a system prompt.
Words are drawn from whole-word tokens of the given tokenizer, so a word is about one token and the
lengths hold for the tokenizer that is benchmarked.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

# ChatML with `{% generation %}` markers around assistant turns, which trl's `assistant_only_loss` needs;
# lorakit reads the same template from a file (data.chat_template), so both train on the same tokens.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_list(tokenizer) -> list[str]:
    """Words that are single tokens of this tokenizer (with a leading space)."""
    words = []
    for token in tokenizer.get_vocab():
        word = tokenizer.convert_tokens_to_string([token]).strip()
        if word.isalpha() and len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
            words.append(word)
    if len(words) < 20:
        raise ValueError(f"the tokenizer has only {len(words)} single-token words")
    return sorted(set(words))


def chat_rows(
    n: int, words: list[str], *, seed: int = 0, median_tokens: int = 100, max_tokens: int = 1024, spread: float = 0.9
) -> list[dict]:
    """`spread` is the lognormal sigma; 0 gives every example about `median_tokens` tokens."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    lengths = np.clip(rng.lognormal(np.log(median_tokens), spread, n), 16, max_tokens).astype(int)
    rows = []
    for total in lengths:
        exchanges = pick.randint(2, 4) if pick.random() < 0.3 else 1
        messages = [{"role": "system", "content": "You answer briefly."}] if pick.random() < 0.3 else []
        budget = max(6, int(total) - 8 * exchanges - 6)  # leave room for the template's tokens
        per = max(3, budget // exchanges)
        for _ in range(exchanges):
            asked = max(1, per // 3)
            messages.append({"role": "user", "content": " ".join(pick.choices(words, k=asked))})
            messages.append({"role": "assistant", "content": " ".join(pick.choices(words, k=max(1, per - asked)))})
        rows.append({"messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
