"""The ``biotune`` command line: a thin layer over the library (the only place that prints)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from . import config as cfg
from .executors import TrainingFailedError

PRESETS = list(cfg.PRESETS)
STUDY_METHODS = ("biotune", "biotune_robust", "random", "full", "linear_probe", "l2_sp")


def _overrides(tokens: list[str]) -> list[str]:
    """``--ga.population 8`` / ``--ga.population=8`` -> ``ga.population=8``; anything else is an error."""
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            raise SystemExit(f"biotune: unrecognised argument {token!r}; config overrides look like "
                             "--section.key VALUE, e.g. --ga.population 8")
        if "=" in token:
            pairs.append(token[2:])
            i += 1
        elif i + 1 < len(tokens):
            pairs.append(f"{token[2:]}={tokens[i + 1]}")
            i += 2
        else:
            raise SystemExit(f"biotune: {token} needs a value")
    return pairs


def _print_table(frame: pd.DataFrame) -> None:
    with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200):
        print(frame.to_string(index=False))


def _add_executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=cfg.CHOICES["run.executor"],
                        help="where training runs execute (default serial); same as --run.executor")
    parser.add_argument("--workers", type=int, metavar="N", help="training runs at once; same as --run.workers")
    parser.add_argument("--gpus", type=_gpu_list, metavar="0,1,...",
                        help="GPUs the training runs go to, one worker pinned to each (default: every visible GPU; "
                             "'all' resets a stored choice); same as --run.gpus")
    parser.add_argument("--runs-per-gpu", type=int, metavar="N",
                        help="training runs sharing each GPU, each held to 1/N of its memory; same as --run.runs_per_gpu")


def _gpu_list(text: str) -> str:
    """``0,1,3`` -> the YAML list ``[0,1,3]``; ``all`` -> null (every visible GPU)."""
    if text.strip() == "all":
        return "null"
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected GPU indices separated by commas, e.g. 0,1,2,3 (or all), got {text!r}")
    return "[" + ",".join(parts) + "]"


def _executor_overrides(args) -> list[str]:
    pairs = []
    if getattr(args, "executor", None):
        pairs.append(f"run.executor={args.executor}")
    if getattr(args, "workers", None) is not None:
        pairs.append(f"run.workers={args.workers}")
    if getattr(args, "gpus", None) is not None:
        pairs.append(f"run.gpus={args.gpus}")
    if getattr(args, "runs_per_gpu", None) is not None:
        pairs.append(f"run.runs_per_gpu={args.runs_per_gpu}")
    return pairs


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_executor_options(parser)
    parser.add_argument("--dataset", help="dataset name (biotune datasets) or a path: .npz, .csv or an image folder")
    parser.add_argument("--model", help="model name (biotune models) or any timm model name")
    parser.add_argument("--preset", choices=PRESETS, help="config preset (default: cpu)")
    parser.add_argument("--config", help="YAML file with sections data/model/train/ga")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biotune", description="BioTune: evolutionary selective fine-tuning of pretrained CNNs.",
        epilog="Config overrides: any --section.key VALUE, e.g. --ga.population 8 --train.seeds [1,2]")
    _add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)

    datasets = sub.add_parser("datasets", help="list dataset names; `datasets describe NAME`: its splits' sizes and bytes")
    datasets.add_argument("action", nargs="?", choices=["list", "describe"], default="list")
    datasets.add_argument("name", nargs="?", help="with describe: a dataset name or path")
    datasets.add_argument("--preset", choices=PRESETS, default="cpu", help="with describe: whose input size and storage")
    datasets.add_argument("--model", help="with describe: whose input size (default: the preset's model)")
    sub.add_parser("models", help="list registered model names")
    describe = sub.add_parser("describe", help="a model's blocks: name, parameters, share")
    describe.add_argument("model")
    describe.add_argument("--num-classes", type=int, default=1000)

    search = sub.add_parser("search", help="run a BioTune search (or --resume one)")
    _add_run_options(search)
    search.add_argument("--searcher", choices=cfg.CHOICES["ga.searcher"],
                        help="BioTune's GA (default) or a baseline at its budget; same as --ga.searcher")
    search.add_argument("--resume", metavar="RUN_ID", help="continue a killed or interrupted run")
    search.add_argument("--final", action="store_true", help="run the final protocol after the search")

    final = sub.add_parser("final", help="final protocol (docs/algorithm.md §7) for a finished search")
    final.add_argument("run_id")
    final.add_argument("--quiet", action="store_true")
    _add_executor_options(final)

    baseline = sub.add_parser("baseline", help="a baseline through the same final protocol")
    baseline.add_argument("--method", required=True, help="full, linear_probe, lp_ft, l2_sp, l1_sp, autorgn, lora, adafilter")
    baseline.add_argument("--no-grid", action="store_true",
                          help="train the method's default hyperparameters only, not its grid")
    _add_run_options(baseline)

    sub.add_parser("runs", help="list runs with their status")
    compare = sub.add_parser("compare", help="one table for several runs")
    compare.add_argument("run_ids", nargs="+")

    study = sub.add_parser("study", help="datasets x methods x seeds with intervals and paired tests "
                                         "(results/study/NAME/: rows, summary, paired CSVs and figures)")
    study.add_argument("--name", help="the study's folder under results/study/ (default: the preset's name)")
    study.add_argument("--datasets", nargs="+", required=True, metavar="DATASET",
                       help="dataset names (biotune datasets) or paths: .npz, .csv or an image folder")
    study.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), metavar="METHOD",
                       help=f"searchers and baselines (default: {' '.join(STUDY_METHODS)})")
    study.add_argument("--seeds", type=int, default=3, help="matched cells: search, training and split seeds (default 3)")
    study.add_argument("--references", nargs="+", default=None, metavar="METHOD",
                       help="methods every other is paired against (default: full random)")
    study.add_argument("--model", help="model name (biotune models) or any timm model name")
    study.add_argument("--preset", choices=PRESETS, default="cpu", help="config preset (default: cpu)")
    study.add_argument("--jobs", type=int, default=1, help="rows at once, each in its own process")
    study.add_argument("--executor", dest="row_executor", choices=("process", "ray"), default="process",
                       help="how rows run at once (default process)")
    study.add_argument("--gpus", dest="row_gpus", type=_gpu_list, metavar="0,1,...",
                       help="GPUs the rows go to (default: every visible GPU)")

    demo = sub.add_parser("demo", help="small search + final protocol vs full FT and linear probing")
    demo.add_argument("--preset", default="demo", choices=PRESETS)
    demo.add_argument("--quiet", action="store_true")
    _add_executor_options(demo)

    bench = sub.add_parser("bench", help="seconds per fitness evaluation: a plain PyTorch loop, the levers off, "
                                         "the exact levers, pruning, side by side")
    bench.add_argument("--preset", choices=PRESETS, help="default: cpu (demo with --parallel)")
    bench.add_argument("--evaluations", type=int, default=3, help="random genomes besides full fine-tuning")
    bench.add_argument("--json", metavar="FILE", help="also write every row and the summary of ratios here")
    bench.add_argument("--parallel", action="store_true",
                       help="instead: one search with each executor (serial, process, ray; 1 and 2 workers), "
                            "side by side (default preset here: demo)")
    bench.add_argument("--schedule", action="store_true",
                       help="instead: the bound on a search's parallel speed-up from its batches, for 1-32 runs at "
                            "once (default preset here: paper); computed, nothing trains")
    bench.add_argument("--methods", nargs="+", metavar="METHOD",
                       help="instead: one training run of each method side by side, e.g. --methods full adafilter")

    notebooks = sub.add_parser("notebooks", help="run a plan of notebooks through papermill")
    notebook_commands = notebooks.add_subparsers(dest="notebooks_command", required=True)
    run_plan = notebook_commands.add_parser("run", help="execute a plan (notebooks/smoke.yaml, cpu.yaml, paper.yaml)")
    run_plan.add_argument("plan", help="YAML plan: name, parameters, runs of {notebook, name, parameters}")
    run_plan.add_argument("--only", action="append", metavar="NAME", help="run only this entry, or every entry of this notebook (repeatable)")
    run_plan.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                          help="parameter for every selected notebook, value parsed as YAML (e.g. device=cuda)")
    run_plan.add_argument("--force", action="store_true", help="rerun notebooks that finished before")
    run_plan.add_argument("--output-dir", default="results/notebooks", help="executed notebooks go to DIR/<plan name>/")
    run_plan.add_argument("--kernel", default="python3", help="Jupyter kernel (default: this Python)")
    params = notebook_commands.add_parser("params", help="a notebook's parameters, defaults and help")
    params.add_argument("notebook")
    cost = notebook_commands.add_parser("cost", help="a plan's training images and GPU hours, estimated from the "
                                        "throughput measured on an H100 (nothing trains)")
    cost.add_argument("plan", help="YAML plan, e.g. notebooks/paper.yaml")
    cost.add_argument("--gpus", nargs="+", type=int, default=[1, 4, 8], metavar="N",
                      help="wall hours on N GPUs (default: 1 4 8)")
    cost.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                      help="parameter for every notebook, as `notebooks run -p` takes it")

    data = sub.add_parser("data", help="the datasets and weights a plan or names need: check, fetch, or write fakes")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    for name, text in (("check", "what is present and what is missing, in seconds (exit status 2 if anything is)"),
                       ("fetch", "download what is missing, one item at a time, verified; then check")):
        command = data_commands.add_parser(name, help=text)
        command.add_argument("targets", nargs="+", metavar="PLAN_OR_NAME",
                             help="plans (notebooks/paper.yaml), dataset names or paths, model names")
        command.add_argument("--root", help="data root of every dataset (default: each plan run's data_root, else data)")
        command.add_argument("--no-verify", action="store_true",
                             help="accept files whose checksums differ from torchvision's (data.verify false)")
    fakes = data_commands.add_parser("fakes", help="tiny fakes of the paper's datasets in their exact on-disk "
                                                   "formats (make rehearse); read them with data.verify false")
    fakes.add_argument("root", help="data root to write them under")
    fakes.add_argument("names", nargs="*", help="datasets (default: all nine)")
    for command in _leaf_parsers(sub):  # the global flags after the command work too: search --store S
        _add_global_options(command, argparse.SUPPRESS)
    return parser


# Where each global flag means something; elsewhere it is refused rather than ignored. Without
# --store, the store is <results-dir>/runs.sqlite, so --results-dir also locates a store.
GLOBAL_FLAGS = {
    "store": ("--store", {"search", "final", "baseline", "runs", "compare", "demo", "study"}),
    "results_dir": ("--results-dir", {"search", "final", "baseline", "runs", "compare", "demo", "study"}),
}
ELSEWHERE = {"notebooks": "a plan's notebooks take -p store=FILE and --output-dir DIR",
             "bench": "bench writes its runs to a temporary store and folder"}


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    """--store, --results-dir and -v on the main parser (default None) and again on every command
    (default SUPPRESS, so a command's absent flag does not hide the main parser's)."""
    parser.add_argument("--store", default=default, help="run store (SQLite file); default results/runs.sqlite")
    parser.add_argument("--results-dir", default=default, help="folder for run folders (default results/)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False if default is None else default)


def _leaf_parsers(subparsers) -> list[argparse.ArgumentParser]:
    """The parsers a command line ends in: `search`, `notebooks run`, `data check`, ..."""
    leaves = []
    for command in dict.fromkeys(subparsers.choices.values()):
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += _leaf_parsers(nested[0]) if nested else [command]
    return leaves


def _refuse_global_flags(args, parser: argparse.ArgumentParser) -> None:
    for name, (flag, commands) in GLOBAL_FLAGS.items():
        if getattr(args, name, None) is not None and args.command not in commands:
            why = ELSEWHERE.get(args.command, "it reads and writes no run store")
            parser.error(f"{flag} has no effect on `biotune {args.command}` ({why}); it is for "
                         f"{', '.join(sorted(commands))}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if rest and args.command not in ("search", "baseline", "bench", "final", "demo", "datasets", "study"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    _refuse_global_flags(args, parser)
    if args.store is None and args.results_dir is not None:  # as a config's store_path: the one store of that folder
        args.store = str(Path(args.results_dir) / "runs.sqlite")
    overrides = (_overrides(rest) + ([f"results_dir={args.results_dir}"] if args.results_dir else [])
                 + _executor_overrides(args))
    try:
        return _run(args, overrides, rest)
    # Bad input of every kind (config, data, store, checkpoint, plan) raises one of these with a
    # message that says what to do; anything else is a bug and keeps its traceback.
    except BrokenPipeError:  # `biotune runs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except (ValueError, KeyError, OSError, TrainingFailedError) as error:
        print(f"biotune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("biotune: interrupted; finished evaluations are kept in the run store", file=sys.stderr)
        return 130


def _run(args, overrides: list[str], rest: list[str]) -> int:
    from . import experiment
    from .data import list_datasets
    from .genome import recipe_table
    from .models import create_model, list_models
    from .store import RunStore

    progress = not getattr(args, "quiet", False)
    if args.command == "datasets" and args.action == "describe":
        _describe_dataset(args, overrides)
    elif args.command == "datasets":
        if args.name:
            raise cfg.ConfigError(f"`biotune datasets` takes no name; describe one with: biotune datasets describe {args.name}")
        print("\n".join(list_datasets()))
    elif args.command == "models":
        print("\n".join(list_models()))
        print("(and any timm model name, blocks from its stage grouping)")
    elif args.command == "describe":
        model = create_model(args.model, args.num_classes, weights=None)
        table = pd.DataFrame(model.describe())
        table["share"] = (100 * table["share"]).map("{:.2f}%".format)
        table["params"] = table["params"].map("{:,}".format)
        print(f"{args.model} with a {args.num_classes}-class head: {model.num_params:,} parameters "
              f"in {len(model.blocks)} blocks")
        _print_table(table)
    elif args.command == "search":
        if args.searcher:
            overrides = [*overrides, f"ga.searcher={args.searcher}"]
        result = experiment.search(args.dataset, args.model, args.preset, config_file=args.config,
                                   overrides=overrides, resume=args.resume, store=args.store, progress=progress)
        print(f"run {result.run_id}: best fitness {result.best_fitness:.4f}; outputs in {result.folder}")
        for block, value in recipe_table(result.recipe).items():
            print(f"  {block:24s} {value}")
        if args.final:
            _print_table(experiment.final(result.run_id, store=args.store, progress=progress,
                                          overrides=_executor_overrides(args)))
    elif args.command == "final":  # the stored config, with other run.* settings only
        _print_table(experiment.final(args.run_id, store=args.store, progress=progress, overrides=overrides))
    elif args.command == "baseline":
        run_id, finals = experiment.run_baseline(args.method, args.dataset, args.model, args.preset or "cpu",
                                                 config_file=args.config, overrides=overrides,
                                                 grid=[{}] if args.no_grid else None,
                                                 store=args.store, progress=progress)
        print(f"run {run_id}")
        _print_table(finals)
    elif args.command == "runs":
        with RunStore(args.store) as store:
            _print_table(store.runs())
    elif args.command == "compare":
        _print_table(experiment.compare(args.run_ids, store=args.store))
    elif args.command == "demo":
        table, folder = experiment.demo(preset=args.preset, store=args.store, progress=progress, overrides=overrides)
        _print_table(table)
        print(f"convergence figure and tables: {folder}")
    elif args.command == "notebooks":
        return _notebooks(args)
    elif args.command == "study":
        _study(args, overrides)
    elif args.command == "data":
        return _data(args)
    elif args.command == "bench":
        from .bench import method_costs, parallel_bench, run_bench, schedule_speedups

        if args.schedule:
            _print_table(schedule_speedups(args.preset or "paper", overrides=overrides))
            return 0
        if args.parallel:
            table, summary = parallel_bench(args.preset or "demo", overrides, json_file=args.json)
            _print_table(table)
            print(json.dumps(summary, indent=2))
            return 0
        args.preset = args.preset or "cpu"
        if args.methods:
            _print_table(method_costs(args.preset, tuple(args.methods), overrides).round(3))
            return 0
        if args.evaluations < 0:
            raise cfg.ConfigError(f"--evaluations must be >= 0, got {args.evaluations}")
        table, summary = run_bench(preset=args.preset, evaluations=args.evaluations, overrides=overrides,
                                   json_file=args.json)
        _print_table(table.round({"seconds": 2, "images_per_s": 1, "val_macro_acc": 4}))
        print(json.dumps(summary, indent=2))
    return 0


def _describe_dataset(args, overrides: list[str]) -> None:
    """Each split's images and the bytes they take in memory, on disk and at the model input."""
    from .experiment import load_data, run_overrides

    if not args.name:
        raise cfg.ConfigError("datasets describe needs a dataset name or path, e.g. biotune datasets describe svhn")
    config = cfg.resolve(args.preset, overrides=run_overrides(args.name, args.model, overrides, None))
    dataset = load_data(config)
    table = pd.DataFrame(dataset.describe())
    print(f"{dataset.name} for {config.model.name} at {dataset.preprocess.image_size} px "
          f"(preset {args.preset}, data.store_at {config.data.store_at}), cached under {config.data.root}/cache")
    for column in ("array_bytes", "disk_bytes", "at_input_bytes"):
        table[column.replace("_bytes", "_MB")] = table.pop(column).map(
            lambda b: "-" if b is None or pd.isna(b) else f"{b / 2**20:,.1f}")
    _print_table(table)


