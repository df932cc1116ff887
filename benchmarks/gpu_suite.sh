#!/usr/bin/env bash
# Everything nanokimi measures on one CUDA GPU, split in parts that each fit a 10-minute slot:
#   bash benchmarks/gpu_suite.sh tests      # the GPU tests (each compiles tiny models: minutes)
#   bash benchmarks/gpu_suite.sh train      # Muon step, training throughput vs HF (with the whole-step graph)
#   bash benchmarks/gpu_suite.sh decode     # decoding vs HF + long context, MoBA vs SDPA, attention backends
#   bash benchmarks/gpu_suite.sh attnres    # AttnRes overhead (its compile of full mode takes minutes)
#   bash benchmarks/gpu_suite.sh profile    # where the training step's GPU time goes (kernels by kind)
#   bash benchmarks/gpu_suite.sh engine     # the inference engine: decode A/B, TTFT, offline; its GPU tests
#   bash benchmarks/gpu_suite.sh serve      # nanokimi serve vs transformers serve on the Mooncake trace
#   bash benchmarks/gpu_suite.sh post       # the RL demonstration (benchmarks/rl_ladder.py)
#   bash benchmarks/gpu_suite.sh rollout    # Seer: plain vs divided / context / speculative rollouts
#   bash benchmarks/gpu_suite.sh kdaverify  # a KDA hybrid's verify steps, eager vs graphed; their GPU tests
#   bash benchmarks/gpu_suite.sh kdaop      # fla's KDA kernels vs the naive op, the speculative and engine GPU tests
#   bash benchmarks/gpu_suite.sh enginepeer # bench-dsv3-900m offline vs HF generate and generate_batch
#   bash benchmarks/gpu_suite.sh prefill    # a hybrid's prefill step: short segments in the slot kernel or not
#   GPU_STEPS="LIMIT command;..." bash benchmarks/gpu_suite.sh custom
# Expects fla-core wheels in .whl/ (bash ../shared/bench/gpu_wheels.sh; other wheel folders named .whl-*/ are
# installed too) and the HF peer script in .gpu/bench/ (cp -r ../shared/bench .gpu/) or shared/bench/. Results land in benchmarks/results/ and, when $OUT is
# set, the new ones come back in $OUT/results.tgz with the log. Where the tree travels with a .git that is
# not its own (seen on the lent GPU machines: results recorded an older HEAD), start the command with
# NANOKIMI_COMMIT=<the tree's commit>.
set -u
export PYTHONUNBUFFERED=1
if ls .whl*/*.whl >/dev/null 2>&1; then  # .whl/ and any .whl-*/ carried beside it (serve stack, newer transformers)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nanokimi-site .whl*/*.whl
  export PYTHONPATH=/tmp/nanokimi-site:$PWD PATH=/tmp/nanokimi-site/bin:$PATH  # bin: transformers serve
else
  export PYTHONPATH=$PWD
fi
# Triton's cache (fla's autotuning results included): restored from .gpu/compile_cache.tgz.part-* when a
# previous run left it there, and packed into $OUT at the end, so later runs skip the autotuning.
export TRITON_CACHE_DIR=/tmp/nk-cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/nk-cache/inductor
# .gpu-slim/ holds a smaller one (fla's autotuning picks without the binaries of every config tried) for calls
# whose wheels leave no room for the whole cache.
for cache in .gpu .gpu-slim; do
  if ls $cache/compile_cache.tgz.part-* >/dev/null 2>&1; then cat $cache/compile_cache.tgz.part-* | tar xzf - -C /tmp; break; fi
done
log=${OUT:-/tmp}/gpu_suite_$1.log
touch /tmp/nk-suite-start
step() {  # step SECONDS command...: run with a time limit, keep going on failure
  local limit=$1; shift
  echo "=== $* (limit ${limit}s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
case "$1" in
  tests)
    step 560 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider ;;
  train)
    step 110 python3 benchmarks/muon_step.py --profile
    step 460 python3 benchmarks/train_step.py --peer-script .gpu/bench/peer_hf.py --peer-timeout 200 ;;
  decode)
    step 380 python3 benchmarks/generate.py --peer-script .gpu/bench/peer_hf.py
    step 140 python3 benchmarks/moba.py
    step 40 python3 benchmarks/attention_backends.py ;;
  attnres)
    step 560 python3 benchmarks/attnres_overhead.py ;;
  profile)
    step "${PROFILE_LIMIT:-500}" python3 benchmarks/profile_step.py ${PROFILE_ARGS:-} ;;
  engine)  # the engine's decode defaults A/B, TTFT and offline throughput, then its GPU tests
    step 400 python3 benchmarks/engine.py --presets bench-kl-900m --parts decode,ttft,offline,ab --profile --time-budget 320
    step 160 python3 -m pytest -q -m gpu tests/test_engine.py tests/test_kda_decode.py -p no:cacheprovider ;;
  serve)  # the Mooncake trace replay against transformers serve (carry the wheels docs/serve.md lists)
    step 560 python3 benchmarks/serve.py ;;
  post)  # the RL demonstration alone (rollout.py, lepa_ladder.py and nbce_icl.py each take a slot of their own)
    step 560 python3 benchmarks/rl_ladder.py --total-seconds 530 --pretrain-seconds 170 --rl-seconds 90 ;;
  kdaop)  # fla's KDA kernels against the naive op (one config per autotuned kernel), then the engine's GPU tests
    step 240 python3 -m pytest -v -m gpu tests/test_kda_op.py -p no:cacheprovider --durations=0
    step 100 python3 -m pytest -q -m gpu tests/test_speculative.py -p no:cacheprovider
    step 220 python3 -m pytest -q -m gpu tests/test_engine.py tests/test_kda_decode.py -p no:cacheprovider ;;
  enginepeer)  # offline throughput beside HF generate and transformers' continuous batching (carry .whl-serve)
    step 560 python3 benchmarks/engine.py --presets bench-dsv3-900m --parts offline,peer --peer-requests 16 \
      --out benchmarks/results/engine_peer_cb.json ;;
  rollout)  # Seer's rollout techniques against the plain engine, then the speculative GPU tests
    step 450 python3 benchmarks/rollout.py --budget-seconds 420
    step 100 python3 -m pytest -q -m gpu tests/test_speculative.py tests/test_seer_scheduler.py -p no:cacheprovider ;;
  kdaverify)  # speculative verify steps of a KDA hybrid, eager vs in the graphed step, then their GPU tests
    step 200 python3 benchmarks/kda_verify.py
    step 350 python3 -m pytest -q -m gpu tests/test_speculative.py tests/test_kda_decode.py -p no:cacheprovider ;;
  prefill)  # one bench-kl-900m prefill step, a prompt's last partial block through the slot kernel vs chunk_kda
    for mode in auto off; do
      step 150 python3 benchmarks/engine_prefill_host.py --device cuda --preset bench-kl-900m --short-segments $mode \
        --label "bench-kl-900m, short segments $mode"
    done
    step 250 python3 -m pytest -q -m gpu tests/test_engine.py tests/test_kda_decode.py -p no:cacheprovider ;;
  custom)  # GPU_STEPS="LIMIT command;LIMIT command;..." (for one-off runs)
    IFS=';' read -ra parts <<< "$GPU_STEPS"
    for part in "${parts[@]}"; do read -r limit cmd <<< "$part"; step "$limit" bash -c "$cmd"; done ;;
  *) echo "usage: $0 tests|train|decode|attnres|profile|engine|serve|post|kdaop|enginepeer|rollout|kdaverify|prefill|custom"
     exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then
  # one archive: a call brings back at most 8 files from $OUT and leaves the rest out
  find benchmarks/results -newer /tmp/nk-suite-start -type f > /tmp/nk-new-results
  tar czf "$OUT/results.tgz" -T /tmp/nk-new-results
  # 16 MB per file and four files come back: a larger cache would return truncated, so it is left out
  tar czf /tmp/nk-cache.tgz -C /tmp nk-cache/triton
  if [ "$(stat -c %s /tmp/nk-cache.tgz)" -le $((60 * 1024 * 1024)) ]; then
    split -b 15M /tmp/nk-cache.tgz "$OUT/compile_cache.tgz.part-"
  else
    echo "Triton cache $(du -h /tmp/nk-cache.tgz | cut -f1): too large to bring back, not packed" | tee -a "$log"
  fi
fi

