"""`rerank-dist <stage>`: one subcommand per stage, plus `run` (all of them) and `config`.

Every subcommand takes `--config FILE.yaml` and dotted overrides (`train.lr=2e-4`). Errors in
input or config print one line each and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys

STAGES = {
    "prepare": "prepare the dataset (LlamaRec preprocessing, leave-one-out) into <run_dir>/data",
    "retrieve": "train the LRURec retriever and write top-K candidates for train/val/test",
    "train": "train the LLM ranker with LoRA/QLoRA (works under `accelerate launch`)",
    "score": "reload the saved adapter and score every user's candidates (works under `accelerate launch`)",
    "report": "print the final table and write report.md + loss.png",
    "run": "every stage in order (the main job)",
    "config": "print the resolved config, or every field with its doc (--fields)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank-dist", description="LRURec retriever -> LLM reranker, trained "
                                     "and scored with Accelerate.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog="overrides: section.field=value, e.g. train.lr=2e-4 model.quantization=nf4; "
                                  "`rerank-dist config --fields` lists every field")
        p.add_argument("--config", "-c", default=None, help="YAML config (defaults: the embedded CPU job)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, section.field=value")
        if name == "config":
            p.add_argument("--fields", action="store_true", help="list every field with type, default and doc")
    return parser


def _error_exit(err: Exception) -> int:
    for line in str(err).splitlines() or [type(err).__name__]:
        print(f"error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rerank_dist.config import ConfigError, describe_fields, load_config

    if args.stage == "config" and args.fields:
        print("\n".join(describe_fields()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _error_exit(err)
    if args.stage == "config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from rerank_dist import pipeline
    from rerank_dist.errors import USER_ERRORS

    stage = {"prepare": pipeline.prepare, "retrieve": pipeline.retrieve, "train": pipeline.train,
             "score": pipeline.score, "report": pipeline.report, "run": pipeline.run_all}[args.stage]
    try:
        stage(cfg)
    except USER_ERRORS as err:
        return _error_exit(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
