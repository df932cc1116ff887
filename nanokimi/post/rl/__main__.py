"""`python -m nanokimi.post.rl` = `nanokimi rl`, one process per rank under torchrun:

    torchrun --nproc_per_node 2 -m nanokimi.post.rl --ckpt runs/base --task ladder rl.steps=50
"""
import sys

from nanokimi.post.rl.cli import main_distributed

if __name__ == "__main__":
    sys.exit(main_distributed())
