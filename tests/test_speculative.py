"""Speculative decoding in the engine changes nothing about the output: greedy and seeded sampled tokens equal
decoding without it (drafts fully right, fully wrong, partly right; hybrid, MLA, GQA and MoBA models), sampled
tokens keep the model's distribution (chi-square), a rejected draft leaves the KDA state of the accepted prefix,
and every block comes back."""
import gc
import random

import pytest
import torch

from test_engine import CONFIGS, make_model, prompts
from nanokimi import ModelConfig, build_model
from nanokimi.infer import Engine, SamplingParams
from nanokimi.infer.sampling import sample_rows
from nanokimi.infer.speculative import ENTRIES_PER_KEY, Drafter, NgramIndex, SampleStream, accept_draft

MODELS = ["tiny", "tiny-dense", "all-mla", "moba"]  # KDA + MLA hybrid, GQA, MLA with RoPE, KDA + MoBA
CHI2_LEVEL = 1e-3  # the tests fail when a p-value falls below this (fixed seeds: the outcome is deterministic)


class OracleDrafter:
    """Drafts from known outputs: "right" proposes the true continuation, "wrong" a different token at every
    place, "partly" the truth for the first half of each draft and then wrong tokens."""

    def __init__(self, reference: dict[tuple[str, int], list[int]], kind: str, vocab: int):
        self.reference, self.kind, self.vocab = reference, kind, vocab

    def track(self, seq):
        pass

    def observe(self, seq):
        pass

    def release(self, seq):
        pass

    def propose(self, seq, limit):
        truth = self.reference.get((seq.request.request_id, seq.index), [])[seq.num_output:seq.num_output + limit]
        if self.kind == "right":
            return truth
        wrong = [(t + 1) % self.vocab for t in truth]
        if self.kind == "wrong":
            return wrong
        half = (len(truth) + 1) // 2
        return truth[:half] + wrong[half:]


def slots_back(engine: Engine) -> bool:
    """Every KDA state slot is free or holds a snapshot (no slot lost, none twice); True without KDA."""
    slots = engine.slots
    return slots is None or sorted(slots.free + list(slots.snapshots.values())) == list(range(slots.num_slots))


def run(engine: Engine, requests) -> dict[tuple[str, int], list[int]]:
    for request_id, ids, params in requests:
        engine.add_request(request_id, ids, params)
    out = {}
    while engine.has_unfinished():
        for result in engine.step():
            if result.finished:
                for completion in result.outputs:
                    out[(result.request_id, completion.index)] = completion.token_ids
    return out


def greedy_requests(count=5, max_tokens=10, **extra):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)
    return [(str(i), ids, params) for i, ids in enumerate(prompts(count, seed=3))]


def sampled_requests(count=5, max_tokens=10):
    return [(str(i), ids, SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.9, top_k=40, seed=100 + i,
                                         ignore_eos=True)) for i, ids in enumerate(prompts(count, seed=3))]


