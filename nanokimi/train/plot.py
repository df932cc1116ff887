"""Loss curves of one or more runs against tokens seen, in one PNG."""
import json
import warnings
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN/metrics.jsonl; a line that is not JSON (a write cut off by a crash) is skipped with a
    warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{run_dir}' is not a training run folder.")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "iteration" in record and "step" not in record:
            sft_run = Path(run_dir) / "iter_1" / "sft"
            raise ValueError(f"'{run_dir}' is a LEPA run (one metrics row per iteration, no training steps); plot "
                             f"its fine-tuning runs instead: nanokimi plot {sft_run} --out X.png")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            warnings.warn(f"{path} line {number} is not a metrics record (a write cut off by a crash?); skipped.",
                          stacklevel=2)
            continue
        records.append(record)
    return records


def plot_runs(run_dirs: list[str], out: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        label = Path(run_dir).name
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        val = [(r["tokens"], r["val_bpb"]) for r in records if "val_bpb" in r]
        if train:
            train_ax.plot(*zip(*train), label=label)
        if val:
            val_ax.plot(*zip(*val), marker="o", label=label)
    train_ax.set(xlabel="tokens", ylabel="train loss (nats/token)", title="training loss")
    val_ax.set(xlabel="tokens", ylabel="validation bits per byte", title="validation")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
