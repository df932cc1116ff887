"""Tokenizers (HF JSON and Kimi's tiktoken format), chat templates against transformers, tool calls, masks."""
import json
import random

import pytest

from nanokimi.data import DataError, TiktokenTokenizer, Tokenizer, load_tokenizer
from nanokimi.data.chat import (DEFAULT_TEMPLATE, ChatTemplate, ToolCallError, ToolCallStream, encode_conversation,
                                parse_tool_calls)
from nanokimi.data.tokenizer import CHAT_TOKENS, EOT, KIMI_PATTERN, read_tiktoken_ranks

tiktoken = pytest.importorskip("tiktoken")

SAMPLE = ("Hello world! The quick brown fox jumps over the lazy dog. def f(x):\n    return x + 1\n"
          "It's 12345 o'clock; Ünïcödé, 漢字かな and emoji 😀🚀.\r\n\tTabs  and  spaces.  ") * 8
KIMI_SPECIALS = {"[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4, "<|im_system|>": 6,
                 "<|tool_calls_section_begin|>": 7, "<|tool_calls_section_end|>": 8, "<|tool_call_begin|>": 9,
                 "<|tool_call_argument_begin|>": 10, "<|tool_call_end|>": 11, "<|im_middle|>": 13}


def write_kimi_tokenizer(directory, vocab_size=330, chat_template=DEFAULT_TEMPLATE, offset_specials=True):
    """A Kimi-format tokenizer the way Kimi's checkpoints ship it: tiktoken.model (ranks trained here on SAMPLE)
    and tokenizer_config.json with special tokens by id just above the ranks, eos [EOS], and a chat template."""
    from tiktoken._educational import bpe_train

    gpt2_like = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ranks = bpe_train(SAMPLE, vocab_size, gpt2_like, visualise=None)
    directory.mkdir(parents=True, exist_ok=True)
    import base64
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    (directory / "tiktoken.model").write_text("".join(lines))
    n = len(ranks)
    decoder = {str(n + i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                            "single_word": False} for t, i in KIMI_SPECIALS.items()}
    config = {"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]",
              "tokenizer_class": "TikTokenTokenizer", "model_max_length": 1048576}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ranks


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kimi_tok")
    write_kimi_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def hf_tok():
    return Tokenizer.train([SAMPLE], vocab_size=400)


def reference_encoding(directory):
    """tiktoken itself, built from the same files by hand, with Kimi's 256 reserved special ids."""
    ranks = read_tiktoken_ranks(directory / "tiktoken.model")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    n = len(ranks)
    names = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + 256)}
    return tiktoken.Encoding("reference", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def texts():
    rng = random.Random(0)
    pool = [chr(c) for c in (*range(0x20, 0x7F), *range(0xC0, 0x180), *range(0x4E00, 0x4E40), 0x1F600, 0x1F680)]
    out = ["", " ", "\n\n", "<|im_end|>", "say <|im_end|> then [EOS]", "<|im_user|>user<|im_middle|>hi",
           "HTTPServer's JSONParser don't CamelCase 漢字abc123456", SAMPLE[:300]]
    out += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 80))) for _ in range(40)]
    return out


def test_tiktoken_format_round_trips_and_agrees_with_tiktoken(kimi_dir):
    tok = load_tokenizer(kimi_dir)
    assert isinstance(tok, TiktokenTokenizer)
    ref = reference_encoding(kimi_dir)
    n = len(read_tiktoken_ranks(kimi_dir / "tiktoken.model"))
    assert tok.vocab_size == n + 256 == ref.n_vocab
    assert tok.eot_id == n + KIMI_SPECIALS["[EOS]"]
    assert tok.stop_ids == {n + KIMI_SPECIALS["[EOS]"], n + KIMI_SPECIALS["<|im_end|>"]}
    for text in texts():
        ids = tok.encode(text)
        assert ids == ref.encode(text, disallowed_special=())
        assert tok.decode(ids) == text
        assert all(i < n for i in ids), "plain text never produces a special id"
        assert tok.encode_chat(text) == ref.encode(text, allowed_special="all")
    assert tok.encode_batch(["a b", "<|im_end|>"]) == [tok.encode("a b"), tok.encode("<|im_end|>")]


