"""Seeded generator of the bundled quickstart dataset `examples/reverse/` and of the preference pairs
`examples/preference/` (the same task: the reversed words chosen over a wrong order), and of those pairs
with one reply kept, labelled desirable or not (KTO).

Owns the task ("reverse the order of three words"), its word list, the row formats and the exact bytes
of the JSONL files. Also owns `all_texts()`, the text `scripts/tiny_model.py` trains its tokenizer
on, so the tokenizer never needs to read the files. Same seed, same bytes, on every run and platform.

    python scripts/make_examples.py [OUT_DIR]     # default: <repo>/examples (reverse/ and preference/)
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

SEED = 0
N_TRAIN, N_EVAL, N_TRAIN_PC, N_EVAL_PC = 1600, 64, 400, 32
SYSTEM = "Reverse the order of the words."
SYSTEM_FRACTION = 0.25  # share of chat rows that carry the system message
WORDS = (
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "sun",
    "moon",
    "star",
    "tree",
    "fish",
    "bird",
    "cake",
    "milk",
    "book",
    "door",
    "hat",
    "cup",
    "box",
    "car",
    "bus",
    "road",
    "hill",
    "lake",
    "rain",
    "snow",
    "wind",
    "fire",
    "rock",
    "sand",
    "leaf",
    "rose",
    "bell",
    "coin",
    "ring",
    "key",
    "egg",
    "pen",
    "map",
    "ship",
    "frog",
)


def _triples(seed: int) -> list[tuple[str, str, str]]:
    """All distinct word triples needed, unique, in a seeded order (train rows first, then eval)."""
    rng = random.Random(seed)
    need = N_TRAIN + N_EVAL + N_TRAIN_PC + N_EVAL_PC
    seen: set[tuple[str, str, str]] = set()
    out: list[tuple[str, str, str]] = []
    while len(out) < need:
        t = tuple(rng.sample(WORDS, 3))
        if t not in seen:
            seen.add(t)
            out.append(t)  # type: ignore[arg-type]
    return out


def user_text(words) -> str:
    return "reverse: " + " ".join(words)


def answer_text(words) -> str:
    return " ".join(reversed(words))


def chat_row(words, system: bool) -> dict:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    msgs += [{"role": "user", "content": user_text(words)}, {"role": "assistant", "content": answer_text(words)}]
    return {"messages": msgs}


def pc_row(words) -> dict:
    # The completion starts with the space so that BPE token boundaries are the same whether
    # prompt and completion are tokenized apart or together.
    return {"prompt": user_text(words) + "\nanswer:", "completion": " " + answer_text(words)}


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """The four splits as lists of rows; every triple appears in exactly one row of one split."""
    t = _triples(seed)
    rng = random.Random(seed + 1)
    a, b, c = N_TRAIN, N_TRAIN + N_EVAL, N_TRAIN + N_EVAL + N_TRAIN_PC
    return {
        "train": [chat_row(w, rng.random() < SYSTEM_FRACTION) for w in t[:a]],
        "eval": [chat_row(w, rng.random() < SYSTEM_FRACTION) for w in t[a:b]],
        "train_pc": [pc_row(w) for w in t[b:c]],
        "eval_pc": [pc_row(w) for w in t[c:]],
    }


def all_texts(seed: int = SEED) -> Iterator[str]:
    """Every string of the dataset (role names, message contents, prompts, completions): tokenizer corpus."""
    yield from ("system", "user", "assistant")
    for rows in build_splits(seed).values():
        for row in rows:
            if "messages" in row:
                for m in row["messages"]:
                    yield m["role"] + "\n" + m["content"]
            else:
                yield row["prompt"] + row["completion"]


N_PAIRS_TRAIN, N_PAIRS_EVAL = 400, 256
WRONG_ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (1, 0, 2))  # the rejected reply: copied, rotated, half-reversed


def pair_row(words, wrong: tuple[int, int, int], shared_history: bool) -> dict:
    """Chosen: the reversed words; rejected: another order. Either an explicit prompt, or two conversations
    sharing their history (the two layouts preference datasets come in)."""
    user = {"role": "user", "content": user_text(words)}
    chosen = {"role": "assistant", "content": answer_text(words)}
    rejected = {"role": "assistant", "content": " ".join(words[i] for i in wrong)}
    if shared_history:
        return {"chosen": [user, chosen], "rejected": [user, rejected]}
    return {"prompt": [user], "chosen": [chosen], "rejected": [rejected]}


def build_pairs(seed: int = SEED) -> dict[str, list[dict]]:
    """Preference pairs on triples of their own (a seed of their own), none of them in reverse/: a DPO run after
    the quickstart's SFT is measured on prompts neither run trained on."""
    taken = set(_triples(seed))
    t = [w for w in _triples(seed + 2) if w not in taken][: N_PAIRS_TRAIN + N_PAIRS_EVAL]
    rng = random.Random(seed + 3)
    rows = [pair_row(w, rng.choice(WRONG_ORDERS), rng.random() < 0.5) for w in t]
    return {"train": rows[:N_PAIRS_TRAIN], "eval": rows[N_PAIRS_TRAIN:]}


def unpaired_row(pair: dict, desirable: bool, string_reply: bool) -> dict:
    """KTO's layout: one reply of a pair, the chosen one labelled desirable or the rejected one not; the
    completion a message or, after a conversational prompt, a string (both are read as the assistant's reply)."""
    side = pair["chosen" if desirable else "rejected"]
    prompt, reply = (pair["prompt"], side) if "prompt" in pair else (side[:-1], side[-1:])
    return {"prompt": prompt, "completion": reply[0]["content"] if string_reply else reply, "label": desirable}


def build_unpaired(seed: int = SEED) -> dict[str, list[dict]]:
    """The pairs with one reply of each kept (seeded, about half desirable): labelled completions, no pairs."""
    rng = random.Random(seed + 4)
    return {
        f"unpaired_{name}": [unpaired_row(pair, rng.random() < 0.5, rng.random() < 0.5) for pair in pairs]
        for name, pairs in build_pairs(seed).items()
    }


def _write(out: Path, splits: dict[str, list[dict]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"{name}.jsonl").write_bytes(text.encode("utf-8"))
    return out


def write_examples(out_dir: str | Path | None = None, seed: int = SEED) -> Path:
    """Write reverse/ (train, eval, train_pc, eval_pc) and preference/ (train, eval, unpaired_train,
    unpaired_eval) under out_dir."""
    out = Path(out_dir) if out_dir else Path(__file__).resolve().parent.parent / "examples"
    _write(out / "reverse", build_splits(seed))
    _write(out / "preference", {**build_pairs(seed), **build_unpaired(seed)})
    return out


if __name__ == "__main__":
    print(write_examples(sys.argv[1] if len(sys.argv) > 1 else None))