def _data(args) -> int:
    """`data check|fetch`: one row per dataset and weight file, what is missing and the command that
    fetches it on stderr, exit status 2 while anything is missing; `data fakes`."""
    from . import staging

    if args.data_command == "fakes":
        from .fakes import FAKES, write_fake_dataset

        for name in args.names or FAKES.names():
            write_fake_dataset(name, args.root)
        print(f"fakes of {', '.join(args.names or FAKES.names())} under {args.root}; read them with data.verify false")
        return 0
    plans = [target for target in args.targets if target.endswith((".yaml", ".yml"))]
    configs = []
    if plans:
        from .notebooks import load_plan, training_configs

        configs = [config for plan in plans for config in training_configs(load_plan(plan)[1])]
    names = [target for target in args.targets if target not in plans]
    needs = staging.merge_needs(staging.config_needs(configs) + staging.name_needs(names), root=args.root,
                                verify=not args.no_verify)
    statuses = staging.fetch(needs) if args.data_command == "fetch" else staging.check(needs)
    _print_table(staging.table(statuses))
    report = staging.missing_report(statuses)
    if report:
        print(report, file=sys.stderr)
        return 2
    return 0


def _plan_cost(plan: str, gpus: list[int], extra: dict) -> int:
    """`notebooks cost`: per notebook and in total, images and hours as low-high ranges."""
    from .estimate import plan_costs, summary

    if min(gpus) < 1:
        raise cfg.ConfigError(f"--gpus takes numbers of GPUs >= 1, got {gpus}")
    costs = plan_costs(plan, extra)
    table = summary(costs, gpus)

    def span(column: str, digits: int) -> pd.Series:
        return table[f"{column}_low"].round(digits).map(f"{{:,.{digits}f}}".format) + " - " + \
            table[f"{column}_high"].round(digits).map(f"{{:,.{digits}f}}".format)

    shown = pd.DataFrame({"notebook": table["notebook"], "rows": table["rows"].astype(int),
                          "reused": table["reused"].astype(int), "training images": span("train_images", 0),
                          "GPU hours": span("gpu_hours", 1)})
    for n in gpus:
        shown[f"wall hours, {n} GPU{'s' if n > 1 else ''}"] = [
            f"{low:,.1f} - {high:,.1f}" for low, high in zip(table[f"wall_hours_low_{n}"], table[f"wall_hours_high_{n}"])]
    _print_table(shown)
    print("\nthroughput per model:")
    for (model, source), rows in costs.groupby(["model", "throughput"]):
        print(f"  {model}: {source} ({len(rows)} rows)")
    print("reused: rows that are the run of an earlier row (cost nothing). low: every run stops at its earliest "
          "(patience + 1 epochs), at the faster measured rate; high: every run trains max_epochs at the slower "
          "rate. Assumptions: biotune/estimate.py; measurements: results/reference/throughput_h100.json")
    return 0


