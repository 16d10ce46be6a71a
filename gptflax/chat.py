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
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if not add_generation_prompt:
            return text
        text += "<|im_start|>assistant\n"
        return text + ("<think>\n\n</think>\n\n" if self.think_tags and not thinking else "")


SMOLLM2 = ChatTemplate("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
QWEN2_5 = ChatTemplate("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
QWEN3 = ChatTemplate(think_tags=True)
