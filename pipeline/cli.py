"""`pipeline`: one command for the whole DAG and each of its stages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pipeline.config import ConfigError, load_config

# Sub-command -> the stages it runs (their upstream runs too, or is a cache hit).
COMMANDS = {
    "run": None,
    "shard": ["shard"],
    "tokenize": ["tokenize"],
    "patchify": ["patchify"],
    "pretrain": ["pretrain_gpt", "pretrain_vit"],
    "finetune": ["finetune"],
    "evaluate": ["evaluate_gpt", "evaluate"],
    "batches": None,
    "plan": None,
}
HELP = {
    "run": "the whole DAG (or the config's `targets`): shard, tokenize, patchify, pretrain (GPT, ViT), finetune, evaluate",
    "shard": "write WebDataset shards of MNIST digits, digit grids and text, with manifests",
    "tokenize": "train the byte-level BPE tokenizer and write packed token shards",
    "patchify": "turn image shards into ViT patch shards",
    "pretrain": "pretrain the GPT and/or the ViT with DeepSpeed inside Ray Train",
    "finetune": "fine-tune the captioner (pretrained ViT encoder + cross-attention decoder)",
    "evaluate": "held-out metrics for the GPT, the ViT and the captioner",
    "batches": "print the sample keys of each global step of a training stage (what was in that batch?)",
    "plan": "per-GPU memory, throughput, time to compute-optimal data and checkpoint size of the config's GPT on a cluster",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="thousandwords: raw data to trained, evaluated transformers.")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a failure (accepted anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("config", help="YAML run config, e.g. configs/smoke.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain_gpt.train.max_steps=50")
        if name == "plan":
            p.add_argument("--nodes", type=int, help="number of nodes (default: the preset's num_workers over --gpus-per-node)")
            p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one training rank each (default 8)")
            p.add_argument("--mfu", type=float,
                           help="model FLOPs utilisation of the compute alone, before communication (default: "
                                "what the pipeline measured on one GPU, plan.MEASURED_MFU, bench/RESULTS.md)")
            p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80: an H100)")
            p.add_argument("--gbps-per-gpu", type=float, default=400.0,
                           help="bandwidth between nodes per GPU in Gb/s (default 400: a p5's EFA over 8 GPUs)")
            p.add_argument("--usd-per-gpu-hour", type=float, default=4.0, help="price of one GPU-hour (default 4.00)")
            p.add_argument("--overlap", choices=["on", "off"],
                           help="communication overlapped with compute (default: overlap_comm of the stage's ZeRO config)")
            p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
            continue
        p.add_argument("--workdir", help="where stage outputs go (local path or fsspec URL); default: the config's workdir")
        p.add_argument("--summary", help="write the run summary as JSON to this file")
        if name == "pretrain":
            p.add_argument("--model", choices=["gpt", "vit", "both"], default="both", help="which model to pretrain (default both)")
        if name == "batches":
            p.add_argument("--stage", required=True, help="pretrain_gpt, pretrain_vit or finetune")
            p.add_argument("--steps", help="A:B, steps A to B-1, numbered as in the training logs (from 1)")
            p.add_argument("--io", action="store_true",
                           help="instead of steps: per reader (rank x loader worker), the shards, bytes and read requests of epoch 0")
            p.add_argument("--world-size", type=int, help="split the global batch this many ways (default: the config's num_workers)")
            p.add_argument("--json", action="store_true", help="one JSON object per step")

    scaling = sub.add_parser("scaling", help="fit scaling laws to training runs and predict", description="fit scaling laws to training runs and predict")
    actions = scaling.add_subparsers(dest="action", required=True, metavar="ACTION")
    fit = actions.add_parser("fit", help="Chinchilla (approaches 3 and 2) and Kaplan laws, with 95%% bootstrap intervals",
                             description="Fit Chinchilla's L(N, D) = E + A/N^alpha + B/D^beta (approach 3: log-space Huber, "
                                         "L-BFGS-B from a grid of starts, 95%% intervals from a bootstrap over runs), the "
                                         "isoFLOP profiles (approach 2) and, from an experiment, Kaplan's L(C) on the compute frontier.")
    predict = actions.add_parser("predict", help="the fitted law's loss at a model size and token count, with an interval",
                                 description="Fit as `scaling fit` does, then predict the loss at --params and --tokens "
                                             "with the 95%% interval of the bootstrap refits' predictions.")
    sweep = actions.add_parser("sweep", help="train a grid of GPT sizes x token budgets, as many at once as the cluster allows",
                               description="Train every (model size, token budget) of a sweep file through the pipeline's "
                                           "pretrain_gpt stage, each run logged to the sweep's MLflow experiment and tagged "
                                           "with its name. Points already trained are cache hits: an interrupted sweep resumes.")
    sweep.add_argument("sweep_file", help="sweep YAML, e.g. configs/scaling/gpt-cpu.yaml")
    sweep.add_argument("--workdir", help="where the runs go (default: the base config's workdir)")
    sweep.add_argument("--holdout", action="store_true",
                       help="after the sweep: train the file's held-out run, fit the sweep, compare prediction and measurement")
    sweep.add_argument("--bootstrap", type=int, default=200, help="with --holdout: bootstrap refits for the interval")
    design = actions.add_parser("design", help="write a sweep file laid out as isoFLOP profiles around a first guess of N*(C)",
                                description="Lay out a GPT sweep as Chinchilla's isoFLOP profiles: --budgets compute budgets "
                                            "evenly spaced in log C over --compute, at each --sizes model sizes evenly spaced "
                                            "in log N from N*/spread to N*·spread around a first guess N*(C), each trained "
                                            "on C/(6N) tokens. The guess: the law fitted to --prior-experiment's runs (or "
                                            "--prior-points), else --tokens-per-param. Settings other than sizes and "
                                            "budgets come from TEMPLATE.")
    design.add_argument("template", help="a sweep YAML whose base, experiment, overrides and lr rule the design keeps")
    design.add_argument("--compute", type=float, nargs=2, required=True, metavar=("MIN", "MAX"), help="FLOPs of the smallest and largest budget")
    design.add_argument("--budgets", type=int, default=3, help="compute budgets (default 3)")
    design.add_argument("--sizes", type=int, default=5, help="model sizes per budget, >= 5 (default 5)")
    design.add_argument("--spread", type=float, default=4.0, help="sizes from N*/spread to N*·spread (default 4)")
    design.add_argument("--aspect", type=float, default=40.0, help="the shapes' d_model / n_layer (default 40)")
    design.add_argument("--tokens-per-param", type=float,
                        help="the first guess without a prior fit: D*/N* (default: Chinchilla's 20, as `pipeline plan` uses)")
    design.add_argument("--prior-experiment", help="fit Chinchilla's law to this experiment's runs for the first guess")
    design.add_argument("--prior-points", help="...or to this CSV (params,tokens,loss)")
    design.add_argument("--prior-sweep", help="with --prior-experiment: only that sweep's runs")
    design.add_argument("--tracking-uri", help="with --prior-experiment: the MLflow tracking URI")
    design.add_argument("--name", help="the new sweep's name (default: the template's plus -isoflop)")
    design.add_argument("--out", required=True, help="the sweep YAML to write (must not exist)")
    for p in (fit, predict):
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--experiment", help="MLflow experiment whose finished pretrain_gpt runs to fit")
        source.add_argument("--points", help="CSV with columns params,tokens,loss, one row per run")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's own default)")
        p.add_argument("--sweep", help="only the runs tagged with this sweep name")
        p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (default 200; 0: none)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    fit.add_argument("--stage", choices=("pretrain_gpt", "pretrain_vit"), default="pretrain_gpt",
                     help="which runs: GPT runs get Chinchilla's and Kaplan's laws, ViT runs Zhai's saturating law")
    fit.add_argument("--plots", metavar="DIR", default="scaling-plots",
                     help="write loss_vs_flops.png and isoflop.png here (default: scaling-plots; '' for none); "
                          "a fit of an experiment also logs them to a scaling_fit run there")
    predict.add_argument("--params", type=float, required=True, help="non-embedding parameters N")
    predict.add_argument("--tokens", type=float, required=True, help="training tokens D")

    read = sub.add_parser("predict", help="write out the digits of grid images with a fine-tuned captioner",
                          description="Print each grid image's digits, one line per row: a digit or '_' (blank) per "
                                      "cell. Images: grayscale, light digits on dark, 28x28-pixel cells, 1 to 10 rows "
                                      "and columns (the size says how many). Greedy decoding, batched, with a KV cache.")
    read.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="the fine-tune stage's checkpoint, as the run summary names it (stages.finetune.outputs.checkpoint)")
    read.add_argument("images", nargs="+", metavar="IMAGE", help="grid images (PNG)")
    read.add_argument("--json", action="store_true", help='one JSON object per image: {"image": PATH, "rows": ["37", "_1"]}')
    read.add_argument("--batch-size", type=int, default=64, help="images decoded at once (default 64)")
    compose = sub.add_parser("compose", help="a grid image of chosen text, from a split's real digits (for predict)",
                             description="Write a grid image (PNG, the convention predict reads) whose rows read "
                                         "ROW ...: a digit or '_' (blank) per cell, each digit cell a different digit "
                                         "of that class from DIGITS, a split's digit shards as the shard stage wrote "
                                         "them (the run summary's stages.shard.outputs.mnist_test, for instance).")
    compose.add_argument("--digits", required=True, metavar="DIR", help="a split's digit shards (<shard stage>/mnist/test)")
    compose.add_argument("--out", required=True, metavar="PNG", help="the image to write; must not exist")
    compose.add_argument("--times", type=int, default=1, help="repeat the rows this many times (default 1)")
    compose.add_argument("--skip", type=int, default=0, help="start each class this many digits in (default 0)")
    compose.add_argument("rows", nargs="+", metavar="ROW", help="a row's text: digits and '_', e.g. 0123456789")
    report = sub.add_parser("report", help="the latest pipeline run's stages and metrics, or two runs compared, from MLflow",
                            description="Read the tracking store: the latest pipeline run of an experiment as a table "
                                        "of stages (status, seconds, headline metrics; a cached stage shows the run that "
                                        "made its outputs), or with --compare two pipeline runs side by side, with the "
                                        "config keys and metrics that differ.")
    _store_options(report)
    report.add_argument("--experiment", default="thousandwords", help="MLflow experiment (default: thousandwords)")
    report.add_argument("--compare", nargs=2, metavar="RUN", help="two pipeline run ids (as `report` prints them)")
    ui = sub.add_parser("ui", help="the MLflow UI over a run's tracking store, on 127.0.0.1",
                        description="Start the MLflow UI against a run's tracking store and print its address; "
                                    "Ctrl-C stops it. It has no authentication: it binds to 127.0.0.1 unless --host "
                                    "says otherwise (reach it from elsewhere through an SSH tunnel).")
    _store_options(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    export = sub.add_parser("export", help="a training stage's checkpoint as a Hugging Face model folder",
                            description="Write a Hugging Face model folder (safetensors weights, config, tokenizer or "
                                        "image processor) from a training stage's checkpoint, at any ZeRO stage: the "
                                        "GPT loads with AutoModelForCausalLM, the ViT with ViTForImageClassification, "
                                        "the captioner with AutoModel and trust_remote_code=True.")
    export.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a training stage's checkpoint, as the run summary names it (stages.<stage>.outputs.checkpoint)")
    export.add_argument("--format", default="hf", choices=["hf"], help="hf: a Hugging Face transformers folder (the only one)")
    export.add_argument("--out", required=True, metavar="OUT", help="the folder to write; must not exist, or be empty")
    return parser


def _store_options(p: argparse.ArgumentParser) -> None:
    """Which MLflow tracking store a command reads."""
    p.add_argument("--workdir", help="a run's workdir: its own SQLite store (mlflow.db)")
    p.add_argument("--tracking-uri", help="an MLflow tracking URI instead (default: MLFLOW_TRACKING_URI)")


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr and a non-zero exit; `--debug` (anywhere on
    the command line) lets the traceback through instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from pipeline.scaling.chinchilla import FitError

    try:
        return _main(argv)
    except Exception as e:
        if debug:
            raise
        from pipeline.compose import ComposeError
        from pipeline.export import ExportError
        from pipeline.predict import ImageError
        from pipeline.report import ReportError
        from pipeline.train.checkpoint import CheckpointError

        if isinstance(e, ConfigError):
            print(f"config error: {e}", file=sys.stderr)
        elif isinstance(e, (ImageError, CheckpointError, ExportError, ReportError, ComposeError)):
            print(f"{argv[0] if argv else 'pipeline'}: {e}", file=sys.stderr)
        elif isinstance(e, FitError):
            print(f"scaling: {e}", file=sys.stderr)
        else:
            print(f"error: {_one_line(e)} (run with --debug for the traceback)", file=sys.stderr)
            return 1
        return 2


def _one_line(error: BaseException) -> str:
    """The error a user can act on: the cause of a Ray task's failure, its first line."""
    from ray.exceptions import RayTaskError

    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _main(argv: list[str]) -> int:
    import ray

    ray_was_up = ray.is_initialized()  # a caller that had Ray up keeps it; one this command starts, it stops
    parser = build_parser()
    # Overrides may come after the options too (`run CFG --workdir W a.b=1`): argparse
    # leaves those in `extra`.
    args, extra = parser.parse_known_args(argv)
    if args.command in ("scaling", "predict", "compose", "export", "report", "ui") and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "scaling":
        return _scaling(args, ray_was_up)
    if args.command == "predict":
        from pipeline.predict import predict_command

        print(predict_command(args.checkpoint, args.images, args.json, args.batch_size))
        return 0
    if args.command == "compose":
        from pipeline.compose import compose_command

        print(compose_command(args.digits, args.rows * args.times, args.out, args.skip))
        return 0
    if args.command == "report":
        from pipeline import report

        uri = report.resolve_uri(args.tracking_uri, args.workdir)
        print(report.compare(uri, *args.compare) if args.compare else report.report(uri, args.experiment))
        return 0
    if args.command == "ui":
        from pipeline.report import resolve_uri
        from pipeline.ui import ui_command

        return ui_command(resolve_uri(args.tracking_uri, args.workdir), args.host, args.port)
    if args.command == "export":
        from pipeline.export.command import export_command

        print(export_command(args.checkpoint, args.format, args.out))
        return 0
    for arg in extra:
        if arg.startswith("-") or "=" not in arg:
            parser.error(f"unrecognized argument: {arg}")
    args.overrides = list(args.overrides) + extra
    config = load_config(args.config, args.overrides)
    if args.command == "batches":
        return _batches(config, args, ray_was_up)
    if args.command == "plan":
        return _plan(config, args)

    from pipeline.runner import format_summary, run_pipeline

    targets = COMMANDS[args.command]
    if args.command == "pretrain" and args.model != "both":
        targets = [f"pretrain_{args.model}"]
    from pipeline import tracking
    from pipeline.train.preemption import EXIT_CODE, Preempted

    if args.workdir:
        config = dataclasses.replace(config, workdir=args.workdir)
    print("resolved config (also saved as config.yaml on the MLflow run; secrets redacted):", flush=True)
    print("  " + tracking.config_yaml(config).rstrip().replace("\n", "\n  "), flush=True)
    try:
        summary = run_pipeline(config, targets)
    except Preempted as e:
        _stop_local_ray(ray_was_up)
        print(str(e), file=sys.stderr)
        return EXIT_CODE
    _stop_local_ray(ray_was_up)  # flushes the workers' trailing logs, so the summary prints last
    print()
    print(format_summary(summary))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"\nsummary written to {args.summary}")
    return 0


