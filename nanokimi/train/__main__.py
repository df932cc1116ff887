"""`python -m nanokimi.train` = `nanokimi train`, one process per rank under torchrun:

    torchrun --nproc_per_node 2 -m nanokimi.train --preset tiny train.max_steps=200

Every rank builds the same Trainer on its own rank; rank 0 prepares the data first (the others wait, then
find it ready), prints, and writes the metrics and the checkpoint metadata. Without torchrun's environment
this is the ordinary single-process `nanokimi train`.
"""
import argparse
import sys


def main(argv=None) -> int:
    from nanokimi.checkpoint import CheckpointError
    from nanokimi.config import ConfigError
    from nanokimi.data import DataError
    from nanokimi.train.config import load_run_config
    from nanokimi.train.distributed import barrier, close_distributed, init_distributed
    from nanokimi.train.args import add_train_args, parse_train_args
    from nanokimi.train.trainer import Trainer, TrainingError, prepare_data

    parser = add_train_args(argparse.ArgumentParser(prog="python -m nanokimi.train"))
    args = parse_train_args(parser, sys.argv[1:] if argv is None else argv)
    if args.nproc > 1:
        print("nanokimi: error: --nproc is for `nanokimi train`; under torchrun set --nproc_per_node instead.",
              file=sys.stderr)
        return 2
    try:
        run = load_run_config(args.preset, args.config, args.overrides)
        rank, world_size = init_distributed(run.train.device)
        try:
            if rank == 0:
                prepare_data(run, progress=not args.no_progress)
            barrier()
            out = args.out or f"runs/{run.preset}"
            trainer = Trainer(run, out, resume=args.resume, progress=not args.no_progress, rank=rank,
                              world_size=world_size)
            if rank == 0:
                params = sum(p.numel() for p in trainer.model.parameters())
                print(f"training {run.preset} ({params / 1e6:.1f}M params) on {world_size} x {trainer.device} with "
                      f"{run.optim.name}; data {trainer.data_dir}; writing {out}", file=sys.stderr)
            result = trainer.fit()
            if rank == 0:
                val = (f"val loss {result['val_loss']:.4f}, val bits/byte {result['val_bpb']:.4f}"
                       if "val_loss" in result else "not evaluated")
                print(f"done: step {result['step']}, {result['tokens']:,} tokens, {val}; checkpoint "
                      f"{trainer.checkpoint_dir}")
            if run.train.sample_tokens > 0:  # every rank runs the sharded forward; rank 0 prints
                from nanokimi.infer.sample import sample_text
                text = sample_text(trainer.model, trainer.tokenizer_file, "def ", run.train.sample_tokens,
                                   temperature=0.8, seed=run.train.seed)
                if rank == 0:
                    print("sample:\n" + text)
        finally:
            close_distributed()
    except (ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError) as e:
        print(f"nanokimi: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
