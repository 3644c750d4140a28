"""The Ollama Modelfile of an exported GGUF: FROM the file, a TEMPLATE that lays conversations out as the
run's chat template does, and the run's stop tokens.

Ollama's templates are Go templates, not Jinja. The run's template is rendered with marker contents to
find what it writes around a system, a user and an assistant message, before the first message when that
is not a system message (bos, a default system prompt the template inserts by itself) and as the
generation prompt; the Go template writes the same pieces around each message. The layout is checked by
rendering conversations both ways (marker ones and the run's own); a template that is not a per-message
layout (one that moves the system prompt into the last user turn, or renders a turn by what follows it) is
refused with the first conversation where the two differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.data.encode import conversation_closing
from lorakit.errors import LorakitError

MARK = {role: f"\x10{role.upper()}\x10" for role in ("system", "user", "assistant")}


@dataclass(frozen=True)
class Layout:
    head: str  # before the first message when it is not a system message
    pre: dict[str, str]  # per role, before the content (the system's includes what precedes it)
    post: dict[str, str]
    generation: str

    def render(self, messages: list[dict]) -> str:
        """What the Go template writes for `messages`, computed here (the check against the chat template)."""
        text = "" if messages and messages[0]["role"] == "system" else self.head
        for m in messages:
            text += self.pre[m["role"]] + m["content"] + self.post[m["role"]]
        return text + self.generation

    def go_template(self) -> str:
        """No `{{-` trimming anywhere: the pieces' own newlines are part of the layout."""
        branches = "{{ else if ".join(
            f'eq .Role "{role}" }}}}{self.pre[role]}{{{{ .Content }}}}{self.post[role]}' for role in self.pre
        )
        return (
            f'{{{{ if or (eq (len .Messages) 0) (ne (index .Messages 0).Role "system") }}}}{self.head}{{{{ end }}}}'
            f"{{{{ range .Messages }}}}{{{{ if {branches}{{{{ end }}}}{{{{ end }}}}{self.generation}"
        )


def layout(tokenizer, conversations: list[list[dict]]) -> Layout:
    """The run's chat template as a per-message layout, checked on marker and the given conversations."""

    def render(messages, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    s, u, a = ({"role": r, "content": MARK[r]} for r in ("system", "user", "assistant"))
    closing = conversation_closing(tokenizer)
    try:
        full = render([s, u, a, u], True)
        p0, rest = full.split(MARK["system"], 1)
        p1, rest = rest.split(MARK["user"], 1)
        p2, rest = rest.split(MARK["assistant"], 1)
        p3, p4 = rest.split(MARK["user"], 1)
        post_user = _strip(render([s, u], False).split(MARK["user"], 1)[1], closing)
        post_assistant = _strip(render([s, u, a], False).split(MARK["assistant"], 1)[1], closing)
        head = render([u, a, u], True).split(MARK["user"], 1)[0]
    except ValueError:  # a marker the template does not render where a per-message layout would
        raise LorakitError(_REFUSAL + "it does not render each message's content once, in order") from None
    pre_user = p3[len(post_assistant) :]
    parts = Layout(
        head=head[: len(head) - len(pre_user)],
        pre={"system": p0, "user": pre_user, "assistant": p2[len(post_user) :]},
        post={"system": p1[: len(p1) - len(pre_user)], "user": post_user, "assistant": post_assistant},
        generation=p4[len(post_user) :],
    )
    checks = [[u], [s, u], [u, a, u], [s, u, a, u]] + conversations
    for messages in checks:
        if parts.render(messages) != render(messages, True):
            shown = [{"role": m["role"], "content": m["content"][:40]} for m in messages]
            raise LorakitError(_REFUSAL + f"the layout differs from the template on {shown}")
    if any(
        "{{" in piece or '"""' in piece
        for piece in (parts.head, parts.generation, *parts.pre.values(), *parts.post.values())
    ):
        raise LorakitError(_REFUSAL + 'its text contains `{{` or `"""`, which a Modelfile cannot quote')
    return parts


_REFUSAL = "the chat template cannot be written as an Ollama TEMPLATE (a per-message layout): "


def _strip(text: str, closing: str) -> str:
    return text[: len(text) - len(closing)] if closing and text.endswith(closing) else text


def modelfile(gguf_name: str, parts: Layout, stops: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{parts.go_template()}"""']
    lines += [f'PARAMETER stop "{_quoted(stop)}"' for stop in stops]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
