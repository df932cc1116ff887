"""`nanokimi serve` end to end: the real Engine on a tiny model behind uvicorn on 127.0.0.1, driven by the
official openai client and raw httpx. One server per module (a second for admission)."""
import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (the test extra)")
pytest.importorskip("fastapi", reason="nanokimi serve needs the serve extra")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from nanokimi.data.chat import ChatTemplate  # noqa: E402
from nanokimi.infer import LLM, SamplingParams  # noqa: E402
from nanokimi.serve.app import ServeOptions, Server, create_app, default_model_name  # noqa: E402
from nanokimi.serve.run import BackgroundServer  # noqa: E402
from serve_util import make_checkpoint  # noqa: E402

PROMPT = "def load(fp, *, cls=None"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(ckpt):
    server = Server.load(str(ckpt), ServeOptions(device="cpu", max_cache_tokens=2048, max_step_tokens=256,
                                                 kv_offload_gb=0.01))
    with BackgroundServer(create_app(server)) as bg:
        yield bg, server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(ckpt):
    """The same checkpoint through LLM.generate, for equality checks."""
    return LLM(str(ckpt), device="cpu", max_cache_tokens=2048)


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def gauge(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def sse_events(raw: str) -> list[str]:
    """The data payloads of an SSE body; asserts every frame is `data: ...` followed by a blank line."""
    assert raw.endswith("\n\n"), raw[-80:]
    frames = raw[:-2].split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    return [f[len("data: "):] for f in frames]


def test_models_health_and_metrics_exposition(served, client):
    bg, server = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(bg.url + "/health").json() == {"status": "ok"}
    m = metrics(bg.url)
    assert gauge(m, "nanokimi_num_requests_running") == 0
    assert gauge(m, "nanokimi_cache_blocks_total", tier="gpu") == 2048 // 16


def test_the_default_model_name_is_the_run_folders_name(tmp_path):
    step = tmp_path / "runs" / "tiny" / "checkpoints" / "step-20"
    step.mkdir(parents=True)
    assert default_model_name(step) == "tiny"  # what `nanokimi serve runs/tiny` resolves to
    assert default_model_name(tmp_path / "runs" / "tiny" / "checkpoint") == "tiny"
    assert default_model_name(tmp_path / "kl-nk") == "kl-nk"


def test_serve_refuses_a_taken_or_invalid_port_in_one_line_before_loading(ckpt, capsys):
    import socket

    from nanokimi.cli import main
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(ckpt), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--port", "-1"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


def test_greedy_completion_equals_llm_generate_and_usage_counts_real_tokens(client, reference):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    want = reference.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPT))
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    by_ids = client.completions.create(model="tiny", prompt=reference.tokenizer.encode(PROMPT), max_tokens=24,
                                       temperature=0)
    assert by_ids.choices[0].text == got.choices[0].text


def test_penalties_and_logit_bias_equal_llm_generate(client, reference):
    """OpenAI's presence/frequency penalties and logit_bias (and vLLM's repetition_penalty) reach the engine:
    the same greedy text as LLM.generate with the same SamplingParams; a banned token never appears."""
    plain = reference.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
    banned = plain.outputs[0].token_ids[0]
    params = SamplingParams(max_tokens=16, temperature=0, presence_penalty=0.5, frequency_penalty=1.0,
                            repetition_penalty=1.2, logit_bias={banned: -100})
    want = reference.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, presence_penalty=0.5,
                                    frequency_penalty=1.0, logit_bias={str(banned): -100},
                                    extra_body={"repetition_penalty": 1.2})
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    assert banned not in want.token_ids and want.token_ids != plain.outputs[0].token_ids


def test_greedy_chat_equals_llm_generate_on_the_rendered_template(ckpt, client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is JSON?"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    prompt = ChatTemplate.load(ckpt).render(messages, add_generation_prompt=True)
    ids = reference.tokenizer.encode_chat(prompt)
    assert reference.tokenizer.token_to_id("<|im_end|>") in ids  # the template's tokens are single ids
    want = reference.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=20, temperature=0),
                              use_tqdm=False)[0]
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_streaming_equals_non_streaming_with_usage_last_and_done(served, client):
    bg, _ = served
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    raw = httpx.post(bg.url + "/v1/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == full.usage.model_dump(exclude_none=True)
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == full.choices[0].text
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == full.choices[0].finish_reason
    assert len(chunks) > 3  # really streamed, not one frame at the end

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=16, temperature=0, stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=16, temperature=0)
    assert text == again.choices[0].message.content


def test_n_samples_with_a_seed_are_reproducible(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, n=2, seed=7)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == b.usage.completion_tokens
    stream = client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts, usage = ["", ""], None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [c.text for c in a.choices] and usage.completion_tokens == a.usage.completion_tokens


