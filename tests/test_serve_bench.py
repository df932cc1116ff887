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
