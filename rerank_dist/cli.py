"""`rerank-dist <stage>`: one subcommand per stage, plus `run` (all of them), `launch`, `config` and `doctor`.

Every stage takes `--config FILE.yaml` and dotted overrides (`train.lr=2e-4`). On an existing run
directory a stage starts from that run's recorded config.yaml. Errors in input or config print one
line each and exit with status 2, before any model loads; nothing half-written is left behind.
`rerank-dist launch [--nproc-per-node N ...] <stage> ...` runs a stage on N processes per node.
train, score and run stop on SIGUSR1 with their state saved and exit with status 75; the same
command again resumes them (preemption.py, slurm/).
"""

from __future__ import annotations

import argparse
import os
import sys

STAGES = {
    "prepare": "prepare the dataset (LlamaRec preprocessing, leave-one-out) into <run_dir>/data",
    "retrieve": "train the LRURec retriever and write top-K candidates for train/val/test",
    "train": "train the LLM ranker with LoRA/QLoRA (any number of processes, see launch)",
    "score": "reload the saved adapter and score every user's candidates (any number of processes)",
    "export": "write export/adapter (PEFT) and export/merged (16-bit, sharded safetensors) from ranker/best",
    "report": "print the final table and write report.md + loss.png",
    "run": "every stage in order (the main job)",
    "config": "print the resolved config, or every field with its doc (--fields)",
    "grid": "tune the retriever as LlamaRec did (weight decay x dropout, chosen on validation), resumable",
    "tables": "LlamaRec's Tables 1 and 3: datasets x seeds x {retriever, ranker}, ours next to the paper's, resumable",
}
# Stages that stop cleanly on a preemption warning (SIGUSR1): checkpoint, then exit 75 (preemption.py).
PREEMPTIBLE_STAGES = ("train", "score", "run", "tables")
EPILOG = ("overrides: section.field=value, e.g. train.lr=2e-4 model.quantization=nf4; "
          "`rerank-dist config --fields` lists every field")