def filtered_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> the law plain sampling draws from: softmax(logits / temperature) over the top_k most likely
    tokens, then the smallest most likely set of those whose (renormalised) probability reaches top_p."""
    probs = (logits.double() / temperature).softmax(-1)
    top = probs.argsort(descending=True)[:top_k].tolist()
    in_top_k = probs[top] / probs[top].sum()
    kept = torch.zeros_like(probs)
    mass = 0.0
    for token, p in zip(top, in_top_k.tolist()):
        if kept.any() and mass >= top_p:
            break
        kept[token] = p
        mass += p
    return kept / kept.sum()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["right", "wrong", "partly"])
@pytest.mark.parametrize("sampled", [False, True])
def test_speculation_emits_the_tokens_of_decoding_without_it(name, kind, sampled):
    """Greedy, and sampled with a seed per request: a draft changes how many tokens a step emits, not which."""
    model = make_model(name)
    requests = sampled_requests() if sampled else greedy_requests()
    reference = run(Engine(model, max_cache_tokens=2048, block_size=4), requests)
    drafter = OracleDrafter(reference, kind, model.config.vocab_size)
    engine = Engine(model, max_cache_tokens=2048, block_size=4, speculative=drafter, num_speculative_tokens=3)
    assert run(engine, requests) == reference
    stats = engine.stats()
    assert stats["spec_verify_rows"] > 0
    if kind == "right":
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]
    elif kind == "wrong":
        assert stats["spec_accepted_tokens"] == 0
    else:
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert engine.pool.num_free == engine.pool.num_usable  # rejected drafts' blocks came back too


def test_stop_token_inside_an_accepted_draft_ends_the_sample_there():
    model = make_model("tiny")
    plain = run(Engine(model, max_cache_tokens=2048, block_size=4), greedy_requests(count=3))
    stops = [plain[(str(i), 0)][4] for i in range(3)]
    requests = [(str(i), ids, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stops[i]]))
                for i, ids in enumerate(prompts(3, seed=3))]
    reference = run(Engine(model, max_cache_tokens=2048, block_size=4), requests)
    engine = Engine(model, max_cache_tokens=2048, block_size=4, num_speculative_tokens=4,
                    speculative=OracleDrafter(plain, "right", model.config.vocab_size))
    assert run(engine, requests) == reference
    assert all(len(tokens) <= 5 for tokens in reference.values())


@pytest.mark.parametrize("speculative", ["ngram", "suffix"])
def test_ngram_and_suffix_drafters_keep_greedy_outputs_and_accept_repeats(speculative):
    model = make_model("tiny-dense")  # its greedy outputs fall into loops: prompt lookup finds matches
    requests = [(str(i), ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, n=2))
                for i, ids in enumerate(prompts(3, seed=5))]
    reference = run(Engine(model, max_cache_tokens=4096), requests)
    engine = Engine(model, max_cache_tokens=4096, speculative=speculative, num_speculative_tokens=3)
    assert run(engine, requests) == reference
    assert engine.stats()["spec_verify_rows"] > 0
    assert engine.pool.num_free == engine.pool.num_usable
    assert not engine.drafter.indexes  # released with their sequences


def test_suffix_index_follows_the_continuation_most_siblings_agree_on():
    index = NgramIndex()
    siblings = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [9, 2, 3, 7, 7], [1, 2, 3, 4, 6, 8]]
    for tokens in siblings:
        index.add(tokens, 0, len(tokens))
    assert index.propose([5, 2, 3], 3) == [4, 6, 8]  # "2 3" -> 4 (3 votes of 4), then 6 (2 of 3), then 8
    assert index.propose([0, 0], 3) == []
    own = [4, 5, 1, 2, 4, 5]
    drafter_index = NgramIndex()
    drafter_index.add(own, 0, len(own))
    assert drafter_index.propose(own, 2) == [1, 2]  # prompt lookup: "4 5" occurred before, followed by 1 2
    assert isinstance(Drafter("group"), Drafter)
    with pytest.raises(ValueError, match="speculative must be"):
        Engine(make_model("tiny-dense"), max_cache_tokens=256, speculative="medusa")


def test_the_suffix_index_leaves_no_per_token_object_for_the_garbage_collector():
    """A rollout indexes every token of every sample; per-token tuples or deques made the collector's full passes
    cost more than the indexing (benchmarks/engine_host.py --modes suffix-attn)."""
    g = random.Random(0)
    rows = [[g.randrange(1000) for _ in range(300)] for _ in range(16)]
    index = NgramIndex()
    gc.collect()
    before = len(gc.get_objects())
    for row in rows:
        index.add(row, 0, len(row))
    gc.collect()
    assert len(gc.get_objects()) - before < 50  # was about 14,000 deques (three n-grams per token, mostly new)
    assert index.propose(rows[3][:120], 4) == rows[3][120:124]  # a 4-gram of random tokens occurs once
    index.add(rows[3], 100, 130)  # indexed again, and out of order: the walk over occurrences still ends
    assert index.propose(rows[3][:120], 4) == rows[3][120:124]
    repeated = NgramIndex()
    repeated.add([7, 8] * 100 + [9], 0, 201)
    assert len(repeated.occurrences((7, 8))) == ENTRIES_PER_KEY  # only the most recent are looked at


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value (bins with expected count < 5 are merged into one)."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def test_accept_rule_draws_what_plain_sampling_draws_and_takes_one_number_per_token():
    """At each place the token plain sampling would draw with the stream's next number; drafts accepted while they
    equal it; the stream then stands where plain sampling of the emitted tokens leaves it."""
    torch.manual_seed(2)
    for trial in range(40):
        logits = torch.randn(4, 12, dtype=torch.float64) * 2
        plain_rng, rng = random.Random(trial), SampleStream(trial)
        plain = [int(sample_rows(logits[i:i + 1], [0.9], [8], [0.95], [plain_rng.random()])[0]) for i in range(4)]
        cut = trial % 4  # drafts right up to `cut`, then wrong
        draft = plain[:cut] + [(t + 1) % 12 for t in plain[cut:3]]
        emitted = accept_draft(logits, draft, 0.9, 8, 0.95, rng)
        assert emitted == plain[:cut + 1]
        follow = random.Random(trial)
        for _ in emitted:
            follow.random()
        assert rng.random() == follow.random()


def test_accept_rule_keeps_the_distribution_of_the_first_token():
    torch.manual_seed(0)
    logits = torch.randn(3, 12, dtype=torch.float64)
    p = filtered_distribution(logits[0], 0.9, 8, 0.95)
    draft = [int(p.argmax()), 3]
    rng = SampleStream(1)
    draws = 4000
    counts = torch.zeros(12, dtype=torch.float64)
    for _ in range(draws):
        counts[accept_draft(logits, draft, 0.9, 8, 0.95, rng)[0]] += 1
    assert counts[p == 0].sum() == 0  # never outside top-k / top-p
    assert chi2_pvalue(counts[p > 0], draws * p[p > 0]) > CHI2_LEVEL


def test_sampling_with_speculation_keeps_the_models_distribution_of_the_first_tokens():
    cfg = ModelConfig.preset("tiny", vocab_size=6, hidden_size=32, num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                             qk_rope_head_dim=8, v_head_dim=8, kda_num_heads=2, kda_head_dim=8, intermediate_size=48,
                             moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1, num_layers=2,
                             mixers="KA")
    torch.manual_seed(1)
    model = build_model(cfg).double().eval()
    prompt = [1, 2, 3]
    with torch.no_grad():  # the exact joint distribution of the first two tokens
        first = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        second = torch.stack([model(torch.tensor([prompt + [t]]))[0, -1].softmax(-1) for t in range(6)])
    joint = (first[:, None] * second).flatten()  # [36]

    class Fixed:  # always proposes 0, 1: accepted sometimes, rejected sometimes
        track = observe = release = staticmethod(lambda seq: None)

        @staticmethod
        def propose(seq, limit):
            return [0, 1][:limit]

    draws = 2500
    engine = Engine(model, max_cache_tokens=8192, max_num_seqs=256, speculative=Fixed(), num_speculative_tokens=2)
    out = run(engine, [(str(s), prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True))
                       for s in range(draws)])
    counts = torch.zeros(36, dtype=torch.float64)
    for tokens in out.values():
        counts[tokens[0] * 6 + tokens[1]] += 1
    stats = engine.stats()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert chi2_pvalue(counts, draws * joint) > CHI2_LEVEL


@pytest.mark.parametrize("graphs", [False, "static"])
def test_kda_state_after_a_rejected_draft_equals_the_accepted_prefix(graphs):
    """Eagerly (the per-token states kept by the verify row) and in the graph step (the states after each draft
    token in scratch slots, the accepted one copied back): the slot holds the plain engine's state."""
    model = make_model("tiny")
    ids = prompts(1, seed=7)[0]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reference = run(Engine(model, max_cache_tokens=1024, block_size=4), [("a", ids, params)])
    spec = Engine(model, max_cache_tokens=1024, block_size=4, num_speculative_tokens=4, use_cuda_graph=graphs,
                  speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
    plain = Engine(model, max_cache_tokens=1024, block_size=4)
    spec.add_request("a", ids, params)
    plain.add_request("a", ids, params)
    checked = 0
    while spec.has_unfinished() and checked < 2:
        spec.step()
        seq = spec.scheduler.running[0] if spec.scheduler.running else None
        if seq is None or seq.num_output < 2:
            continue
        plain_seq = plain.requests["a"].sequences[0] if plain.has_unfinished() else None
        while plain_seq.num_computed < seq.num_computed:
            plain.step()
        assert plain_seq.num_computed == seq.num_computed
        for mine, theirs in zip(spec.runner.cache.recurrent_layers(), plain.runner.cache.recurrent_layers()):
            torch.testing.assert_close(mine.state[seq.state_slot], theirs.state[plain_seq.state_slot],
                                       atol=1e-6, rtol=0)
            torch.testing.assert_close(mine.conv[seq.state_slot], theirs.conv[plain_seq.state_slot],
                                       atol=1e-6, rtol=0)
        checked += 1
    assert checked == 2 and spec.stats()["spec_draft_tokens"] > spec.stats()["spec_accepted_tokens"] > 0
    assert spec.runner.verify_rows["graphed" if graphs else "eager"] == spec.stats()["spec_verify_rows"]


def test_logprobs_of_speculated_tokens_equal_the_plain_ones():
    model = make_model("tiny-dense")
    requests = greedy_requests(count=2, max_tokens=8, logprobs=2)
    plain = Engine(model, max_cache_tokens=2048, block_size=4)
    for request_id, ids, params in requests:
        plain.add_request(request_id, ids, params)
    done = {}
    while plain.has_unfinished():
        done.update({o.request_id: o.outputs[0] for o in plain.step() if o.finished})
    reference = {(k, 0): v.token_ids for k, v in done.items()}
    spec = Engine(model, max_cache_tokens=2048, block_size=4, num_speculative_tokens=3,
                  speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
    for request_id, ids, params in requests:
        spec.add_request(request_id, ids, params)
    got = {}
    while spec.has_unfinished():
        got.update({o.request_id: o.outputs[0] for o in spec.step() if o.finished})
    for key, completion in done.items():
        assert got[key].token_ids == completion.token_ids
        for a, b in zip(got[key].logprobs, completion.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-6 for t in a)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
def test_speculation_on_cuda_with_graphs_and_fla_gives_the_plain_greedy_tokens(name):
    """On CUDA: graphed decode rows beside eager verification rows, fla's recurrent kernel for the per-token
    KDA states, the Triton MLA kernel; float32, so the greedy tokens must agree with speculation off."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = make_model(name, small=False).float().cuda()
    requests = greedy_requests(count=6, max_tokens=24)
    reference = run(Engine(model, max_cache_tokens=8192, compile=False), requests)
    for speculative in (OracleDrafter(reference, "partly", model.config.vocab_size), "suffix"):
        engine = Engine(model, max_cache_tokens=8192, speculative=speculative, num_speculative_tokens=4, compile=False)
        got = run(engine, requests)
        agree = sum(got[key] == reference[key] for key in reference) / len(reference)
        assert agree >= 5 / 6, agree  # float32 on different kernels: a near-tie may flip one sequence at most
        assert engine.pool.num_free == engine.pool.num_usable


@pytest.mark.parametrize("name,graphs", [("tiny", "auto"), ("tiny", "static"), ("tiny-dense", "auto")])
def test_prefix_cache_after_rejected_drafts_serves_only_accepted_content(name, graphs):
    """Blocks written while drafts were rejected are hashed only once their accepted content is computed:
    a next turn (prompt + answer + more) that reuses them gives the tokens of an engine without any cache.
    "static": the hybrid's drafts verified in the graph step, so the KDA snapshots taken after a step must see
    the accepted state copied back from its scratch slot first."""
    model = make_model(name)
    requests = greedy_requests(count=3, max_tokens=14)
    reference = run(Engine(model, max_cache_tokens=2048, block_size=4), requests)
    engine = Engine(model, max_cache_tokens=2048, block_size=4, snapshot_interval=8, num_speculative_tokens=3,
                    use_cuda_graph=graphs, speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
    assert run(engine, requests) == reference
    follow = [(f"next{i}", ids + reference[(str(i), 0)] + [7, 8], SamplingParams(max_tokens=6, temperature=0,
                                                                               ignore_eos=True))
              for i, (_, ids, _) in enumerate(requests)]
    hits_before = engine.stats()["prefix_cache_hit_tokens"]
    fresh = run(Engine(model, max_cache_tokens=2048, block_size=4, enable_prefix_caching=False), follow)
    assert run(engine, follow) == fresh
    assert engine.stats()["prefix_cache_hit_tokens"] - hits_before >= 3 * 8  # the answers' blocks were reused
    assert engine.runner.verify_rows["eager" if graphs == "auto" else "graphed"] == engine.stats()["spec_verify_rows"]


def verify_requests():
    """Greedy and seeded sampled requests with logprobs, prompts that end near block boundaries."""
    out = []
    for i, ids in enumerate(prompts(4, seed=11, lengths=(3, 7, 9, 14))):
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
        sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=True, logprobs=2)
        out += [(f"g{i}", ids, greedy), (f"s{i}", ids, sampled)]
    return out


def run_outputs(engine: Engine, requests, stagger: int = 0) -> dict:
    """Finished outputs by request id; with stagger, the second half of the requests arrives `stagger` steps
    after the first (their prefill then shares steps with the first half's verify rows)."""
    later = requests[len(requests) // 2:] if stagger else []
    for request_id, ids, params in requests[:len(requests) - len(later)]:
        engine.add_request(request_id, ids, params)
    done, steps = {}, 0
    while engine.has_unfinished() or later:
        if steps == stagger:
            for request_id, ids, params in later:
                engine.add_request(request_id, ids, params)
            later = []
        done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        steps += 1
    return done


@pytest.mark.parametrize("name,sizes,kind", [
    ("tiny-dense", None, "partly"), ("all-mla", None, "partly"), ("tiny", None, "partly"), ("tiny", None, "right"),
    ("tiny", None, "wrong"), ("tiny-dense", (1, 2, 4, 8), "partly"), ("tiny", (1, 2, 4, 8, 16), "partly")])
def test_verify_rows_in_the_static_graph_step_give_the_eager_verification(name, sizes, kind, monkeypatch):
    """use_cuda_graph="static" runs the padded step a CUDA graph captures: verify rows go through it as one-token
    rows (drafts `kind` right, crossing block boundaries; with sizes, more rows than the largest bucket, so a GQA
    draft spans two replays, a KDA chain never does) and give the eager verification's tokens and logprobs
    (float64; the hybrid's within 1e-5: its KDA recurrence and states are fp32 by design, and the projections'
    float64 round-off, which depends on the batch's shape, rounds differently to fp32 there; the states agree,
    see test_kda_state_after_a_rejected_draft_equals_the_accepted_prefix)."""
    import nanokimi.infer.runner as runner
    if sizes is not None:
        monkeypatch.setattr(runner, "GRAPH_BATCH_SIZES", sizes)
    model = make_model(name)
    requests = verify_requests()
    plain = run_outputs(Engine(model, max_cache_tokens=2048, block_size=4), requests, stagger=2)
    reference = {(key, 0): out.token_ids for key, out in plain.items()}  # sampled too: the same draws
    outs, engines = {}, {}
    for graphs in (False, "static"):
        engine = Engine(model, max_cache_tokens=2048, block_size=4, use_cuda_graph=graphs, num_speculative_tokens=4,
                        speculative=OracleDrafter(reference, kind, model.config.vocab_size))
        crossing, mixed, chunked = [], [], []
        run_rows, run_groups = engine.runner.run, engine.runner._run_graphed_groups

        def spy(rows):
            crossing.extend(r.start // 4 != (r.start + len(r.tokens) - 1) // 4 for r in rows if r.num_logits > 1)
            mixed.append(any(r.num_logits > 1 for r in rows) and any(r.num_logits < len(r.tokens) for r in rows))
            return run_rows(rows)

        engine.runner.run = spy
        engine.runner._run_graphed_groups = lambda rows: chunked.append(sum(len(r.tokens) for r in rows)) or \
            run_groups(rows)  # graph rows: a token each
        outs[graphs], engines[graphs] = run_outputs(engine, requests, stagger=2), engine
        assert any(crossing) and any(mixed)  # drafts across block boundaries; verify rows beside prefill chunks
        if graphs and sizes is not None:
            assert max(chunked) > sizes[-1]
        assert engine.pool.num_free == engine.pool.num_usable
        assert slots_back(engine)
    tolerance = 1e-5 if name == "tiny" else 1e-9
    for key, completion in outs[False].items():
        got = outs["static"][key]
        assert got.token_ids == completion.token_ids
        if key.startswith("g"):
            assert got.token_ids == plain[key].token_ids
        for a, b in zip(got.logprobs, completion.logprobs):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < tolerance for t in a)
    static = engines["static"].runner.verify_rows
    assert engines[False].runner.verify_rows["graphed"] == 0
    assert static["eager"] == 0 and static["graphed"] == engines["static"].stats()["spec_verify_rows"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("name,compile", [("tiny-dense", False), ("all-mla", False), ("tiny-dense", True),
                                          ("tiny", False), ("tiny", True)])
def test_verify_rows_replay_cuda_graphs_and_match_the_eager_verification(name, compile):
    """On CUDA: GQA, MLA (Triton paged kernel) and KDA (the Triton slot kernel stepping each draft's chain, scratch
    slots) verify rows replay the decode step's CUDA graphs (compiled or not) and give the eager verification's
    tokens and logprobs (float32: a near-tie may flip one sequence); every block and state slot comes back.
    The FFNs are dense: in float32 on CUDA the MoE multiplies expert by expert, reading the expert counts on the
    host, which no CUDA graph can capture (the engine then decodes eagerly, as the H100 showed)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    preset, overrides = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(preset, **{**overrides, "num_experts": 0})).float().eval().cuda()
    requests = greedy_requests(count=6, max_tokens=24, logprobs=2)
    plain = run_outputs(Engine(model, max_cache_tokens=8192, compile=False), requests)
    reference = {(key, 0): out.token_ids for key, out in plain.items()}
    outs, engines = {}, {}
    for graphs in (False, True):
        drafter = OracleDrafter(reference, "partly", model.config.vocab_size)
        engine = Engine(model, max_cache_tokens=8192, use_cuda_graph=graphs, compile=compile and graphs,
                        speculative=drafter, num_speculative_tokens=4)
        outs[graphs], engines[graphs] = run_outputs(engine, requests), engine
        assert engine.pool.num_free == engine.pool.num_usable and slots_back(engine)
    if name == "tiny":
        import nanokimi.model.paged as paged
        assert paged.use_kda_slot_kernel(torch.device("cuda")) and engines[True].num_scratch_slots > 0
    same = [key for key in outs[False] if outs[True][key].token_ids == outs[False][key].token_ids]
    assert len(same) >= len(outs[False]) - 1
    for key in same:
        for a, b in zip(outs[True][key].logprobs, outs[False][key].logprobs):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-3 for t in a)
    graphed = engines[True].runner.verify_rows
    assert graphed["graphed"] == engines[True].stats()["spec_verify_rows"] > 0 and graphed["eager"] == 0
    assert engines[False].runner.verify_rows["graphed"] == 0


@pytest.mark.parametrize("name", ["tiny-dense", "tiny"])
def test_graphed_verify_rows_under_preemption_give_the_plain_tokens(name):
    """A cache too small for every sequence: preempted sequences are recomputed while others verify drafts in
    the static graph step; the greedy tokens are the plain engine's and every block (and state slot) comes back."""
    model = make_model(name)
    requests = greedy_requests(count=6, max_tokens=12)
    reference = run(Engine(model, max_cache_tokens=2048, block_size=4), requests)
    engine = Engine(model, max_cache_tokens=48, block_size=4, use_cuda_graph="static", num_speculative_tokens=3,
                    speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
    assert run(engine, requests) == reference
    stats = engine.stats()
    assert stats["preemptions"] > 0 and engine.runner.verify_rows["graphed"] == stats["spec_verify_rows"] > 0
    assert engine.pool.num_free == engine.pool.num_usable
    assert slots_back(engine)


def test_kda_verify_rows_beyond_the_scratch_slots_verify_eagerly_with_the_same_tokens():
    """num_verify_slots smaller than a step's draft tokens: that step's verify rows run eagerly (the others in the
    graph step); the greedy tokens are the plain engine's, every block and state slot comes back; 0: all eager."""
    model = make_model("tiny")
    requests = greedy_requests(count=4, max_tokens=10)
    reference = run(Engine(model, max_cache_tokens=2048, block_size=4), requests)
    for slots, graphed in ((5, "some"), (0, "none")):
        engine = Engine(model, max_cache_tokens=2048, block_size=4, use_cuda_graph="static", num_speculative_tokens=3,
                        num_verify_slots=slots, speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
        assert run(engine, requests) == reference
        rows = engine.runner.verify_rows
        assert rows["eager"] > 0 and (rows["graphed"] > 0) == (graphed == "some")
        assert engine.num_scratch_slots == slots and engine.pool.num_free == engine.pool.num_usable
        assert slots_back(engine)
    with pytest.raises(ValueError, match="num_verify_slots"):
        Engine(model, num_verify_slots=-1)


def test_kda_scratch_slots_default_to_what_a_step_can_draft():
    """The default scratch slots: one per draft token a step can hold, max_num_seqs x num_speculative_tokens,
    but never more than the step's token budget leaves (max_step_tokens - 1): a tight budget verifies every
    draft in the graph step with fewer slots, the same tokens as plain decoding."""
    model = make_model("tiny")
    requests = greedy_requests(count=4, max_tokens=10)
    reference = run(Engine(model, max_cache_tokens=2048, block_size=4), requests)
    for max_step_tokens, expected in ((4096, 4 * 3), (9, 8)):
        engine = Engine(model, max_cache_tokens=2048, block_size=4, use_cuda_graph="static", num_speculative_tokens=3,
                        max_num_seqs=4, max_step_tokens=max_step_tokens,
                        speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
        assert engine.num_scratch_slots == expected
        assert run(engine, requests) == reference
        assert engine.runner.verify_rows["eager"] == 0 and engine.runner.verify_rows["graphed"] > 0


def test_kda_step_whose_later_graph_fails_runs_eagerly_from_untouched_states(monkeypatch):
    """A step of KDA chains over several replays whose later graph cannot be had (here: refused) runs wholly
    eagerly: no earlier replay may have advanced a state first (it would advance twice). Greedy tokens = plain."""
    import nanokimi.infer.runner as runner_module
    monkeypatch.setattr(runner_module, "GRAPH_BATCH_SIZES", (1, 2, 4, 8, 16))
    model = make_model("tiny")
    requests = greedy_requests(count=6, max_tokens=10)
    reference = run(Engine(model, max_cache_tokens=2048, block_size=4), requests)
    engine = Engine(model, max_cache_tokens=2048, block_size=4, use_cuda_graph="static", num_speculative_tokens=3,
                    speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
    runner, calls = engine.runner, []
    graph, run_rows = runner._graph, runner.run
    runner.run = lambda rows: calls.clear() or run_rows(rows)
    runner._graph = lambda *args: None if calls.append(args) or len(calls) > 1 else graph(*args)  # 2nd chunk: none
    assert run(engine, requests) == reference
    assert runner.verify_rows["eager"] > 0 and runner.verify_rows["graphed"] > 0
    assert engine.pool.num_free == engine.pool.num_usable and slots_back(engine)


def reference_groups(runner):
    """The readable path `ModelRunner._run_graphed_groups` stands for: a Row per token, the per-row graph step."""
    from nanokimi.infer.runner import _verify_as_decode_rows
    return lambda rows: runner._run_graphed_chunks(_verify_as_decode_rows(rows))


def test_graph_inputs_of_verify_rows_equal_the_per_token_rows(monkeypatch):
    """The vectorised graph inputs of verify rows (`_run_graphed_groups`) equal those of one Row per token through
    the per-row path, replay by replay (ids, positions, cache slots, state slots and every block-table row of the
    buffer), over steps that keep, grow, reorder and drop sequences, interleaved with plain decode steps, with
    graph buckets small enough that drafts are split between replays."""
    import nanokimi.infer.runner as runner_module
    from nanokimi.infer.runner import ModelRunner, Row
    monkeypatch.setattr(runner_module, "GRAPH_BATCH_SIZES", (1, 2, 4, 8, 12))
    model = make_model("tiny-dense")
    g = random.Random(0)
    tables = {s: [1 + 6 * s + b for b in range(blocks)] for s, blocks in enumerate([2, 2, 3, 1, 3, 3])}

    def step(seqs, draft):
        rows = []
        for s in seqs:
            length = 1 + (s % 5 if draft else 0)
            start = 4 * len(tables[s]) - length - g.randint(0, 2)
            tokens = [g.randrange(model.config.vocab_size) for _ in range(length)]
            rows.append(Row(tokens, max(start, 0), list(tables[s]), None if s % 3 else s, True, num_logits=length))
        return sorted(rows, key=lambda r: len(r.tokens) > 1)  # one-token rows first, as the engine orders them

    schedule = [(range(6), 1), (range(6), 1), (range(6), 0), ([4, 0, 2, 5], 1), ([4, 0, 2, 5], 1), ([4, 0, 2, 5], 1),
                ([0, 2], 1), ([0, 2], 0), (range(6), 1), (range(3), 1), (range(3), 1), (range(3), 1)]
    steps = []
    for i, (seqs, draft) in enumerate(schedule):
        if i in (1, 4, 10):  # a table grows while the runs stay the same (at 1: a draft split between replays)
            tables[4 if i == 1 else 0].append(60 + i)
        steps.append(step(seqs, draft))
    replays, kinds = {}, []
    for path in ("fast", "reference"):
        runner = ModelRunner(model, num_blocks=80, block_size=4, num_state_slots=6, max_model_len=64,
                             use_cuda_graph="static")
        if path == "reference":
            runner._run_graphed_groups = reference_groups(runner)
        else:
            changed_runs = runner._changed_runs
            runner._changed_runs = lambda *args: kinds.append(changed_runs(*args)) or kinds[-1]
        seen, replay = replays.setdefault(path, []), runner._replay

        def spy(key, *args, runner=runner, seen=seen, replay=replay):
            out = replay(key, *args)
            seen.append((key, runner.graphs[key][1].clone()))
            return out

        runner._replay = spy
        replays[path + " logits"] = [runner.run(rows) for rows in steps]
    assert len(replays["fast"]) == len(replays["reference"]) > len(steps)
    # buffers rewritten whole (other runs), left alone (same tables), and rewritten in the rows of a grown table
    assert None in kinds and [] in kinds and any(kinds)
    for (key, got), (want_key, want) in zip(replays["fast"], replays["reference"]):
        assert key == want_key and torch.equal(got, want)
    for got, want in zip(replays["fast logits"], replays["reference logits"]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["tiny-dense", "all-mla"])
def test_engine_with_vectorised_verify_inputs_equals_the_per_token_rows(name):
    """The engine's tokens and logprobs (float64, static graph step, drafts partly right, buckets split drafts)
    are the same with the vectorised verify inputs as with a Row per token."""
    import nanokimi.infer.runner as runner_module
    model = make_model(name)
    requests = verify_requests()
    plain = run_outputs(Engine(model, max_cache_tokens=2048, block_size=4), requests, stagger=3)
    reference = {(key, 0): out.token_ids for key, out in plain.items()}
    outs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "GRAPH_BATCH_SIZES", (1, 2, 4, 8, 16))
        for path in ("fast", "reference"):
            engine = Engine(model, max_cache_tokens=2048, block_size=4, use_cuda_graph="static",
                            num_speculative_tokens=4,
                            speculative=OracleDrafter(reference, "partly", model.config.vocab_size))
            if path == "reference":
                engine.runner._run_graphed_groups = reference_groups(engine.runner)
            outs[path] = run_outputs(engine, requests, stagger=3)
            assert engine.runner.verify_rows["graphed"] == engine.stats()["spec_verify_rows"] > 0
    assert outs["fast"].keys() == outs["reference"].keys()
    for key, completion in outs["reference"].items():
        assert outs["fast"][key].token_ids == completion.token_ids
        assert outs["fast"][key].logprobs == completion.logprobs
