"""The engine's batched host paths against their per-row references: sampling all rows in one call (with
logprobs brought back in one copy), graph block tables rewritten only for the rows that changed, offline
steps that report finished requests only, and lists turned into tensors through array."""
import pickle
import random

import pytest
import torch

from nanokimi.infer import Engine, SamplingParams
from nanokimi.infer.params import TokenPrefix
from nanokimi.infer.sampling import sample_rows, sample_step, top_logprobs
from nanokimi.runtime.host import host_tensor
from nanokimi.serve.loop import _freeze as freeze
from test_engine import LetterTokenizer, make_model, prompts, run_engine


@pytest.mark.parametrize("dtype", [torch.long, torch.float64])
def test_host_tensor_equals_torch_tensor(dtype):
    values = [3, -7, 2 ** 40, 0] if dtype == torch.long else [0.1, -2.5, 1e-300, 7.0, 1 / 3]
    got = host_tensor(values, dtype)
    assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype))
    assert host_tensor([], dtype).shape == (0,) and host_tensor([], dtype).dtype == dtype


def mixed_rows(count: int, seed: int = 0):
    """Per-row sampling settings of every kind (greedy, top-k, top-p, both) and seeded uniforms."""
    rng = random.Random(seed)
    temperature = [[0.0, 1.0, 0.7, 1.3][i % 4] for i in range(count)]
    top_k = [[0, 5, 0, 3, 40][i % 5] for i in range(count)]
    top_p = [[1.0, 0.9, 0.5][i % 3] for i in range(count)]
    uniforms = [random.Random(1000 + i).random() if t > 0 else 0.0 for i, t in enumerate(temperature)]
    logits = torch.randn(count, 64, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) * 3
    return logits, temperature, top_k, top_p, uniforms


def test_batched_sampling_equals_each_row_alone():
    logits, temperature, top_k, top_p, uniforms = mixed_rows(23)
    batched = sample_rows(logits, temperature, top_k, top_p, uniforms)
    alone = [sample_rows(logits[i:i + 1], [temperature[i]], [top_k[i]], [top_p[i]], [uniforms[i]]).item()
             for i in range(len(temperature))]
    assert batched.tolist() == alone
    sampled = [i for i, t in enumerate(temperature) if t > 0]  # a batch of sampled rows only (no row selection)
    subset = sample_rows(logits[sampled], *([values[i] for i in sampled] for values in (temperature, top_k, top_p,
                                                                                          uniforms)))
    assert subset.tolist() == [alone[i] for i in sampled]
    assert len(set(alone)) > 5  # the draws differ from row to row: the test compares something


@pytest.mark.parametrize("wanted", ["mixed", "all", "none"])
def test_sample_step_equals_sampling_then_top_logprobs_per_row(wanted):
    logits, temperature, top_k, top_p, uniforms = mixed_rows(17, seed=1)
    logprobs = {"mixed": [[None, 0, 3, None, 1][i % 5] for i in range(17)], "all": [i % 3 for i in range(17)],
                "none": [None] * 17}[wanted]
    tokens, entries = sample_step(logits, temperature, top_k, top_p, uniforms, logprobs)
    assert tokens == sample_rows(logits, temperature, top_k, top_p, uniforms).tolist()
    for i, (k, entry) in enumerate(zip(logprobs, entries)):
        if k is None:
            assert entry is None
            continue
        expected = top_logprobs(logits[i:i + 1], torch.tensor([tokens[i]]), [k])[0]
        assert entry == expected and list(entry) == list(expected)  # same values, same order


def test_top_logprobs_per_row_equals_the_log_softmax():
    logits = torch.randn(4, 30)
    chosen = torch.tensor([3, 0, 29, 7])
    logp = logits.float().log_softmax(-1)
    entries = top_logprobs(logits, chosen, [0, 2, 5, 1])
    for r, (entry, k) in enumerate(zip(entries, [0, 2, 5, 1])):
        top = logp[r].topk(k).indices.tolist() if k else []
        assert set(entry) == set(top) | {chosen[r].item()}
        assert all(entry[t] == logp[r, t].item() for t in entry)