def build_parser() -> argparse.ArgumentParser:
    from rerank_dist import launcher

    parser = argparse.ArgumentParser(prog="rerank-dist", description="LRURec retriever -> LLM reranker, trained "
                                     "and scored with Accelerate on one or many processes.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        p.add_argument("--config", "-c", default=None, help="YAML config (defaults: the embedded CPU job)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, section.field=value")
        if name == "config":
            p.add_argument("--fields", action="store_true", help="list every field with type, default and doc")
        if name in ("grid", "tables"):
            from rerank_dist.retrieval.grid import GRID

            p.add_argument("--weight-decay", type=float, nargs="+", default=GRID["weight_decay"],
                           help=f"the grid's weight decays (LlamaRec: {GRID['weight_decay']})")
            p.add_argument("--dropout", type=float, nargs="+", default=GRID["dropout"],
                           help=f"the grid's dropouts, attn_dropout the same (LlamaRec: {GRID['dropout']})")
        if name == "grid":
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                           help="seeds the selected configuration is trained at; its test figures are their mean")
            p.add_argument("--grid-seed", type=int, default=0, help="the seed every configuration is trained at")
            p.add_argument("--out", default="", help="also write the summary here (a .json path; .md and .png next "
                           "to it), e.g. bench/results/retriever_grid.json")
        if name == "tables":
            _tables_arguments(p)
        if name in ("run", "train"):
            p.add_argument("--dry-run", action="store_true",
                           help="print the training plan (processes, batches, steps, precision, memory) and exit")
    p = sub.add_parser("launch", help="run a stage on N processes per node (torchrun; CPU or GPU)",
                       description=launcher.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    launcher.add_arguments(p)
    from rerank_dist.doctor import cli as doctor_cli

    p = sub.add_parser("doctor", help="check a run (this tool's, a Trainer/TRL output dir, or a predictions file) "
                       "for every way a reranker quietly fails; exit 0/1/2 = pass/warnings/failures",
                       description=doctor_cli.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor_cli.add_arguments(p)
    return parser


def _tables_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("overrides (section.field=value) apply to every cell; give them before the options or after `--`, "
                "as --datasets and --seeds take several values. " + EPILOG)
    p.add_argument("--root", default="runs/tables", help="where the cells' run directories and tables.json/.md go")
    p.add_argument("--datasets", nargs="+", default=["ml-latest-small"], metavar="DATASET",
                   help="NAME (ml-latest-small, bundled; ml-100k, ml-1m, beauty, games: downloaded), NAME=DIR (a "
                   "named dataset's files in DIR) or LABEL=FILE.yaml (any dataset: FILE's data: section)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of every cell (retriever.seed, prompt.seed and train.seed); the grid's too")
    p.add_argument("--no-grid", action="store_true",
                   help="take the retriever settings as configured instead of tuning them per dataset first")
    p.add_argument("--dry-run", action="store_true", help="print the cells, their state and their commands, and exit")
    p.add_argument("--cell", default="", metavar="NAME", help="run this one cell (e.g. ml-latest-small/seed0/ranker)")
    p.add_argument("--list-cells", action="store_true",
                   help="print one line per cell: name, kind, state, the cell it reads (tab-separated)")
    p.add_argument("--tables-only", action="store_true", help="write the tables from the cells done so far, run nothing")
    p.add_argument("--out", default="", help="also write the tables here (a .json path, .md next to it)")


def _error_exit(err: BaseException) -> int:
    for line in str(err).splitlines() or [type(err).__name__]:
        print(f"error: {line}", file=sys.stderr)
    return 2


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage in PREEMPTIBLE_STAGES:
        from rerank_dist import preemption

        preemption.install()  # first thing: the signal may come while the model is still loading
    from rerank_dist.config import ConfigError, describe_fields
    from rerank_dist.settings import resolve_config

    if args.stage == "launch":
        return _launch(args)
    if args.stage == "doctor":  # reads any run as it is: no config to resolve, one process
        from rerank_dist.doctor import cli as doctor_cli

        return doctor_cli.main(args)
    if args.stage == "tables":  # the cells resolve their own configs, each in its own run directory
        return _tables(args)
    if args.stage == "config" and args.fields:
        print("\n".join(describe_fields()))
        return 0
    try:
        cfg, recorded = resolve_config(args.config, args.overrides)
    except ConfigError as err:
        return _error_exit(err)
    if recorded is not None and _is_main() and args.stage != "config":
        print(f"settings: {recorded} (this run's own), then the config file and overrides given", flush=True)
    if args.stage == "config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if getattr(args, "dry_run", False):
        return _dry_run(cfg)
    if args.stage == "grid":
        return _grid(args, cfg)
    return _run_stage(args.stage, cfg)


def _grid(args, cfg) -> int:
    from rerank_dist import pipeline
    from rerank_dist.errors import USER_ERRORS

    space = {"weight_decay": args.weight_decay, "dropout": args.dropout}
    problems = [f"--{name.replace('_', '-')}: expected values in [0, 1], got {v}" for name, values in space.items()
                for v in values if not 0.0 <= v <= 1.0]
    if problems:
        return _error_exit(ValueError("\n".join(problems)))
    main = _is_main()
    try:
        pipeline.retriever_grid(cfg, lambda m: print(m, flush=True) if main else None, space,
                                tuple(args.seeds), args.grid_seed, args.out)
    except USER_ERRORS as err:
        return _error_exit(err)
    return 0


def _tables(args) -> int:
    from pathlib import Path

    from rerank_dist import llamarec_tables as tables, preemption
    from rerank_dist.distributed import process_state
    from rerank_dist.errors import USER_ERRORS

    try:
        plan = tables.make_plan(Path(args.root), args.datasets, args.seeds, not args.no_grid, args.config,
                                args.overrides, {"weight_decay": args.weight_decay, "dropout": args.dropout})
        configs = tables.check_plan(plan)  # every cell's config, every problem at once, before any model loads
        if args.list_cells:
            for cell in tables.cells(plan):
                print("\t".join([cell.name, cell.kind, tables.cell_state(plan, cell), cell.after(plan) or "-"]))
            return 0
        if args.dry_run:
            print("\n".join(tables.dry_run_lines(plan)))
            return 0
        if args.tables_only:
            print(tables.markdown(tables.write_tables(plan, args.out)), end="")
            return 0
        state = process_state(configs[0].train.backend)
    except USER_ERRORS as err:
        return _error_exit(err)

    def log(message: str) -> None:
        if state.is_main_process:
            print(message, flush=True)

    try:
        todo = [tables.find_cell(plan, args.cell)] if args.cell else tables.cells(plan)
        for cell in todo:
            status = tables.cell_state(plan, cell)
            if status == "done" and not args.cell:
                log(f"[tables] {cell.name}: done, skipped")
                continue
            log(f"[tables] {cell.name}: {status} -> running")
            tables.run_cell(plan, cell, log)
            state.wait_for_everyone()  # the next cell's state is read from what this one wrote
        if state.is_main_process and not args.cell:
            log(tables.markdown(tables.write_tables(plan, args.out)))
            log(f"[tables] {plan.root / tables.TABLES_FILE} (+ .md)" + (f" and {args.out}" if args.out else ""))
    except USER_ERRORS as err:
        return _error_exit(err)
    except preemption.Preempted as stop:
        log(f"preempted: {stop}; exit status {stop.code}: run the same command again (or requeue the job) to resume")
        state.destroy_process_group()
        return stop.code
    state.destroy_process_group()
    return 0


def _run_stage(stage_name: str, cfg) -> int:
    from rerank_dist import pipeline, preemption
    from rerank_dist.distributed import process_state
    from rerank_dist.errors import USER_ERRORS

    stage = {"prepare": pipeline.prepare, "retrieve": pipeline.retrieve, "train": pipeline.train,
             "score": pipeline.score, "export": pipeline.export, "report": pipeline.report,
             "run": pipeline.run_all}[stage_name]
    # Training stages start the process group their backend needs (DeepSpeed's own under zero2/zero3).
    try:
        state = process_state(cfg.train.backend if stage_name in ("train", "run") else "ddp")
    except USER_ERRORS as err:  # e.g. zero3 without a launcher, or a launcher config for another backend
        return _error_exit(err)

    def log(message: str) -> None:  # one copy of each stage message, however many processes
        if state.is_main_process:
            print(message, flush=True)

    try:
        if stage_name in ("prepare", "report"):
            # Single-process work: under a launcher the main process does it, the others wait.
            with state.main_process_first():
                if state.is_main_process:
                    stage(cfg, log)
        else:
            stage(cfg, log)
    except USER_ERRORS as err:
        return _error_exit(err)
    except preemption.Preempted as stop:  # every process agreed to stop here, its state saved
        log(f"preempted: {stop}; exit status {stop.code}: run the same command again (or requeue the job) to resume")
        state.destroy_process_group()
        return stop.code
    state.destroy_process_group()  # every process got here: leave the job cleanly (NCCL warns otherwise)
    return 0


def _dry_run(cfg, world_size: int | None = None, nodes: int = 1, cpu: bool | None = None) -> int:
    from rerank_dist.plan import dry_run_lines, plan_for

    for line in dry_run_lines(cfg, plan_for(cfg, world_size), nodes, cpu):
        print(line)
    return 0


def _launch(args) -> int:
    """Check everything that can be checked for the whole world, then become torchrun."""
    from rerank_dist import launcher
    from rerank_dist.config import ConfigError
    from rerank_dist.settings import resolve_config

    problem = launcher.check(args)
    if problem:
        return _error_exit(ValueError(problem))
    nproc = launcher.nproc_per_node(args)
    world = nproc * args.nnodes
    # The stage's own arguments, parsed as the workers will parse them.
    stage_args = build_parser().parse_args(args.command)
    if stage_args.stage == "tables" and (stage_args.dry_run or stage_args.list_cells):
        return _tables(stage_args)
    try:
        cfg, _ = resolve_config(stage_args.config, stage_args.overrides, world_size=world)
    except ConfigError as err:
        return _error_exit(err)
    if getattr(stage_args, "dry_run", False):
        return _dry_run(cfg, world, args.nnodes, cpu=launcher.use_cpu(args))
    return launcher.run_torchrun(args, nproc)


if __name__ == "__main__":
    sys.exit(main())