def _study(args, overrides: list[str]) -> None:
    """Run or continue a study; print its test summary and paired comparisons."""
    from .study import REFERENCES, run_study

    tables, folder = run_study(args.name or args.preset, args.datasets, args.methods, args.seeds, preset=args.preset,
                               model=args.model, overrides=overrides, references=tuple(args.references or REFERENCES),
                               jobs=args.jobs, executor=args.row_executor, gpus=cfg.load_yaml(args.row_gpus or "null", "--gpus"),
                               store=args.store, progress=args.jobs == 1)
    for key in ("summary", "paired"):
        _print_table(tables[key].query("metric == 'test'").drop(columns="metric").round(4))
    failed = tables["rows"].query("status != 'ok'")
    if len(failed):
        print(f"biotune: {len(failed)} row(s) failed; their errors are in {folder / 'rows.csv'}", file=sys.stderr)
    print(f"tables and figures: {folder}")


def _notebooks(args) -> int:
    """`notebooks run`: the summary table, exit status 1 if any notebook failed; `notebooks params`;
    `notebooks cost`: the plan's estimated GPU hours."""
    try:
        from . import notebooks
    except ImportError as error:
        raise SystemExit(f"biotune: error: `biotune notebooks` needs the notebooks extra ({error}): "
                         "pip install -c constraints.txt -e '.[notebooks]'") from error
    if args.notebooks_command == "params":
        _print_table(pd.DataFrame([{"name": name, **info} for name, info in
                                   notebooks.notebook_parameters(args.notebook).items()]))
        return 0
    extra = {}
    for pair in args.parameter:
        name, separator, raw = pair.partition("=")
        if not separator or not name.isidentifier():
            raise cfg.ConfigError(f"-p {pair!r}: expected NAME=VALUE with a parameter name, e.g. -p device=cuda "
                                  "or -p 'overrides={train.max_epochs: 3}'")
        extra[name] = cfg.load_yaml(raw, f"-p {name}") if raw else None
    if args.notebooks_command == "cost":
        return _plan_cost(args.plan, args.gpus, extra)
    summary = notebooks.run_plan(args.plan, output_dir=args.output_dir, force=args.force, only=args.only,
                                 extra_parameters=extra, kernel_name=args.kernel)
    _print_table(summary)
    failed = summary[summary["status"] == "failed"]
    if len(failed):
        print(f"biotune: {len(failed)} of {len(summary)} notebooks failed: {', '.join(failed['name'])}; "
              "the executed copies above show the failing cell", file=sys.stderr)
        return 1
    return 0
