"""benchmarks/serve.py's trace synthesis: equal hash ids give equal text, so shared prefixes are really shared."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trace_scaling_and_shared_prefixes(tmp_path):
    bench = load_bench()
    trace = tmp_path / "trace.jsonl"
    lines = [dict(timestamp=1000, input_length=1100, output_length=40, hash_ids=[7, 8, 9]),
             dict(timestamp=3000, input_length=700, output_length=4, hash_ids=[7, 8]),
             dict(timestamp=5000, input_length=600, output_length=4, hash_ids=[5, 6])]
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    got = bench.load_trace(trace, 1, 2, length_scale=0.25, time_scale=2.0, output_scale=0.5, max_input=10_000)
    assert [r["arrival"] for r in got] == [0.0, 1.0]  # from the first replayed line, twice as fast
    assert got[0]["blocks"] == [(7, 128), (8, 47)] and got[0]["max_tokens"] == 2
    tokenizer = bench.make_tokenizer(tmp_path)
    a = "".join(bench.block_text(tokenizer, h, n) for h, n in got[0]["blocks"])
    b = "".join(bench.block_text(tokenizer, h, n) for h, n in bench.load_trace(
        trace, 0, 1, 0.25, 2.0, 1.0, 10_000)[0]["blocks"])
    assert b.startswith(bench.block_text(tokenizer, 7, 128) + bench.block_text(tokenizer, 8, 128))
    assert a.startswith(bench.block_text(tokenizer, 7, 128)) and a != b
    ids = tokenizer.encode(bench.block_text(tokenizer, 7, 128))
    assert abs(len(ids) - 128) <= 16  # about one token per drawn token
    results = [dict(status=200, ttft=0.5, tpot=0.01, completion_tokens=3, prompt_tokens=9),
               dict(status=200, ttft=3.0, tpot=0.01, completion_tokens=3, prompt_tokens=9), dict(status=429)]
    row = bench.summarize(results, [dict(arrival=0.0), dict(arrival=2.0), dict(arrival=4.0)], 2.0, 0.1)
    assert (row["completed"], row["rejected"], row["good_fraction"], row["goodput_rps"]) == (2, 1, 0.3333, 0.25)


def test_the_request_suits_both_servers_and_failures_keep_their_reason():
    """The one body every system gets passes nanokimi's strict schema and, where transformers serve is installed,
    its completion handler's accepted fields. A failed stream keeps why: transformers' `{"error": ...}` frame
    (sent with HTTP 200), a line that is not JSON, or nothing at all."""
    from nanokimi.serve.schemas import CompletionRequest

    bench = load_bench()
    body = bench.request_body("m", "def f(", 7)
    CompletionRequest.model_validate(body)
    try:
        from transformers.cli.serving.completion import CompletionHandler
    except ImportError:  # transformers without its serving extra: nanokimi's half of the check still ran
        CompletionHandler = None
    if CompletionHandler is not None:
        accepted = CompletionHandler._valid_params_class.__mutable_keys__
        assert set(body) <= accepted, set(body) - accepted
    ok = [(0.1, 'data: {"choices": [{"text": "a", "index": 0, "finish_reason": null}]}'), (0.2, ""),
          (0.3, 'data: {"choices": [{"text": "b", "index": 0, "finish_reason": "length"}]}'),
          (0.4, 'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}'), (0.5, "data: [DONE]")]
    got = bench.read_stream(ok)
    assert (got["first"], got["last"], got["frames"], got["usage"]["completion_tokens"], got["error"]) == (
        0.1, 0.3, 2, 2, None)
    error_frame = 'data: {"error": "index_copy_(): Source/destination tensor must have same slice shapes."}'
    assert "index_copy_" in bench.read_stream([(0.1, error_frame)])["error"]
    assert "not JSON" in bench.read_stream([(0.1, 'data: {"error": "bad "quote""}')])["error"]
    assert "no token frame" in bench.read_stream([(0.1, "data: [DONE]")])["error"]
    failures = [dict(status=-1, error="x"), dict(status=429), dict(status=500, error="y"), dict(status=-1, error="x")]
    row = bench.summarize(failures + [dict(status=200, ttft=0.1, tpot=None)], [dict(arrival=0.0), dict(arrival=1.0)],
                          2.0, 0.1)
    assert (row["failed"], row["first_error"], row["errors"]) == (3, "x", {"x": 2, "y": 1})


def test_a_mode_run_twice_keeps_both_rows_and_compile_costs_split_at_startup():
    """`--modes on off on`: the second `on` (warm compiled graphs) must not overwrite the first in the JSON."""
    bench = load_bench()
    rows = [dict(preset="p", system="nanokimi", mode=m, ttft_p50_ms=t) for m, t in (("on", 9), ("off", 2), ("on", 3))]
    keys = bench.result_keys(rows)
    assert list(keys) == ["p / nanokimi / on", "p / nanokimi / off", "p / nanokimi / on #2"]
    assert [keys[k]["ttft_p50_ms"] for k in keys] == [9, 2, 3]
    got = bench.compile_costs(dict(compile_seconds=28.4), dict(compile_seconds=31.0, cuda_graphs=5,
                                                                cuda_graphs_compiled=4))
    assert got == dict(compile_s_startup=28.4, compile_s_replay=2.6, cuda_graphs=5, cuda_graphs_compiled=4)


def test_working_set_counts_each_prefix_block_once():
    bench = load_bench()
    trace = [dict(blocks=[(1, 128), (2, 128), (3, 40)]), dict(blocks=[(1, 128), (2, 128), (3, 100)]),
             dict(blocks=[(4, 128)])]
    assert bench.working_set_tokens(trace) == 128 + 128 + 100 + 128


def test_tier_policy_replay_counts_what_each_policy_copies_and_serves():
    """Through the real BlockPool: a prompt, enough other prompts to push it out of a small pool, the prompt again.
    `all` serves the resend from the tier; `reused` never copied its blocks (they had not been hit before the
    eviction); `none` recomputes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_tier_policy

    def request(h, n_blocks):
        return dict(blocks=[(h * 100 + i, 128) for i in range(n_blocks)], input_tokens=128 * n_blocks + 1,
                    max_tokens=0)

    trace = [request(1, 2)] + [request(h, 2) for h in range(2, 6)] + [request(1, 2)]
    got = {p: serve_tier_policy.replay(trace, 512, p) for p in ("none", "reused", "all")}
    assert got["all"]["tier_hit_tokens"] == 256 and got["all"]["copied_hit"] == 16
    assert got["reused"]["copied"] == 0 and got["reused"]["tier_hit_tokens"] == 0
    assert got["none"]["gpu_hit_tokens"] == got["all"]["gpu_hit_tokens"] == 0
