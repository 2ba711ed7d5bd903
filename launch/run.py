"""Entry point for `accelerate launch` on GPUs: every stage, or one, on all processes.

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml launch/run.py run -c configs/qwen3_4b_qlora.yaml

`rerank-dist launch` does the same without a launcher file, and is the way to run several CPU
processes: `accelerate launch --cpu --num_processes N` starts only one (its multi-CPU path needs mpirun).
"""

import sys

from rerank_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
