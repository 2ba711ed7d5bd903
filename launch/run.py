"""Entry point for `accelerate launch`: every stage, or one, on all processes.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/run.py run -c configs/smollm2_cpu.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml launch/run.py train -c configs/qwen3_4b_qlora.yaml
"""

import sys

from rerank_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