def _batches(config, args, ray_was_up: bool) -> int:
    from pipeline import batches

    if args.io:
        per_reader = batches.reads(config, args.stage, args.world_size, args.workdir)
        _stop_local_ray(ray_was_up)
        for reader in per_reader:
            print(json.dumps(reader) if args.json else
                  f"rank {reader['rank']} worker {reader['worker']}: {reader['shards']} shards, "
                  f"{reader['bytes']} bytes, {reader['requests']} requests")
        return 0
    if not args.steps:
        raise ConfigError("pipeline batches needs --steps A:B (or --io)")
    steps = batches.parse_steps(args.steps)
    described = batches.describe(config, args.stage, steps, args.world_size, args.workdir)
    _stop_local_ray(ray_was_up)
    if args.json:
        for b in described:
            print(json.dumps(b))
    else:
        print(batches.format_text(described))
    return 0


def _plan(config, args) -> int:
    from pipeline import plan
    from pipeline.train.engine import load_zero_config

    zero_stage = config.pretrain_gpt.train.zero_stage
    overlap = (args.overlap == "on" if args.overlap
               else bool(load_zero_config(zero_stage)["zero_optimization"].get("overlap_comm", False)))
    hw = plan.Hardware(nodes=plan.world_of(config, args.nodes, args.gpus_per_node), gpus_per_node=args.gpus_per_node,
                       gpu_memory_gib=args.gpu_memory_gib, peak_flops=config.pretrain_gpt.train.peak_flops_per_worker,
                       mfu=plan.MEASURED_MFU if args.mfu is None else args.mfu, gbps_per_gpu=args.gbps_per_gpu,
                       usd_per_gpu_hour=args.usd_per_gpu_hour)
    p = plan.plan(config, hw, overlap)
    print(json.dumps(plan.as_dict(p)) if args.json else plan.format_plan(p))
    return 0


