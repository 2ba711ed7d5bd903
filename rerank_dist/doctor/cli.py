"""`rerank-dist doctor RUN [flags]`: the flags, and the exit status CI can gate on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rerank_dist.doctor.columns import ROLE_NAMES

DESCRIPTION = """Check a reranker run for every way it quietly fails; one line per check (pass / warn / fail /
skipped), the number behind it and the fix. RUN is a rerank_dist run directory, a Hugging Face
Trainer / TRL output directory, or a predictions file (Parquet / JSONL / CSV: user, candidates,
scores or a ranked list, target). Writes doctor.md, doctor.json and PNGs into the run (or --out).
Exit status: 0 all passed, 1 warnings, 2 failures (or unreadable input)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory, Trainer output directory, or predictions file")
    p.add_argument("--out", type=Path, default=None,
                   help="write doctor.md / doctor.json / PNGs here (default: the run)")
    p.add_argument("--no-model", action="store_true",
                   help="do not reload the weights to re-score a sample (skips scores_reproduce and the base-model "
                        "comparison)")
    p.add_argument("--sample-users", type=int, default=16, help="prompts re-scored, in whole scorer batches (16)")
    p.add_argument("--device", default=None, help="device for re-scoring (default: cuda if available, else cpu)")
    p.add_argument("--split", default="test", help="scored split of a rerank_dist run (test)")
    p.add_argument("--predictions", type=Path, default=None, help="foreign runs: predictions / rankings file")
    p.add_argument("--train-file", type=Path, default=None,
                   help="foreign runs: training examples (prompt/completion, text, messages, or candidates/target)")
    p.add_argument("--metrics", type=Path, default=None, help="foreign runs: the reported metrics (JSON)")
    p.add_argument("--column", action="append", default=[], metavar="ROLE=NAME",
                   help=f"name a column: roles {', '.join(sorted(ROLE_NAMES))}; a train_ prefix names a "
                        f"training-file column (train_prompt=question)")
    p.add_argument("--retriever-order", choices=("auto", "given", "none"), default="auto",
                   help="predictions: where the retriever's order comes from: auto (a retriever_scores or "
                        "retriever_rank column), given (the candidates column is in retriever order), none")
    p.add_argument("--label-ids", default=None, help="foreign runs: the token ids the scorer read, comma-separated")
    p.add_argument("--train-negatives", choices=("retriever", "random", "mixed"), default=None,
                   help="foreign runs: how the training negatives were drawn, if known")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples over users (2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the re-scoring sample (0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")


def _columns(items: list[str]) -> dict[str, str]:
    out = {}
    known = set(ROLE_NAMES) | {f"train_{r}" for r in ROLE_NAMES}
    for item in items:
        role, sep, name = item.partition("=")
        if not sep or not name or role not in known:
            raise ValueError(f"--column {item!r}: expected ROLE=NAME with ROLE one of {', '.join(sorted(ROLE_NAMES))} "
                             f"(or train_ROLE)")
        out[role] = name
    return out


def main(args: argparse.Namespace) -> int:
    from rerank_dist.doctor import DoctorInputError, DoctorOptions, run_doctor

    def error(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        label_ids = [int(x) for x in args.label_ids.split(",")] if args.label_ids else None
        columns = _columns(args.column)
    except ValueError as err:
        return error(str(err) if "--column" in str(err) else f"--label-ids {args.label_ids!r}: expected integers")
    options = DoctorOptions(split=args.split, model=not args.no_model, sample_users=args.sample_users,
                            device=args.device, predictions=args.predictions, train_file=args.train_file,
                            metrics=args.metrics, columns=columns, retriever_order=args.retriever_order,
                            label_ids=label_ids, train_negatives=args.train_negatives, resamples=args.bootstrap,
                            seed=args.seed, out=args.out, plots=not args.no_plots)
    try:
        report = run_doctor(args.run, options, say=lambda m: print(m, flush=True))
    except (DoctorInputError, FileNotFoundError) as err:
        return error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return report.exit_code
