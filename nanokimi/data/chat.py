"""Chat: Jinja chat templates in the Hugging Face convention, Kimi's tool-call format, and SFT token masks.

    template = ChatTemplate.load(checkpoint_dir)      # chat_template.jinja, tokenizer_config.json, or DEFAULT
    text = template.render(messages, add_generation_prompt=True, tools=tools)
    ids = tokenizer.encode_chat(text)
    content, tool_calls = parse_tool_calls(reply)      # OpenAI-shaped tool_calls

Rendering matches transformers' apply_chat_template: a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, loop controls, `tojson` without HTML escaping, `raise_exception` and `strftime_now`, the
tokenizer's special tokens (bos_token, eos_token, ...) as variables, and message keys whose value is None
dropped. The default template is Kimi's format:

    <|im_system|>system<|im_middle|>You are ...<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>
    <|im_assistant|>assistant<|im_middle|>Hello!<|im_end|>

with tools declared as <|im_system|>tool_declare<|im_middle|>[JSON schemas]<|im_end|>, an assistant's calls as
<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
<|tool_call_end|>...<|tool_calls_section_end|>, and a tool's result as a `tool` turn "## Return of ID\\n...".
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

from nanokimi.data.corpus import DataError
from nanokimi.data.tokenizer import TOKENIZER_CONFIG, TokenizerBase

TEMPLATE_FILE = "chat_template.jinja"
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN, TOOL_CALL_END = "<|tool_call_begin|>", "<|tool_call_end|>"
TOOL_CALL_ARGUMENTS = "<|tool_call_argument_begin|>"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

DEFAULT_TEMPLATE = """\
{%- macro text_of(content) -%}
{%- if content is string -%}
{{ content }}
{%- elif content is not none -%}
{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
<|im_user|>user<|im_middle|>
{%- elif message['role'] == 'assistant' -%}
<|im_assistant|>assistant<|im_middle|>
{%- elif message['role'] == 'system' or message['role'] == 'tool' -%}
<|im_system|>{{ message['role'] }}<|im_middle|>
{%- else -%}
{{ raise_exception("unknown role '" ~ message['role'] ~ "': use system, user, assistant or tool") }}
{%- endif -%}
{%- if message['role'] == 'tool' -%}
## Return of {{ message['tool_call_id'] }}{{ '\\n' }}
{%- endif -%}
{{ text_of(message['content']) }}
{%- if message['role'] == 'assistant' and message['tool_calls'] -%}
<|tool_calls_section_begin|>
{%- for call in message['tool_calls'] -%}
{%- set arguments = call['function']['arguments'] -%}
<|tool_call_begin|>{{ call['id'] or 'functions.' ~ call['function']['name'] ~ ':' ~ loop.index0 -}}
<|tool_call_argument_begin|>{{ arguments if arguments is string else arguments | tojson }}<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""


class ToolCallError(DataError):
    """The model wrote a tool-call section that cannot be read; the message says which call and why."""


def _environment():
    """The Jinja environment transformers renders chat templates in (same options, filters and globals)."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise DataError("chat templates need jinja2: pip install 'nanokimi[chat]'.") from e

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text in some templates): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A Jinja chat template plus the special-token variables (bos_token, eos_token, ...) it may use."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, variables: dict | None = None):
        environment = _environment()  # DataError when jinja2 is missing
        import jinja2

        self.source = source
        self.variables = dict(variables or {})
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"the chat template does not parse (line {e.lineno}: {e.message}).") from e

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ChatTemplate":
        """The template stored with a checkpoint: chat_template.jinja, else tokenizer_config.json's chat_template
        (a string, or a list of {name, template} where "default" wins), else DEFAULT_TEMPLATE."""
        directory = Path(directory)
        config = {}
        if (directory / TOKENIZER_CONFIG).is_file():
            try:
                config = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{directory / TOKENIZER_CONFIG} is not valid JSON ({e.msg}).") from e
        variables = {k: _content(config[k]) for k in SPECIAL_TOKEN_KEYS if _content(config.get(k)) is not None}
        if (directory / TEMPLATE_FILE).is_file():
            return cls((directory / TEMPLATE_FILE).read_text(encoding="utf-8"), variables)
        stored = config.get("chat_template")
        if isinstance(stored, list):
            named = {t.get("name"): t.get("template") for t in stored if isinstance(t, dict)}
            stored = named.get("default", next(iter(named.values()), None))
        if isinstance(stored, str):
            return cls(stored, variables)
        return cls(DEFAULT_TEMPLATE, variables)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write chat_template.jinja (transformers reads it too)."""
        path = Path(directory) / TEMPLATE_FILE
        path.write_text(self.source, encoding="utf-8")
        return path

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **variables) -> str:
        """messages ({"role", "content", ...} dicts, OpenAI style) -> the prompt text. add_generation_prompt ends
        it with the opening of an assistant turn; tools are JSON schemas ({"type": "function", "function": ...})."""
        import jinja2

        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise DataError("messages must be a list of dicts like {\"role\": \"user\", \"content\": \"Hi\"}.")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise DataError("tools must be a list of JSON-schema dicts like {\"type\": \"function\", \"function\": "
                            "{\"name\": ..., \"parameters\": ...}}.")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.variables, **variables})
        except jinja2.TemplateError as e:
            raise DataError(f"chat template: {e}") from e