def test_special_tokens_are_single_ids_only_in_rendered_chat(kimi_dir, hf_tok):
    tiktok = load_tokenizer(kimi_dir)
    for tok in (tiktok, hf_tok):
        for name in ("<|im_end|>", "<|im_user|>", "<|tool_call_begin|>"):
            i = tok.token_to_id(name)
            assert i is not None
            assert tok.encode_chat(name) == [i]
            assert i not in tok.encode(name) and len(tok.encode(name)) > 1
            assert tok.decode([i]) == name
        text = "<|im_user|>user<|im_middle|>2 <|im_end|> 3<|im_end|>"
        ids = tok.encode_chat(text)
        assert ids.count(tok.token_to_id("<|im_end|>")) == 2 and tok.decode(ids) == text


def test_tiktoken_tokenizer_saves_and_reloads(kimi_dir, tmp_path):
    tok = load_tokenizer(kimi_dir)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.special_tokens == tok.special_tokens and again.eot_id == tok.eot_id
    assert again.encode(SAMPLE[:200]) == tok.encode(SAMPLE[:200])
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_TEMPLATE


def test_hf_tokenizer_has_chat_tokens_and_loads_from_a_folder(hf_tok, tmp_path):
    assert [hf_tok.token_to_id(t) for t in (EOT, *CHAT_TOKENS)] == list(range(len(CHAT_TOKENS) + 1))
    hf_tok.save(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, Tokenizer) and tok.eot_id == hf_tok.eot_id
    assert tok.stop_ids == {tok.eot_id, tok.token_to_id("<|im_end|>")}
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "..")


def test_bad_tokenizer_files_name_the_problem(tmp_path):
    write_kimi_tokenizer(tmp_path / "a")
    (tmp_path / "a" / "tiktoken.model").write_text("not-base64!! x\n")
    with pytest.raises(DataError, match="line 1"):
        load_tokenizer(tmp_path / "a")
    write_kimi_tokenizer(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|nope|>"
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="nope"):
        load_tokenizer(tmp_path / "b")


