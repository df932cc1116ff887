"""A toy verifiable task for the RL tests: the prompt is "d=" for a digit d, a response is correct when it starts
with d. A character tokenizer with 16 ids keeps the model tiny, so an untrained model is near chance (1/16)."""
from nanokimi.tasks import Example

CHARS = "0123456789=+- \n"


class CharTokenizer:
    eot_id = len(CHARS)
    vocab_size = len(CHARS) + 1

    @property
    def stop_ids(self) -> set[int]:
        return {self.eot_id}

    def encode(self, text: str) -> list[int]:
        return [CHARS.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(CHARS[i] if i < len(CHARS) else "" for i in ids)


class CopyDigit:
    name = "copy"
    stop = ()

    def __init__(self, per_digit: int = 3):
        self.per_digit = per_digit

    def examples(self, split: str = "test", limit=None) -> list[Example]:
        items = [Example(id=f"{split}/{d}/{i}", question=str(d), answer=str(d), difficulty=1 + d // 5)
                 for i in range(self.per_digit) for d in range(10)]
        return items if limit is None else items[:limit]

    def prompt(self, example) -> str:
        return f"{example.question}="

    def extract(self, response: str):
        return response[:1] or None

    def is_correct(self, response: str, answer: str) -> bool:
        return response[:1] == answer

    def reward(self, response: str, answer: str) -> float:
        return 1.0 if self.is_correct(response, answer) else 0.0


class Flipped(CopyDigit):
    """The same task with the reward's sign flipped: RL must then push accuracy down, not up."""

    def reward(self, response: str, answer: str) -> float:
        return -super().reward(response, answer)


def tiny_model(seed: int = 0):
    import torch

    from nanokimi.config import ModelConfig
    from nanokimi.model import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny-dense", vocab_size=CharTokenizer.vocab_size, hidden_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=64)
    return build_model(cfg)