def _content(entry) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


_CALL_ID = re.compile(r"^(?:functions\.)?(?P<name>.+?)(?::\d+)?$", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Kimi's tool-call section -> (content before it, tool_calls in OpenAI's shape):

        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}

    Text without a section comes back whole with no calls. A section cut off before
    <|tool_calls_section_end|> is read up to its last complete call. Raises ToolCallError naming the call
    when one has no argument marker, is not closed, or its arguments are not valid JSON.
    """
    start = text.find(TOOL_CALLS_BEGIN)
    if start < 0:
        return text, []
    section = text[start + len(TOOL_CALLS_BEGIN):]
    end = section.find(TOOL_CALLS_END)
    if end >= 0:
        section = section[:end]
    calls = []
    pieces = section.split(TOOL_CALL_BEGIN)[1:]
    for index, piece in enumerate(pieces):
        body, closed, _ = piece.partition(TOOL_CALL_END)
        if not closed and end < 0 and index == len(pieces) - 1:
            break  # generation stopped inside the last call: keep the complete ones
        call_id, has_arguments, arguments = body.partition(TOOL_CALL_ARGUMENTS)
        call_id, arguments = call_id.strip(), arguments.strip()
        where = f"tool call {index} ({call_id or 'no id'})"
        if not has_arguments:
            raise ToolCallError(f"{where} has no {TOOL_CALL_ARGUMENTS} before its arguments.")
        if not closed:
            raise ToolCallError(f"{where} is not closed with {TOOL_CALL_END}.")
        try:
            json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"{where}: arguments are not valid JSON ({e.msg} at character {e.pos}): "
                                f"{arguments[:120]!r}") from None
        name = _CALL_ID.match(call_id).group("name") if call_id else ""
        if not name:
            raise ToolCallError(f"{where} names no function; expected functions.NAME:INDEX before the arguments.")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return text[:start], calls


class ToolCallStream:
    """A streamed reply split into content that can be shown at once and, when it ends, tool calls:

        stream = ToolCallStream()
        for delta in pieces: send(stream.feed(delta))        # content before any tool-call section
        rest, tool_calls = stream.finish()                    # parse_tool_calls on the whole reply

    A tail that could be the start of <|tool_calls_section_begin|> is held back until the next delta decides.
    The content pieces joined with `rest` equal parse_tool_calls(whole reply)[0].
    """

    def __init__(self):
        self.text, self.sent, self.in_section = "", 0, False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_section:
            return ""
        start = self.text.find(TOOL_CALLS_BEGIN, max(self.sent - len(TOOL_CALLS_BEGIN), 0))
        if start >= 0:
            self.in_section = True
            end = start
        else:
            end = len(self.text) - partial_marker_length(self.text, TOOL_CALLS_BEGIN)
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def finish(self) -> tuple[str, list[dict]]:
        """(content not returned yet, tool calls). Raises ToolCallError like parse_tool_calls."""
        content, calls = parse_tool_calls(self.text)
        return content[self.sent:], calls


def partial_marker_length(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def encode_conversation(tokenizer: TokenizerBase, template: ChatTemplate, messages: list[dict],
                        tools: list[dict] | None = None, train_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and a mask of the tokens to learn: every assistant turn's text with
    its end (<|im_end|>) when train_on="assistant", every token when "all".

    Each assistant turn's span is the text render(messages[:i+1]) adds to render(messages[:i],
    add_generation_prompt=True); the pieces are tokenized separately, so a span boundary is a token boundary.
    """
    if train_on not in ("assistant", "all"):
        raise DataError(f"train_on={train_on!r}: choose 'assistant' (loss on assistant turns) or 'all'.")
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, tools=tools)
        upto = template.render(messages[:i + 1], add_generation_prompt=False, tools=tools)
        if not (prompt.startswith(done) and upto.startswith(prompt)):
            raise DataError("the chat template does not render conversations prefix by prefix (an earlier turn "
                            "changes when a later one is added), so assistant turns cannot be located; use "
                            "train_on='all' or a template without look-ahead.")
        pieces += [(prompt[len(done):], False), (upto[len(prompt):], True)]
        done = upto
    whole = template.render(messages, add_generation_prompt=False, tools=tools)
    if not whole.startswith(done):
        raise DataError("the chat template changes earlier turns when the conversation ends; cannot mask it.")
    pieces.append((whole[len(done):], False))
    ids: list[int] = []
    mask: list[bool] = []
    for text, learn in pieces:
        piece_ids = tokenizer.encode_chat(text)
        ids += piece_ids
        mask += [learn or train_on == "all"] * len(piece_ids)
    return ids, mask
