"""`accelerate launch launch/score.py -c CONFIG [overrides]`: distributed scoring of the saved adapter."""

import sys

from rerank_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
