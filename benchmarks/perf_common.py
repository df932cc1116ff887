"""Shared plumbing of the benchmark scripts: environment facts, timing, peer subprocesses, result files."""
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def results_path(name: str, quick: bool) -> Path:
    """benchmarks/results/NAME.json for real runs; a temp folder for --quick smoke runs, so they never
    overwrite measured results."""
    folder = Path(tempfile.gettempdir()) / "nanokimi-quick" if quick else ROOT / "benchmarks" / "results"
    return folder / f"{name}.json"


def git_commit() -> str:
    """The commit being measured: $NANOKIMI_COMMIT (set where the tree travels without .git), else git's HEAD."""
    if os.environ.get("NANOKIMI_COMMIT"):
        return os.environ["NANOKIMI_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):  # a result file without a commit is still useful
        return "unknown"


def environment(device: torch.device) -> dict:
    commit = git_commit()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(device=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=commit, torch=torch.__version__, python=sys.version.split()[0])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in ms, each call timed on its own after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def free_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def find_peer_script(given: str | None) -> Path | None:
    candidates = [given] if given else [ROOT / ".gpu" / "bench" / "peer_hf.py", ROOT / "shared" / "bench" / "peer_hf.py",
                                        ROOT / ".." / "shared" / "bench" / "peer_hf.py"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c).resolve()
    return None


def import_script(path: str | Path):
    """A peer script (e.g. peer_hf.py) imported as a module from its path, without touching sys.path."""
    import importlib.util

    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_peer(script: Path | None, args: list[str], timeout_s: int) -> dict:
    """Run the HF peer script in a subprocess with --json; returns its JSON or {"error": ...}."""
    if script is None:
        return {"error": "peer script not found; pass --peer-script PATH (e.g. ../shared/bench/peer_hf.py)"}
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"peer_{os.getpid()}_{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(script), *args, "--json", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"peer timed out after {timeout_s}s: {' '.join(cmd)}"}
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"error": f"peer exited with {proc.returncode}: {tail}"}
    result = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    return result


def train_for_seconds(trainer, seconds: float, started: float, warm: int, probe: int, margin: float,
                      max_steps: int | None = None) -> tuple[list[float], float]:
    """Train a Trainer for a time budget: `probe` steps (the first `warm` compile and warm up, so the step time is
    measured on the rest), then `train.max_steps` (which the learning-rate schedule reads) set so the run ends about
    `seconds` after `started` (times `margin`, at most `max_steps`), and train to it. -> (losses, seconds per step)."""
    losses = []
    for i in range(probe):
        if i == warm:
            warmed = time.perf_counter()
        losses.append(trainer.train_step())
    per_step = (time.perf_counter() - warmed) / (probe - warm)
    remaining = seconds - (time.perf_counter() - started)
    steps = max(probe + 1, probe + int(remaining / per_step * margin))
    trainer.run.train.max_steps = steps if max_steps is None else min(max_steps, steps)
    return losses, per_step


def finish_training(trainer, losses: list[float], log_every: int = 0) -> list[float]:
    """Train to `train.max_steps`, printing the loss every `log_every` steps (0: never)."""
    while trainer.step < trainer.run.train.max_steps:
        losses.append(trainer.train_step())
        if log_every and trainer.step % log_every == 0:
            print(f"  step {trainer.step}: loss {losses[-1]:.4f}", flush=True)
    return losses


def write_results(path: Path, env: dict, results: dict, extra: dict | None = None) -> None:
    """Merge `results` (by config name) into the JSON file at path, so partial runs add up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("results", {})
        except (json.JSONDecodeError, AttributeError):
            old = {}
    payload = {**env, **(extra or {}), "results": {**old, **results}}
    path.write_text(json.dumps(payload, indent=1, default=str))


SCHEMA = ("benchmark", "device", "date", "commit", "torch", "rows")


def load_results(path: Path) -> dict:
    """A result file in the one schema of benchmarks/README.md: benchmark, device, date, commit, torch, rows (a
    list of dicts), and the file's other keys under "extra". Files are never rewritten; older ones spell some keys
    differently, which is normalised here: git_commit for commit, results or methods (a dict by config or method
    name: each becomes a row with that "name") for rows, no benchmark (then the script whose name begins the file's, e.g.
    generate_profile.json -> "generate")."""
    path = Path(path)
    data = json.loads(path.read_text())
    rows = data.get("rows", data.get("results", data.get("methods")))
    if isinstance(rows, dict):
        rows = [{"name": name, **(value if isinstance(value, dict) else {"value": value})}
                for name, value in rows.items()]
    benchmark = data.get("benchmark")
    if benchmark is None:
        scripts = sorted((p.stem for p in (ROOT / "benchmarks").glob("*.py")), key=len, reverse=True)
        benchmark = next((name for name in scripts if path.stem == name or path.stem.startswith(name + "_")),
                         path.stem)
    known = {"benchmark", "device", "date", "commit", "git_commit", "torch", "rows", "results"}
    return dict(benchmark=benchmark, device=data.get("device"), date=data.get("date"),
                commit=data.get("commit", data.get("git_commit")), torch=data.get("torch"), rows=rows,
                extra={k: v for k, v in data.items() if k not in known})


def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 600 else text[:600] + " ..."


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


KINDS = [  # first match wins; patterns are matched against the lower-cased kernel name
    ("nccl", r"nccl"),
    ("attention", r"flash|fmha|cudnn.*attn|attention|sdpa"),
    ("grouped_gemm", r"grouped|group_gemm"),
    ("fla", r"chunk_|kda|delta|recurrent|solve_tril|wy_|l2norm|gated|merge_16|fwd_kernel|bwd_kernel"),
    ("fused", r"^triton_"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|sm90|sm80|matmul|dot_"),
    ("copy", r"copy|memcpy|memset|cat|fill"),
]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def kernel_times(prof) -> dict[str, float]:
    """GPU microseconds per kernel name over the profiled steps."""
    times = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            times[event.name] = times.get(event.name, 0.0) + event.device_time_total
    return times


def kernel_profile(fn, calls: int, top: int = 20) -> dict:
    """Run fn() `calls` times under torch.profiler (CUDA): GPU ms per call by kernel kind, kernels per
    call, and the top kernels by GPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    per_call = {name: t / calls / 1e3 for name, t in kernel_times(prof).items() if "#" not in name}
    kinds = {}
    for name, t in per_call.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + t
    count = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.name)
    return dict(gpu_busy_ms=round(sum(per_call.values()), 3), kernels_per_call=round(count / calls),
                kinds_ms={k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                top_kernels=[[n[:160], round(t, 4), kind_of(n)] for n, t in sorted(per_call.items(), key=lambda kv: -kv[1])[:top]])
