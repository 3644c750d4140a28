"""Rows: reading JSONL with line numbers, and turning each supported format into one canonical example.

Formats (detected from a row's keys or stated in `data.format`):
  messages           {"messages": [{"role", "content"}, ...]}                     OpenAI chat
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
  alpaca             {"instruction", "input"?, "output", "system"?}
  prompt_completion  {"prompt", "completion"} as strings, or both as lists of messages
  text               {"text"}                                                      continued pre-training
  preference         {"prompt"?, "chosen", "rejected"}: strings, or lists of messages  DPO/ORPO/SimPO/KTO pairs
  unpaired           {"prompt", "completion", "label"}: a completion, desirable or not     KTO
A column mapping (`data.columns`) renames the user's fields to these names first.

Every example becomes a `Chat` (messages, rendered with the chat template) or a `Plain` (prompt +
completion strings concatenated, eos appended); a preference row becomes a `Pair` of two of them, the
same context with each reply, and an unpaired row a `Labeled` one. Errors say `file:line: reason` without dumping the row.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
FORMAT_KEYS = {  # format -> the keys whose presence identifies it
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}


@dataclass
class Chat:
    messages: list[dict]
    trained_from: int = 0  # messages before this index are context only (conversational prompt/completion)


@dataclass
class Plain:
    prompt: str
    completion: str


@dataclass
class Pair:
    """A preference pair: one context and two replies to it, `chosen` the better. Each side is the example
    SFT would train on that reply alone, so both are rendered and masked exactly as SFT does."""

    chosen: Chat | Plain
    rejected: Chat | Plain


@dataclass
class Labeled:
    """KTO's unpaired example: one completion of a prompt, labelled desirable or not; the example is the one
    SFT would train on that completion, rendered and masked exactly as SFT does."""

    example: Chat | Plain
    desirable: bool


def read_rows(path: str, bad: list[str] | None = None, limit: int | None = None) -> list[tuple[str, dict]]:
    """(position, row) pairs from a JSONL, JSON (a list of objects), CSV or Parquet file, at most `limit`.
    The position is a line number for JSONL and CSV, `item N` / `row N` (1-based) for JSON and Parquet."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ""):
        return [(str(n), row) for n, row in read_jsonl(path, bad, limit)]
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(str(reader.line_num), dict(row)) for row in reader]
    elif suffix == ".json":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: a .json data file must hold a list of objects (use .jsonl for one per line)")
        rows = [(f"item {i}", row) for i, row in enumerate(data, start=1)]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist(), start=1)]
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows[:limit]


