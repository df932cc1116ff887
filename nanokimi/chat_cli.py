"""`nanokimi chat CKPT`: an interactive terminal chat that streams the reply token by token.

The conversation is kept and rendered with the checkpoint's chat template on every turn. Commands:
/reset (forget the conversation), /system TEXT (new system prompt, conversation reset), /exit (or Ctrl-D).
Ctrl-C during a reply stops that reply and keeps the part already written; Ctrl-C at the prompt clears it.

Replies are streamed from the engine of nanokimi.infer.LLM.
"""
from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from nanokimi.data import load_tokenizer
from nanokimi.data.chat import ChatTemplate, ToolCallError, parse_tool_calls, partial_marker_length
from nanokimi.data.tokenizer import END_OF_TURN

HELP = "commands: /reset  /system TEXT  /exit   (Ctrl-C stops a reply, Ctrl-D leaves)"


class EngineReplies:
    """Streams replies through nanokimi.infer's Engine (one request at a time, aborted on Ctrl-C)."""

    def __init__(self, llm, params):
        self.engine, self.params = llm.engine, params

    def __call__(self, prompt_ids: list[int]) -> Iterator[str]:
        request_id, sent, finished = uuid.uuid4().hex, "", False
        self.engine.add_request(request_id, prompt_ids, self.params)
        try:
            while not finished and self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    text = output.outputs[0].text.split(END_OF_TURN)[0]
                    if not output.finished:  # hold back an incomplete character or a start of <|im_end|>
                        text = text.rstrip("\ufffd")
                        text = text[:len(text) - partial_marker_length(text, END_OF_TURN)]
                    if len(text) > len(sent):
                        yield text[len(sent):]
                        sent = text
                    finished = output.finished
        finally:
            if not finished:
                self.engine.abort(request_id)


def chat_loop(reply: Callable[[list[dict]], Iterator[str]], lines: Iterable[str], write: Callable[[str], None],
              system: str | None = None) -> list[dict]:
    """The REPL over `lines` (user inputs): runs commands, streams each reply through `write`, and returns the
    conversation at the end. `reply(messages)` yields the assistant's text in pieces."""

    def fresh() -> list[dict]:
        return [{"role": "system", "content": system}] if system else []

    messages = fresh()
    for line in lines:
        line = line.rstrip("\r\n")
        command, _, rest = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = fresh()
            write("(conversation cleared)\n")
            continue
        if command == "/system":
            system = rest.strip() or None
            messages = fresh()
            write(f"(system prompt {'set' if system else 'removed'}; conversation cleared)\n")
            continue
        if command.startswith("/"):
            write(HELP + "\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in reply(messages):
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
        answer = {"role": "assistant", "content": "".join(pieces)}
        try:
            content, calls = parse_tool_calls(answer["content"])
        except ToolCallError as e:
            content, calls = answer["content"], []
            write(f"(unreadable tool call: {e})\n")
        if calls:
            answer = {"role": "assistant", "content": content, "tool_calls": calls}
            for call in calls:
                write(f"(tool call {call['id']}: {call['function']['name']}({call['function']['arguments']}))\n")
        messages.append(answer)
    return messages


def terminal_lines(prompt: str = "you> ") -> Iterator[str]:
    """Lines typed at the terminal (Ctrl-C clears the line, Ctrl-D ends), or piped in (no prompt shown)."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input(prompt)
        except KeyboardInterrupt:
            print(f"\n{HELP}", file=sys.stderr)
        except EOFError:
            print()
            return


def load_chat(ckpt: str, device: str = "auto", max_new_tokens: int = 512, temperature: float = 0.7,
              top_p: float = 0.95, top_k: int = 0, seed: int | None = None, repetition_penalty: float = 1.0):
    """(reply(messages) -> pieces, description) for the checkpoint: its tokenizer, template and model."""
    from nanokimi.checkpoint import resolve_checkpoint
    from nanokimi.infer import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            repetition_penalty=repetition_penalty)  # bad values fail before the model loads
    path = resolve_checkpoint(ckpt)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, template = load_tokenizer(path), ChatTemplate.load(path)
    llm = LLM(str(path), device=device, tokenizer=tokenizer, compile=False)  # no compile wait before the answer
    params.stop_token_ids = sorted(tokenizer.stop_ids)
    replies = EngineReplies(llm, params)
    template_name = "stored" if template.source != ChatTemplate().source else "default Kimi-style"

    def reply(messages: list[dict]) -> Iterator[str]:
        return replies(tokenizer.encode_chat(template.render(messages, add_generation_prompt=True)))

    return reply, f"{Path(path)} on {device} (engine, {template_name} template)"


def run_chat(args) -> int:
    reply, what = load_chat(args.ckpt, args.device, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                            args.seed, args.repetition_penalty)
    print(f"chatting with {what}. {HELP}", file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(reply, terminal_lines(), write, system=args.system)
    return 0


def add_chat_args(parser):
    parser.add_argument("ckpt", metavar="CKPT", help="run folder or checkpoint folder")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 makes tokens of the conversation so far less likely (1 = off; docs/engine.md)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    parser.set_defaults(func=run_chat)
    return parser