CHATML_TOOLS = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {%- if message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}{{ message.content | default('', true) }}{% endgeneration %}
        {%- if message.tool_calls %}
            {%- for call in message.tool_calls %}
                {{- '\\n<tool_call>\\n' }}{{ {"name": call.function.name, "arguments": call.function.arguments}
                    | tojson(indent=2, sort_keys=true) }}{{ '\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if loop.index0 > ns.last_user + 3 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA_LIKE = """{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}<<SYS>>
{{ message['content'] | trim }}
<</SYS>>

{% else %}[{{ message['role'] | upper }}] {{ message['content'] }}{% if message['role'] == 'assistant' %}\
{{ eos_token }}{% endif %}
{% endif %}{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}{{ strftime_now('%Y') | length }}"""

MESSAGES = [
    {"role": "system", "content": "You are terse. Ünïcödé <ok> & \"quotes\"."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "{\"temperature\": 18}"},
    {"role": "assistant", "content": "It is 18 °C in Paris."},
    {"role": "user", "content": "Thanks!"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, CHATML_TOOLS, LLAMA_LIKE], ids=["kimi", "chatml", "llama"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_rendering_equals_transformers_apply_chat_template(template, add_generation_prompt, with_tools, hf_tok):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tok.hf, bos_token="<s>", eos_token="</s>",
                                                     chat_template=template)
    ours = ChatTemplate(template, {"bos_token": "<s>", "eos_token": "</s>"})
    messages = MESSAGES if template != LLAMA_LIKE else [m for m in MESSAGES if "tool_calls" not in m]
    tools = TOOLS if with_tools else None
    for end in range(1, len(messages) + 1):
        expected = reference.apply_chat_template(messages[:end], tools=tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        assert ours.render(messages[:end], add_generation_prompt=add_generation_prompt, tools=tools) == expected


def test_template_is_loaded_from_the_checkpoint_files(tmp_path):
    assert ChatTemplate.load(tmp_path).source == DEFAULT_TEMPLATE  # nothing stored: Kimi's format
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ eos_token }}D"}],
         "eos_token": {"content": "[EOS]"}}))
    assert ChatTemplate.load(tmp_path).render([]) == "[EOS]D"
    ChatTemplate("F{{ messages | length }}").save(tmp_path)  # chat_template.jinja wins, as in transformers
    assert ChatTemplate.load(tmp_path).render([{"role": "user", "content": "x"}]) == "F1"


def test_template_errors_are_one_line_data_errors():
    with pytest.raises(DataError, match="unknown role 'robot'"):
        ChatTemplate().render([{"role": "robot", "content": "beep"}])
    with pytest.raises(DataError, match="does not parse"):
        ChatTemplate("{% if %}")
    with pytest.raises(DataError, match="list of dicts"):
        ChatTemplate().render("hello")


def test_parse_tool_calls_well_formed_several_and_text_before():
    text = ("Let me check both.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            "<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_call_begin|>"
            " functions.search_web:1 <|tool_call_argument_begin|> {\"q\": \"a:b\", \"n\": [1, 2]} <|tool_call_end|>"
            "<|tool_calls_section_end|>")
    content, calls = parse_tool_calls(text)
    assert content == "Let me check both."
    assert calls == [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "functions.search_web:1", "type": "function",
         "function": {"name": "search_web", "arguments": "{\"q\": \"a:b\", \"n\": [1, 2]}"}},
    ]
    assert parse_tool_calls("no calls here <|im_end|>") == ("no calls here <|im_end|>", [])
    cut = text[:text.index("<|tool_call_begin|> functions.search_web") + 30]  # generation stopped mid-call
    assert [c["function"]["name"] for c in parse_tool_calls(cut)[1]] == ["get_weather"]


def test_parse_tool_calls_malformed_gives_a_clear_error():
    bad = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"x\": 1,}"
           "<|tool_call_end|><|tool_calls_section_end|>")
    with pytest.raises(ToolCallError, match=r"tool call 0 \(functions.f:0\): arguments are not valid JSON"):
        parse_tool_calls(bad)
    with pytest.raises(ToolCallError, match="no <\\|tool_call_argument_begin\\|>"):
        parse_tool_calls("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0 {}<|tool_call_end|>")
    with pytest.raises(ToolCallError, match="not closed"):
        parse_tool_calls("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}"
                         "<|tool_call_begin|>functions.g:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
                         "<|tool_calls_section_end|>")


def test_tool_calls_round_trip_through_the_template():
    template = ChatTemplate()
    calls = [{"id": "functions.add:0", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}},
             {"id": "functions.mul:1", "type": "function", "function": {"name": "mul", "arguments": "{\"b\": [2]}"}}]
    prompt = template.render(MESSAGES[:2], tools=TOOLS)
    assert prompt.startswith("<|im_system|>tool_declare<|im_middle|>" + json.dumps(TOOLS, ensure_ascii=False))
    turn = template.render([*MESSAGES[:2], {"role": "assistant", "content": "Sure.", "tool_calls": calls}],
                           add_generation_prompt=False, tools=TOOLS)
    reply = turn[len(prompt):]
    assert reply.endswith("<|im_end|>")
    assert parse_tool_calls(reply[:-len("<|im_end|>")]) == ("Sure.", calls)


def test_assistant_mask_covers_exactly_the_assistant_turns(kimi_dir, hf_tok):
    for tok in (load_tokenizer(kimi_dir), hf_tok):
        template = ChatTemplate()
        ids, mask = encode_conversation(tok, template, MESSAGES, tools=TOOLS)
        assert ids == tok.encode_chat(template.render(MESSAGES, add_generation_prompt=False, tools=TOOLS))
        learned = [i for i, m in zip(ids, mask) if m]
        end = tok.token_to_id("<|im_end|>")
        first_reply = template.render(MESSAGES[:3], add_generation_prompt=False)[len(template.render(MESSAGES[:2])):]
        expected = tok.encode_chat(first_reply) + tok.encode_chat("It is 18 °C in Paris.<|im_end|>")
        assert learned == expected and learned.count(end) == 2
        runs = [i for i in range(1, len(mask)) if mask[i] != mask[i - 1]]
        assert len(runs) == 4  # two separate assistant spans
        assert all(encode_conversation(tok, template, MESSAGES, train_on="all")[1])


def test_streamed_reply_shows_content_at_once_and_tool_calls_at_the_end():
    reply = ("Checking <|tool_calls are nice <|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
             "<|tool_call_argument_begin|>{\"a\": \"<|\"}<|tool_call_end|><|tool_calls_section_end|>")
    rng = random.Random(0)
    for text in (reply, "plain text ending in <|tool_calls_sec", "x <|tool_calls_section_begin|>"):
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), 6))
            stream, shown = ToolCallStream(), []
            for a, b in zip([0, *cuts], [*cuts, len(text)]):
                shown.append(stream.feed(text[a:b]))
                assert "<|tool_calls_section_begin|>" not in "".join(shown)
            rest, calls = stream.finish()
            assert ("".join(shown) + rest, calls) == parse_tool_calls(text)
    stream = ToolCallStream()
    assert stream.feed("Hello <|tool") == "Hello " and stream.feed("s>") == "<|tools>"
