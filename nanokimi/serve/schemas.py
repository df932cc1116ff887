"""OpenAI request bodies as pydantic models: strict types, unknown fields refused, so a bad body gets a 400
that names the field. Fields OpenAI defines but nanokimi does not implement are accepted only at their
neutral value (e.g. echo=false), and refused by name otherwise."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)  # not OpenAI's: vLLM's extra field, 1 = off
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's form) -> bias in [-100, 100]
    ignore_eos: bool = False  # not OpenAI's: vLLM's extra field, the end-of-text ids do not end a sample
    top_k: int = Field(0, ge=0)  # not OpenAI's: vLLM's extra field, the k most likely tokens only (0 = off)
    min_tokens: int = Field(0, ge=0)  # not OpenAI's: vLLM's extra field, no end before this many tokens

    @model_validator(mode="after")
    def _checks(self):
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit() or not -100 <= bias <= 100:
                raise _field_error("logit_bias", "logit_bias maps token ids (strings of digits) to biases in "
                                   f"[-100, 100]; got {token!r}: {bias}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or any(not s for s in stops):
            raise _field_error("stop", "stop must be at most 16 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "stream_options is only allowed with stream=true")
        return self

    @property
    def token_bias(self) -> dict[int, float] | None:
        return {int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise _field_error("prompt", "send one prompt per request (a string or a list of token ids); "
                                   "use n for several samples")
            self.prompt = self.prompt[0]
        if self.echo:
            raise _field_error("echo", "echo is not supported by nanokimi serve")
        if self.best_of not in (None, self.n):
            raise _field_error("best_of", "best_of is not supported by nanokimi serve (use n)")
        if self.suffix:
            raise _field_error("suffix", "suffix is not supported by nanokimi serve")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "top_logprobs needs logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class FieldError(ValueError):
    """A request field is invalid; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _field_error(param: str, message: str) -> FieldError:
    return FieldError(param, message)