def _scaling(args, ray_was_up: bool) -> int:
    from pipeline.scaling.chinchilla import FitError
    from pipeline.scaling.commands import fit_command, fit_vit_command, predict_command

    if args.action == "sweep":
        from pipeline.scaling.sweep import run_holdout, run_sweep

        table = run_holdout(args.sweep_file, args.workdir, args.bootstrap) if args.holdout else run_sweep(args.sweep_file, args.workdir)
        _stop_local_ray(ray_was_up)
        print(table)
        return 0
    if args.action == "design":
        from pipeline.scaling.design import design_command

        prior = None
        if args.prior_experiment or args.prior_points:
            from pipeline.scaling.commands import fitted

            law = fitted(args.prior_points, args.prior_experiment, args.tracking_uri, args.prior_sweep)
            prior = lambda flops: float(law.compute_optimal(flops)[0])  # noqa: E731
        print(design_command(args.template, tuple(args.compute), args.budgets, args.sizes, args.spread, args.aspect,
                             args.name, args.tokens_per_param, prior, args.out, "pipeline " + " ".join(sys.argv[1:])))
        return 0
    source = (args.points, args.experiment, args.tracking_uri, args.sweep)
    if args.action == "predict":
        print(predict_command(*source, args.params, args.tokens, args.bootstrap, args.json))
    elif args.stage == "pretrain_vit":
        if not args.experiment:
            raise FitError("--stage pretrain_vit fits runs of an --experiment, not --points")
        print(fit_vit_command(args.experiment, args.tracking_uri, args.sweep, args.json, args.plots))
    else:
        print(fit_command(*source, args.bootstrap, args.json, args.plots))
    return 0


def _stop_local_ray(was_up: bool) -> None:
    """Shut down Ray if this command started it (it was not up before)."""
    import ray

    if ray.is_initialized() and not was_up:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

