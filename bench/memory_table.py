"""The dry run's memory estimate for the two recipes under each backend, and whether it fits a device.

    python bench/memory_table.py                      # 8 processes, 80 GB devices
    python bench/memory_table.py --world-size 4 --device-gb 40

Offline and weightless: the recipes' configs (configs/qwen3_4b_qlora.yaml, configs/llamarec_llama2_7b.yaml)
with train.backend set to each backend in turn, the batch plan at that world size, and the architectures
shipped in configs/models/. Every number is rerank_dist.memory.estimate_training_memory's, per device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rerank_dist.settings import load_config  # noqa: E402
from rerank_dist.memory import BACKEND_NAMES, BACKENDS, GIB, estimate_training_memory, find_architecture  # noqa: E402
from rerank_dist.plan import plan_for  # noqa: E402

RECIPES = {"Qwen3-4B QLoRA": REPO / "configs/qwen3_4b_qlora.yaml",
           "Llama-2-7B QLoRA (LlamaRec)": REPO / "configs/llamarec_llama2_7b.yaml"}


def table(title: str, recipe: Path, world_size: int, device_bytes: float) -> list[str]:
    """Lines for one recipe: a row per backend (GiB per device) and whether it fits device_bytes."""
    lines = [f"{title}: {recipe.relative_to(REPO)}, {world_size} processes"]
    header = (f"  {'backend':<25} {'total':>6} {'weights':>8} {'gathered':>9} {'LoRA+opt':>9} {'buckets':>8} "
              f"{'activ.':>7}  fits {device_bytes / 1e9:g} GB ({device_bytes / GIB:.1f} GiB)")
    lines.append(header)
    summaries = []
    for backend in BACKENDS:
        cfg = load_config(recipe, overrides=[f"train.backend={backend}"], world_size=world_size)
        plan = plan_for(cfg, world_size)
        found = find_architecture(cfg.model.name_or_path, cfg.model.cache_dir)
        if found is None:
            raise SystemExit(f"no config.json for {cfg.model.name_or_path} offline")
        arch, _ = found
        e = estimate_training_memory(arch, cfg.model, plan.micro_batch_size, cfg.prompt.max_prompt_tokens,
                                     world_size, mixed_precision=cfg.train.mixed_precision, backend=backend)
        buckets = e["ddp_buckets"] + e["reduce_bucket"]
        headroom = (device_bytes - e["total"]) / GIB
        fits = f"yes, {headroom:.1f} GiB spare" if headroom >= 0 else f"NO, {-headroom:.1f} GiB over"
        lines.append(f"  {backend + ' (' + BACKEND_NAMES[backend] + ')':<25} {e['total'] / GIB:6.1f} "
                     f"{e['weights'] / GIB:8.2f} {e['gathered_working_set'] / GIB:9.2f} {e['lora_adamw'] / GIB:9.3f} "
                     f"{buckets / GIB:8.3f} {e['activations'] / GIB:7.1f}  {fits}")
        summaries.append(f"  {backend}: {e['summary']}")
    lines.append(f"  batch plan: {plan.describe()}, {cfg.prompt.max_prompt_tokens} tokens per prompt")
    return lines + summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=8, help="processes, one per device")
    parser.add_argument("--device-gb", type=float, default=80.0,
                        help="device memory in GB (1e9 bytes), as sold: an '80 GB' H100 is taken as 80e9 bytes")
    args = parser.parse_args()
    print(f"memory per device (GiB) on {args.world_size} x {args.device_gb:g} GB; "
          "weights = base model kept on the device, gathered = weights held whole while computed")
    for title, recipe in RECIPES.items():
        print()
        print("\n".join(table(title, recipe, args.world_size, args.device_gb * 1e9)))


if __name__ == "__main__":
    main()
