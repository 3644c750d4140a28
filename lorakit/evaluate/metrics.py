"""Text metrics for generations against references: exact match, normalized exact match, contains,
ROUGE-L and token F1 (both over normalized words), generated length and stop rate.

Normalization follows the SQuAD convention: lower case, punctuation and the articles a/an/the removed,
whitespace collapsed. Every metric is a mean over examples, in [0, 1] except the length.
"""

from __future__ import annotations

import bisect
import math
import string
from collections import Counter

GENERATION_METRICS = (
    "exact_match",
    "normalized_exact_match",
    "contains_reference",
    "rouge_l",
    "token_f1",
    "mean_generated_tokens",
    "stop_rate",
)
LOSS_METRICS = ("loss", "perplexity")
# Preference pairs: how often a model's likelihood prefers the chosen reply, the replies' mean summed
# log-probabilities; for a tuned model, DPO's implicit reward against the base (its gain in log-probability
# over the base, chosen minus rejected): how often it is positive, and its mean (trl's margin / beta).
PREFERENCE_METRICS = ("preference_accuracy", "chosen_logps", "rejected_logps", "reward_accuracy", "reward_margin")
# KTO's labelled completions: the mean summed log-probability of the desirable and of the undesirable ones;
# for a tuned model, with KTO's implicit reward (its gain in log-probability over the reference model), how
# often a desirable completion's reward beats an undesirable one's, over every such couple (the ROC AUC of
# the reward as a label classifier: 0.5 is chance; KTO rewards are relative, so no fixed threshold applies).
UNPAIRED_METRICS = ("desirable_logps", "undesirable_logps", "reward_auc")
ALL_METRICS = LOSS_METRICS + GENERATION_METRICS + PREFERENCE_METRICS + UNPAIRED_METRICS
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains(prediction: str, reference: str) -> bool:
    """The normalized reference appears in the normalized prediction as whole words ("42" does not
    contain "4"); a reference that normalizes to nothing must be matched exactly."""
    words, wanted = normalize(prediction).split(), normalize(reference).split()
    if not wanted:
        return prediction.strip() == reference.strip()
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalized words."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for word in pred:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 of normalized words (order ignored)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(outputs: list[str], references: list[str], lengths: list[int], stopped: list[bool]) -> dict:
    n = len(outputs)
    if n == 0:
        return {}
    pairs = list(zip(outputs, references))
    return {
        "exact_match": sum(o.strip() == r.strip() for o, r in pairs) / n,
        "normalized_exact_match": sum(normalize(o) == normalize(r) for o, r in pairs) / n,
        "contains_reference": sum(contains(o, r) for o, r in pairs) / n,
        "rouge_l": sum(rouge_l(o, r) for o, r in pairs) / n,
        "token_f1": sum(token_f1(o, r) for o, r in pairs) / n,
        "mean_generated_tokens": sum(lengths) / n,
        "stop_rate": sum(stopped) / n,
    }


def preference(chosen: list[float], rejected: list[float]) -> dict:
    """One model's preference figures from the summed log-probabilities of each pair's replies."""
    n = max(len(chosen), 1)
    return {
        "preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "chosen_logps": sum(chosen) / n,
        "rejected_logps": sum(rejected) / n,
    }


def rewards(tuned: tuple[list[float], list[float]], base: tuple[list[float], list[float]]) -> dict:
    """A tuned model's implicit reward against the base: per pair, (tuned - base) on the chosen reply minus
    (tuned - base) on the rejected one."""
    margins = [(tc - bc) - (tr - br) for tc, tr, bc, br in zip(*tuned, *base)]
    n = max(len(margins), 1)
    return {"reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n}


def labelled(logps: list[float], desirable: list[bool]) -> dict:
    """One model's figures on labelled completions: mean summed log-probability per label."""
    good = [x for x, d in zip(logps, desirable) if d]
    bad = [x for x, d in zip(logps, desirable) if not d]
    return {
        "desirable_logps": sum(good) / len(good) if good else None,
        "undesirable_logps": sum(bad) / len(bad) if bad else None,
    }


def reward_auc(tuned: list[float], reference: list[float], desirable: list[bool]) -> dict:
    """The share of (desirable, undesirable) couples whose desirable completion gains more over the reference
    than the undesirable one (ties count half); None without both labels."""
    rewards = [t - r for t, r in zip(tuned, reference)]
    good = sorted(x for x, d in zip(rewards, desirable) if d)
    bad = sorted(x for x, d in zip(rewards, desirable) if not d)
    if not good or not bad:
        return {"reward_auc": None}
    wins = sum(
        bisect.bisect_left(bad, g) + 0.5 * (bisect.bisect_right(bad, g) - bisect.bisect_left(bad, g)) for g in good
    )
    return {"reward_auc": wins / (len(good) * len(bad))}


def parse_gates(fail_under: list[str], fail_over: list[str]) -> list[tuple[str, str, float]]:
    """`metric=value` options -> (metric, ">=" | "<=", value); unknown metrics are refused."""
    gates = []
    for items, op, flag in ((fail_under, ">=", "--fail-under"), (fail_over, "<=", "--fail-over")):
        for item in items:
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or name not in ALL_METRICS:
                raise ValueError(f"{flag} {item}: expected METRIC=VALUE with METRIC one of {', '.join(ALL_METRICS)}")
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{flag} {item}: {raw!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{flag} {item}: the threshold must be a finite number")
            gates.append((name, op, value))
    return gates


def check_gates(gates: list[tuple[str, str, float]], figures: dict) -> list[dict]:
    results = []
    for name, op, value in gates:
        got = figures.get(name)  # None: not computed (no generation prompts), which fails the gate
        ok = got is not None and (got >= value if op == ">=" else got <= value)
        results.append({"metric": name, "op": op, "threshold": value, "value": got, "passed": ok})
    return results
