"""`nanokimi train --nproc N ...`: start N training processes on this machine through torchrun."""
import signal
import subprocess
import sys


def launch_torchrun(nproc: int, argv: list[str], module: str = "nanokimi.train") -> int:
    """Run `torchrun --standalone --nproc_per_node NPROC -m MODULE ARGV` (ARGV: the subcommand's arguments;
    --nproc is dropped) and return its exit code. --standalone picks a free rendezvous port, so
    several runs can share a machine."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}.")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *_without_nproc(argv)]
    proc = subprocess.Popen(command)

    def stop(signum, frame):  # torchrun passes SIGTERM on to the ranks, which save and stop (it dies of SIGUSR1)
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group); wait for the ranks' save
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
