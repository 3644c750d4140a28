"""Which chat template a run trains with: the tokenizer's own, a built-in, or a jinja file.

The chosen template is set on the tokenizer before any data is rendered, so the tokenizer saved in
the run (and `chat_template.jinja`) carries exactly the template training used.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import DataError

# ChatML layout for base models without a template. Turns end with the tokenizer's own eos token, so no
# token is added (no embedding resize) and the model learns to stop on a token generation already knows.
CHATML_EOS = (
    "{{ bos_token if bos_token else '' }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILT_IN = {"chatml": CHATML_EOS}


def chosen_template(tokenizer, choice: str | None) -> str | None:
    """The template text `choice` selects, without changing the tokenizer (None: an error is due)."""
    if choice in (None, "tokenizer"):
        return tokenizer.chat_template or (CHATML_EOS if choice is None else None)
    if choice in BUILT_IN:
        return BUILT_IN[choice]
    path = Path(choice).expanduser()
    return path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else None


def apply_chat_template_choice(tokenizer, choice: str | None, needs_template: bool) -> str:
    """Set the template on the tokenizer; returns a short description of the choice for the run log."""
    if choice is None and not needs_template:
        return "none (plain text data)"
    if choice in (None, "tokenizer"):
        if tokenizer.chat_template:
            return "the tokenizer's own"
        if choice == "tokenizer" and needs_template:
            raise DataError(
                "data.chat_template: `tokenizer` was asked for, but the tokenizer has no chat template; "
                f"use one of {', '.join(BUILT_IN)} or a .jinja file"
            )
        tokenizer.chat_template = CHATML_EOS
        return "chatml (built-in fallback: the tokenizer has none)"
    if choice in BUILT_IN:
        tokenizer.chat_template = BUILT_IN[choice]
        return choice
    path = Path(choice).expanduser()
    if path.suffix != ".jinja" or not path.is_file():
        raise DataError(
            f"data.chat_template: {choice!r} is neither `tokenizer`, one of {', '.join(BUILT_IN)}, "
            "nor an existing .jinja file"
        )
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    return str(path)
