"""Chat templates: how a chat model reads a conversation as text.

A conversation is a list of messages, {"role": "system" | "user" | "assistant", "content": ...}.
ChatML (SmolLM2, Qwen2.5, Qwen3) writes each as `<|im_start|>role\\ncontent<|im_end|>\\n` and ends
with `<|im_start|>assistant\\n`, the start of the reply the model writes, which ends with its
`<|im_end|>`. Qwen3 can think first, inside `<think>...</think>`: with thinking off the template
writes that block empty, so the model answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat format: `default_system` comes first in a chat without a system message;
    `end_token` ends a reply; `think_tags` marks a model that can think first (Qwen3)."""

    default_system: str | None = None
    end_token: str = "<|im_end|>"
    think_tags: bool = False

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, thinking: bool = False
    ) -> str:
        """The text of a chat in ChatML, ending with the start of the assistant's reply."""
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"a message's role is system, user or assistant, not {m!r}")
        if self.think_tags:
            messages = _thoughts_kept_after_the_last_question(messages)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if not add_generation_prompt:
            return text
        text += "<|im_start|>assistant\n"
        return text + ("<think>\n\n</think>\n\n" if self.think_tags and not thinking else "")


def _thoughts_kept_after_the_last_question(messages: list[dict]) -> list[dict]:
    """Qwen3's replies as its template writes them: a reply before the last user message loses
    its `<think>...</think>` block (earlier thoughts are not shown again); a reply after it keeps
    the block, written as `<think>\\n...\\n</think>\\n\\n`, and the last one gets an empty block."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last_question = users[-1] if users else len(messages)
    written = []
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "assistant":
            thought = ""
            if "</think>" in content:
                pieces = content.split("</think>")
                thought = pieces[0].rstrip("\n").split("<think>")[-1].strip("\n")
                content = pieces[-1].lstrip("\n")
            if i > last_question and (thought or i == len(messages) - 1):
                content = f"<think>\n{thought}\n</think>\n\n{content}"
            m = {**m, "content": content}
        written.append(m)
    return written


SMOLLM2 = ChatTemplate("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
QWEN2_5 = ChatTemplate("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
QWEN3 = ChatTemplate(think_tags=True)