def test_stop_strings_cut_the_text_in_both_modes(client):
    run_on = {"ignore_eos": True}  # a random model may end early on another CPU's rounding: the text must be long
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0,
                                     extra_body=run_on).choices[0].text
    assert len(free) > 12, free
    stop = free[8:11]
    expected = free[:free.index(stop)]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "\x00zz"],
                                    extra_body=run_on)
    assert got.choices[0].text == expected and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                         stream=True, extra_body=run_on)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_top_k_one_samples_the_greedy_text(client):
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=5)
    assert {c.text for c in client.completions.create(**kwargs, extra_body={"top_k": 1}).choices} == {greedy}
    assert {c.text for c in client.completions.create(**kwargs).choices} != {greedy}  # without it: samples differ
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"top_k": -1})


def test_min_tokens_holds_back_the_end_of_text(client, reference):
    end = {str(reference.tokenizer.eot_id): 100}
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logit_bias=end,
                                    extra_body={"min_tokens": 4})
    assert got.choices[0].finish_reason == "stop" and 4 <= got.usage.completion_tokens <= 5
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"min_tokens": 3})


def test_ignore_eos_runs_past_the_end_of_text(client, reference):
    """logit_bias makes the end-of-text id the certain first token: the sample ends there, or with vLLM's
    ignore_eos it runs on to max_tokens."""
    end = {str(reference.tokenizer.eot_id): 100}
    stopped = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias=end)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens <= 1
    ran_on = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias=end,
                                       extra_body={"ignore_eos": True})
    assert ran_on.choices[0].finish_reason == "length" and ran_on.usage.completion_tokens == 5


def test_logprobs_have_one_entry_per_token(client):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == got.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(v, abs=1e-4)  # greedy: the chosen is the best
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)


BAD = [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 5', 400, None),
    ("/v1/completions", b'["not", "an", "object"]', 400, None),
    ("/v1/completions", b'{"max_tokens": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -0.5}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", b'{"prompt": "x", "stop": [""]}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "x", "max_tokns": 5}', 400, "max_tokns"),
    ("/v1/completions", b'{"prompt": [1, 2, 99999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "presence_penalty": 2.5}', 400, "presence_penalty"),
    ("/v1/completions", b'{"prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"a": 1}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999": 1}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 101}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400,
     "top_logprobs"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_errors_naming_the_field(served, path, body, status, param):
    bg, _ = served
    r = httpx.post(bg.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_prompt_longer_than_the_context_huge_body_and_unknown_route(served, client):
    bg, server = served
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[i % 500 + 1 for i in range(600)], max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    r = httpx.post(bg.url + "/v1/completions", content=b'{"prompt": "' + b"a" * (10 << 20) + b'"}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(bg.url + "/v1/nothing").status_code == 404
    ok = client.completions.create(model="tiny", prompt="x", max_tokens=2)  # still serving
    assert ok.usage.completion_tokens >= 1


async def _one_stream(url: str, i: int) -> tuple[int, str]:
    body = {"model": "tiny", "prompt": f"{PROMPT} {i % 8}", "max_tokens": 8 + i % 5, "temperature": 0.8,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(url + "/v1/completions", json=body)
        return r.status_code, r.text


def test_64_concurrent_streams_complete_once_and_leave_the_cache_free(served):
    bg, server = served

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(_one_stream(bg.url, i) for i in range(64))), timeout=240)

    results = asyncio.run(main())
    for status, text in results:
        assert status in (200, 429), text
        if status == 200:
            events = sse_events(text)
            assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
            chunks = [json.loads(e) for e in events[:-1]]
            finals = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"] is not None]
            assert len(finals) == 1  # finished exactly once
            assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert sum(s == 200 for s, _ in results) > 0
    m = metrics(bg.url)
    assert gauge(m, "nanokimi_num_requests_running") == 0 and gauge(m, "nanokimi_num_requests_waiting") == 0
    for tier in ("gpu", "cpu"):
        assert gauge(m, "nanokimi_cache_blocks_free", tier=tier) == gauge(m, "nanokimi_cache_blocks_total", tier=tier)


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(served):
    bg, server = served
    before = gauge(metrics(bg.url), "nanokimi_requests_finished_total", reason="abort")
    # greedy: this prompt's 400-token continuation has no end token, so only the abort can finish it early
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", bg.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert got[0].startswith("data: ")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(bg.url)
        if gauge(m, "nanokimi_num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert gauge(m, "nanokimi_num_requests_running") == 0
    assert gauge(m, "nanokimi_cache_blocks_free", tier="gpu") == gauge(m, "nanokimi_cache_blocks_total", tier="gpu")
    assert gauge(m, "nanokimi_requests_finished_total", reason="abort") == before + 1
    stats = server.loop.snapshot()["raw"]
    assert stats["requests_running"] == 0 and stats["cache_blocks_free"] == stats["cache_blocks_total"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_16_block_pool_serves_a_resent_prompt_from_the_cpu_tier(ckpt, tmp_path, device):
    """A server whose GPU pool (16 blocks) cannot keep a 200-token prompt while three others run: the resend
    is served from the CPU tier and /metrics counts it per tier; greedy still equals LLM.generate, a stream
    completes, and the pool is free afterwards. On CUDA: decode CUDA graphs and a pinned pool. (Exact
    equality of tier hits with recomputation is tested in test_kv_tiers.py.)"""
    server = Server.load(str(ckpt), ServeOptions(device=device, max_cache_tokens=256, kv_offload_gb=0.05,
                                                 kv_disk=str(tmp_path / "kv")))
    reference = LLM(str(ckpt), device=device, max_cache_tokens=4096)
    long_prompt = [(11 * j) % 500 + 1 for j in range(200)]
    with BackgroundServer(create_app(server)) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
        want = reference.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
        assert got.choices[0].text == want.outputs[0].text
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stream=True) if c.choices)
        assert text == got.choices[0].text
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4, temperature=0)
        for i in range(3):  # push the long prompt's blocks out of the 16-block GPU pool
            client.completions.create(model="tiny", prompt=[(7 * j + i) % 500 + 1 for j in range(200)], max_tokens=2)
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4, temperature=0)
        m = metrics(bg.url)
    assert gauge(m, "nanokimi_prefix_cache_hits_total", tier="cpu") >= 176
    assert gauge(m, "nanokimi_prefix_cache_hits_total", tier="disk") == 0  # the CPU pool was large enough
    assert gauge(m, "nanokimi_cache_blocks_cached", tier="cpu") > 0
    assert gauge(m, "nanokimi_cache_blocks_free", tier="gpu") == gauge(m, "nanokimi_cache_blocks_total", tier="gpu")


def test_a_speculative_server_answers_greedy_requests_as_the_plain_engine(ckpt):
    """`nanokimi serve --speculative ngram`: prompt-lookup drafts verified in one forward; a prompt that repeats
    itself gets drafts, and the greedy text equals LLM.generate's without speculation."""
    server = Server.load(str(ckpt), ServeOptions(device="cpu", max_cache_tokens=2048, speculative="ngram",
                                                 num_speculative_tokens=3))
    reference = LLM(str(ckpt), device="cpu", max_cache_tokens=2048)
    ids = reference.tokenizer.encode(PROMPT)
    first = reference.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0].outputs[0]
    repeated = ids + list(first.token_ids) + ids  # its end occurs earlier in the prompt: the lookup drafts `first`
    with BackgroundServer(create_app(server)) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for prompt in (ids, repeated):
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
            want = reference.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
                max_tokens=24, temperature=0), use_tqdm=False)[0]
            assert got.choices[0].text == want.outputs[0].text
    assert server.loop.engine.stats()["spec_draft_tokens"] > 0


