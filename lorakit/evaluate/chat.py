"""`lorakit chat`: talk to a tuned model in the terminal, with the run's chat template and stop tokens,
replies streamed as they are generated.

Commands: /tuned and /base switch the model that answers (a run's base is the same loaded model with the
adapter switched off: nothing is reloaded), /compare answers each message with both, /reset starts the
conversation again, /save FILE appends the conversation to FILE as one `messages` JSONL example (ready to be
training data), /help, /quit. In /compare mode the tuned model's reply is the one kept in the conversation.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from lorakit.evaluate import compare as evaluate
from lorakit.evaluate import generation
from lorakit.recipe.schema import EvalConfig

HELP = (
    "/tuned  answer with the tuned model    /base  answer with the base model\n"
    "/compare  answer with both             /reset  start the conversation again\n"
    "/save FILE  append the conversation as a `messages` JSONL line    /quit  leave (or Ctrl-D)"
)


class Models:
    """The tuned model and its base, each loaded at most once: a run's base is its adapter switched off."""

    def __init__(self, target: evaluate.Target):
        self.target = target
        self._tuned = self._base = None

    def tuned(self):
        if self._tuned is None:
            ((_, self._tuned),) = evaluate.load_models(self.target, ("tuned",))
        return self._tuned, nullcontext()

    def base(self):
        if self.target.kind == "merged":
            if self._base is None:
                ((_, self._base),) = evaluate.load_models(self.target, ("base",))
            return self._base, nullcontext()
        tuned, _ = self.tuned()
        return tuned, tuned.disable_adapter()


def run(
    target: evaluate.Target, settings: EvalConfig, *, read, write, system: str | None = None, start_with: str = "tuned"
) -> list[dict]:
    """The chat loop: `read(prompt)` returns a line (EOFError ends), `write(text)` shows text. Returns the
    conversation as it stands at the end."""
    tokenizer = evaluate.tokenizer_for(target)
    stops = generation.stop_ids(target.path, tokenizer)
    models = Models(target)
    mode = start_with
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write(f"lorakit chat: {target.path} ({target.kind}); answering with the {mode} model. /help for commands\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return messages
        except UnicodeDecodeError as exc:  # bytes piped in that are not UTF-8: say so, keep the conversation
            write(f"that line is not UTF-8 text (byte {exc.start}); type it again\n")
            continue
        try:  # a locale that decodes stdin with surrogateescape hands the bad bytes on as lone surrogates
            line.encode("utf-8")
        except UnicodeEncodeError as exc:
            write(f"that line is not UTF-8 text (byte {exc.start}); type it again\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/quit", "/exit"):
                return messages
            if command in ("/tuned", "/base", "/compare"):
                mode = command[1:]
                write(f"answering with {'both models' if mode == 'compare' else f'the {mode} model'}\n")
            elif command == "/reset":
                messages = list(start)
                write("conversation cleared\n")
            elif command == "/save":
                write(_save(messages, argument.strip()) + "\n")
            elif command == "/help":
                write(HELP + "\n")
            else:
                write(f"unknown command {command}; /help lists them\n")
            continue
        messages.append({"role": "user", "content": text})
        prompt = generation.prompt_ids(tokenizer, messages)
        kept = None
        for name in ("tuned", "base") if mode == "compare" else (mode,):
            model, context = getattr(models, name)()
            write(f"{name}> ")
            with context:
                reply = generation.stream(model, tokenizer, prompt, stops, settings, write, target.recipe.train.seed)
            write("\n" if reply.stopped else f"\n[no stop token within {settings.max_new_tokens} tokens]\n")
            kept = kept or reply.text
        messages.append({"role": "assistant", "content": kept})


def _save(messages: list[dict], file: str) -> str:
    if not file:
        return "usage: /save FILE"
    if not any(m["role"] == "assistant" for m in messages):
        return "nothing to save yet"
    path = Path(file).expanduser()
    if not path.parent.is_dir():
        return f"cannot save: {path.parent} is not a directory"
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    except OSError as exc:
        return f"cannot save: {exc}"
    return f"saved {sum(m['role'] != 'system' for m in messages)} messages to {path}"