def read_jsonl(path: str, bad: list[str] | None = None, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, row) pairs. A malformed line is an error naming file and line, or, when a `bad`
    list is given (data.on_bad_rows: skip), its message is appended there and the line skipped."""
    rows, skipped = [], 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                rows.extend(_parse_line(raw, number, path))
            except DataError as exc:
                if bad is None:
                    raise
                bad.append(str(exc))
                skipped += 1
    if not rows and not skipped:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


MAX_ROW_BYTES = 1 << 20  # 1 MiB of text is ~250k tokens: past any max_length; a 50 MB row aborted the tokenizer


def _parse_line(raw: bytes, number: int, path: str) -> list[tuple[int, dict]]:
    if len(raw) > MAX_ROW_BYTES:
        raise DataError(
            f"{path}:{number}: the row is {len(raw) / 2**20:.1f} MiB, over lorakit's limit of "
            f"{MAX_ROW_BYTES >> 20} MiB per row (longer than any max_length can keep; split it)"
        )
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{number}: invalid UTF-8 at byte {exc.start}") from None
    if not line.strip():
        return []
    try:  # without its line ending, so that a defect at the end of the line is placed on this line
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{number}: invalid JSON: nested too deeply") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
    if "\\ud" in line.lower():  # only a \uXXXX escape can make a lone surrogate: not text, tokenizers fail on it
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(
                f"{path}:{number}: the row holds a lone UTF-16 surrogate ({exc.object[exc.start : exc.end]!r}), "
                "which is not text"
            ) from None
    return [(number, row)]


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """Apply `data.columns` ({lorakit name: your column}) to one row."""
    if not columns:
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            renamed[ours] = row[theirs]
    return renamed


def detect_format(row: dict, where: str) -> str:
    found = [fmt for fmt, keys in FORMAT_KEYS.items() if all(k in row for k in keys)]
    # the most specific: prompt + completion + label is unpaired, not prompt_completion with an extra key
    found = [f for f in found if not any(set(FORMAT_KEYS[f]) < set(FORMAT_KEYS[g]) for g in found)]
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(
            f"{where}: the keys {sorted(row)} fit several formats ({', '.join(found)}); set `data.format` to say which"
        )
    raise DataError(
        f"{where}: cannot tell the data format from the keys {sorted(row)}; expected one of "
        + "; ".join(f"{fmt} ({' + '.join(keys)})" for fmt, keys in FORMAT_KEYS.items())
        + " (set `data.format`, or map your columns with `data.columns`)"
    )


def to_example(row: dict, fmt: str, where: str) -> Chat | Plain | Pair | Labeled:
    """One row of the given format -> Chat, Plain, Pair or Labeled, checked field by field."""
    if fmt == "preference":
        return _pair(row, where)
    if fmt == "unpaired":
        return _labeled(row, where)
    if fmt == "messages":
        return Chat(_messages(row.get("messages"), "messages", where))
    if fmt == "sharegpt":
        return Chat(_messages(_from_sharegpt(row.get("conversations"), where), "conversations", where))
    if fmt == "alpaca":
        instruction, extra = _text(row, "instruction", where), row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: `input` must be a string")
        messages = [{"role": "system", "content": _text(row, "system", where)}] if row.get("system") else []
        messages += [
            {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": _text(row, "output", where)},
        ]
        return Chat(messages)
    if fmt == "text":
        return Plain("", _text(row, "text", where))
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        head = _messages(prompt, "prompt", where, need_assistant=False)
        return Chat(head + _messages(completion, "completion", where), trained_from=len(head))
    if not isinstance(prompt, str):
        raise DataError(f"{where}: `prompt` must be a string (or both lists of messages), got {type(prompt).__name__}")
    return Plain(prompt, _text(row, "completion", where))


def _pair(row: dict, where: str) -> Pair:
    """prompt/chosen/rejected: three strings (plain text, as prompt_completion strings), or replies as strings or
    message lists after a prompt given as a string or messages, or two conversations sharing their history."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, list):
        if prompt is None:
            raise DataError(f"{where}: `prompt` is missing: string replies need the prompt they answer")
        text = _text(row, "prompt", where)
        pair = Pair(Plain(text, _text(row, "chosen", where)), Plain(text, _text(row, "rejected", where)))
        sides = [pair.chosen.completion, pair.rejected.completion]
    else:
        history = (
            []
            if prompt is None
            else [{"role": "user", "content": _text(row, "prompt", where)}]
            if isinstance(prompt, str)
            else _messages(prompt, "prompt", where, need_assistant=False)
        )
        replies = [
            _messages([{"role": "assistant", "content": v}] if isinstance(v, str) else v, key, where)
            for key, v in (("chosen", chosen), ("rejected", rejected))
        ]
        if prompt is None:  # the prompt is the history both conversations share
            shared = next((k for k, (a, b) in enumerate(zip(*replies)) if a != b), min(map(len, replies)))
            history, replies = replies[0][:shared], [r[shared:] for r in replies]
        for key, reply in zip(("chosen", "rejected"), replies):
            if len(reply) != 1 or reply[0]["role"] != "assistant":
                raise DataError(
                    f"{where}: `{key}` must be one assistant reply after the prompt (got "
                    f"{', '.join(m['role'] for m in reply) or 'nothing'} after the shared messages)"
                )
        if not history:
            raise DataError(f"{where}: the pair has no prompt: give `prompt`, or conversations that share one")
        n = len(history)
        pair = Pair(Chat(history + replies[0], trained_from=n), Chat(history + replies[1], trained_from=n))
        sides = [replies[0][0]["content"], replies[1][0]["content"]]
    if sides[0] == sides[1]:
        raise DataError(f"{where}: `chosen` and `rejected` are the same reply; the pair prefers nothing")
    return pair


def _labeled(row: dict, where: str) -> Labeled:
    """prompt/completion/label: the completion as prompt_completion reads it (strings, or messages; a string
    after a conversational prompt is the assistant's reply), `label` true (desirable) or false."""
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells are strings
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        what = "missing" if label is None else f"{label!r}"
        raise DataError(f"{where}: `label` must be true (a desirable completion) or false (undesirable), got {what}")
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    elif isinstance(prompt, str) and isinstance(completion, list):
        prompt = [{"role": "user", "content": prompt}]
    example = to_example({"prompt": prompt, "completion": completion}, "prompt_completion", where)
    if isinstance(example, Chat):
        reply = example.messages[example.trained_from :]
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise DataError(f"{where}: `completion` must be one assistant reply after the prompt")
        if not example.trained_from:
            raise DataError(f"{where}: the completion has no prompt")
    elif not example.prompt:
        raise DataError(f"{where}: `prompt` is empty: a labelled completion needs the prompt it answers")
    return Labeled(example, label)


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: `{key}` must be a string, got {what}")
    if not value.strip():
        raise DataError(f"{where}: `{key}` is empty")
    return value


def _from_sharegpt(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: `conversations` must be a non-empty list of {{from, value}} objects")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}: conversations[{i}].from must be one of {', '.join(SHAREGPT_ROLES)} (got {speaker!r})"
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return messages


def _messages(messages, key: str, where: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `{key}` must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            got = message.get("role") if isinstance(message, dict) else message
            raise DataError(f"{where}: {key}[{i}].role must be one of {', '.join(ROLES)} (got {got!r})")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
        if message["role"] == "assistant" and not content.strip():
            raise DataError(f"{where}: {key}[{i}].content is empty; there is nothing to train on")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: `{key}` has no assistant message; there is nothing to train on")
    return messages


def read_prompts(path: Path) -> list[list[dict]]:
    """`lorakit generate --file`: one conversation per JSONL line, {"prompt": ...} or {"messages": [...]}."""
    conversations = []
    if not path.is_file():
        raise DataError(f"--file {path}: no such file")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            conversations.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            conversations.append(row["messages"])
        else:
            raise DataError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    return conversations
