"""`accelerate launch launch/train.py -c CONFIG [overrides]`: the ranker training stage on all processes."""

import sys

from rerank_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