def test_graph_tables_rewritten_row_by_row_equal_a_full_rebuild():
    """Rows finish at different steps (the rows after them move up), grow blocks at different steps and are
    preempted (a small cache): after every graphed step the graph's block-table buffer equals the tables built
    whole from the rows, and the tokens equal the eager engine's."""
    model = make_model("all-mla")
    batch = prompts(9, seed=5, lengths=(3, 9, 14, 20, 5))
    requests = [(str(i), p, SamplingParams(max_tokens=4 + 3 * i, temperature=0)) for i, p in enumerate(batch)]
    checked = []
    outs = {}
    for graphs in ("static", False):
        engine = Engine(model, block_size=2, use_cuda_graph=graphs, max_cache_tokens=60, max_step_tokens=32)
        runner = engine.runner
        run_graphed = runner._run_graphed

        def checked_run(rows, runner=runner, run_graphed=run_graphed):
            out = run_graphed(rows)
            key = next(k for k, v in runner.graph_tables.items() if v == [r.block_table for r in rows])
            buffer = runner.graphs[key][2].block_tables
            reference = torch.zeros(key[0], key[1], dtype=torch.long)  # the tables built whole, row by row
            for i, row in enumerate(rows):
                reference[i, :len(row.block_table)] = torch.tensor(row.block_table)
            assert torch.equal(buffer, reference)
            checked.append(len(rows))
            return out

        runner._run_graphed = checked_run
        done = run_engine(engine, requests, stagger=3)
        outs[graphs] = [done[str(i)].outputs[0].token_ids for i in range(len(batch))]
        if graphs == "static":
            assert engine.stats()["preemptions"] > 0
    assert outs["static"] == outs[False]
    assert len(checked) > 20 and len(set(checked)) > 3


def test_offline_steps_report_each_finished_request_once_as_streaming_ends_it():
    model = make_model("tiny-dense")
    batch = prompts(6, seed=23, lengths=(4, 9, 13))
    kinds = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=1.0, seed=3, logprobs=1, stop=["ab", "c"]),
             SamplingParams(max_tokens=7, temperature=0.8, top_k=5, seed=4, n=2, stop_token_ids=[1, 2, 3])]
    requests = [(str(i), p, kinds[i % 3]) for i, p in enumerate(batch)]
    final, reported = {}, {}
    for stream in (True, False):
        engine = Engine(model, LetterTokenizer(), block_size=4)
        engine.stream_outputs = stream
        seen = []
        for request_id, ids, params in requests:
            engine.add_request(request_id, ids, params)
        while engine.has_unfinished():
            seen += engine.step()
        final[stream] = {o.request_id: [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs]
                         for o in seen if o.finished}
        reported[stream] = seen
    assert final[True] == final[False] and len(final[False]) == len(requests)
    assert all(o.finished for o in reported[False]) and len(reported[False]) == len(requests)
    assert len(reported[True]) > len(requests)


def test_token_prefix_reads_like_the_tuple_of_its_items_and_stays_put_as_the_list_grows():
    items = list(range(10, 20))
    view = TokenPrefix(items, 7)
    items += [99, 98]
    snapshot = tuple(items[:7])
    assert view == snapshot and view == list(snapshot) and tuple(view) == snapshot and len(view) == 7
    for s in (slice(None), slice(2, None), slice(-3, None), slice(1, 6, 2), slice(None, None, -1), slice(5, 99)):
        assert view[s] == snapshot[s], s
    assert view[0] == 10 and view[-1] == 16
    with pytest.raises(IndexError):
        view[7]
    assert pickle.loads(pickle.dumps(view)) == snapshot and type(pickle.loads(pickle.dumps(view))) is tuple
    assert hash(view) == hash(snapshot) and view != snapshot[:-1]


def test_server_updates_taken_as_views_equal_copies_taken_at_the_same_step():
    """The server's loop snapshots each streamed output as TokenPrefix views of the engine's own lists
    (copy_outputs False); later steps append to those lists, and every update must still read as the copy the
    engine would have made at its step (tokens, text, logprobs; samples cut by stop strings and stop ids too)."""
    model = make_model("tiny-dense")
    batch = prompts(6, seed=31, lengths=(4, 9, 13))
    kinds = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=24, temperature=1.0, seed=3, logprobs=2, stop=["ab", "c"]),
             SamplingParams(max_tokens=16, temperature=0.8, top_k=5, seed=4, n=2, stop_token_ids=[1, 2, 3])]
    updates = {}
    for copy in (True, False):
        engine = Engine(model, LetterTokenizer(), block_size=4)
        engine.copy_outputs = copy
        for i, ids in enumerate(batch):
            engine.add_request(str(i), ids, kinds[i % 3])
        updates[copy] = []
        while engine.has_unfinished():
            updates[copy] += [freeze(o) for o in engine.step()]
    assert len(updates[False]) == len(updates[True]) > 3 * len(batch)
    for viewed, copied in zip(updates[False], updates[True]):
        assert viewed == copied
    assert all(type(c.token_ids.items) is list for u in updates[False] for c in u.choices)
    assert sum(len(c.token_ids.items) > len(c.token_ids) for u in updates[False] for c in u.choices) > len(batch)