def test_streamed_tool_calls_become_openai_tool_call_deltas():
    """A chat stream offered tools: content before Kimi's tool-call section streams as it comes, the section turns
    into `tool_calls` deltas and finish_reason "tool_calls" at the end; joined, the stream says what the
    non-streamed reply says (parse_tool_calls). A malformed section stays content."""
    from nanokimi.data.chat import TOOL_CALL_ARGUMENTS, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, \
        TOOL_CALLS_END, ToolCallStream, parse_tool_calls
    from nanokimi.serve.app import _tool_stream_choice

    def stream(reply: str, size: int = 5) -> list[dict]:
        s, pieces = ToolCallStream(), [reply[i:i + size] for i in range(0, len(reply), size)]
        return [_tool_stream_choice(s, 0, piece, None, "stop" if i == len(pieces) - 1 else None)
                for i, piece in enumerate(pieces)]

    calls = (f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}functions.get_weather:0{TOOL_CALL_ARGUMENTS}{{\"city\": \"Paris\"}}"
             f"{TOOL_CALL_END}{TOOL_CALL_BEGIN}functions.time:1{TOOL_CALL_ARGUMENTS}{{}}{TOOL_CALL_END}{TOOL_CALLS_END}")
    reply = "Let me check the weather." + calls
    chunks = stream(reply)
    content, want = parse_tool_calls(reply)
    assert "".join(c["delta"]["content"] for c in chunks) == content
    assert chunks[2]["delta"]["content"]  # content went out before the section ended
    assert chunks[-1]["finish_reason"] == "tool_calls"
    assert chunks[-1]["delta"]["tool_calls"] == [{"index": j, **call} for j, call in enumerate(want)]
    assert [c["function"]["name"] for c in want] == ["get_weather", "time"]
    assert all("tool_calls" not in c["delta"] for c in chunks[:-1])
    plain = stream("No tools needed.")
    assert "".join(c["delta"]["content"] for c in plain) == "No tools needed." and plain[-1]["finish_reason"] == "stop"
    broken = f"Hi{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}functions.f:0{TOOL_CALL_ARGUMENTS}{{not json{TOOL_CALL_END}"
    chunks = stream(broken)
    assert "".join(c["delta"]["content"] for c in chunks) == broken and chunks[-1]["finish_reason"] == "stop"
