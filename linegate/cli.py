"""The `linegate` console script.

It lives outside `edge` so that the runtime package never imports training or export, and
it imports each of them only for the subcommands that need them: `linegate run` and
`linegate watch` start on a box without torch.
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("linegate")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _split_counts(text: str):
    from training.data import SplitCounts, SplitFractions

    if text == "auto":
        return SplitFractions()
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) != 4 or min(values) < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError("--split takes auto or four counts: TRAIN_NORMAL,CALIB_NORMAL,"
                                         "CALIB_PER_ANOMALY,TRAIN_PER_ANOMALY (seed: 70,30,15,2)") from None
    return SplitCounts(*values)


def cmd_train(args: argparse.Namespace) -> int:
    from export.onnx_export import export_onnx
    from training.train import train

    weights = None if args.weights == "random" else args.weights
    metrics = train(args.data, args.out, args.normal_class, args.model, args.seed, weights,
                    args.image_size, args.split, aggregate=args.aggregate, threshold=args.threshold,
                    epochs=args.epochs, coreset_ratio=args.coreset_ratio, dims=args.dims,
                    augment=args.augment, neighbourhood=args.neighbourhood, geometry=args.geometry,
                    backbone=args.backbone, bank_size=args.bank_size, projection_dims=args.projection_dims)
    _print_metrics(metrics)
    print(f"report: {args.out}/report/report.html")
    if metrics["skipped"]:
        print(f"skipped {len(metrics['skipped'])} unreadable file(s): see the warnings above")
    if not args.no_export:
        print(f"bundle: {export_onnx(args.out)}")
    return 0


def _print_metrics(metrics: dict) -> None:
    test, cal = metrics["test"], metrics["calibration"]
    if "detector_choice" in metrics:
        print(metrics["detector_choice"]["reason"])
    print(f"calibration: score {cal['aggregate']} (asked: {cal['aggregate_requested']}), threshold "
          f"{cal['threshold']:.4g} ({cal['method']}), AUROC {cal['auroc']:.4f}")
    print(f"test: AUROC {test['auroc']:.4f}  accuracy {test['accuracy']:.4f}  precision "
          f"{test['precision']:.4f}  recall {test['recall']:.4f}  confusion {test['confusion']}")


def _geometry_help() -> str:
    return ("auto (default: from the training images' sizes), stretch, aspect or tile:SIZE[,OVERLAP]; "
            "see README, Frame geometry")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.train import evaluate

    metrics = evaluate(args.run, aggregate=args.aggregate, threshold=args.threshold)
    _print_metrics(metrics)
    print(f"metrics: {args.run}/metrics.json  report: {args.run}/report/report.html")
    if args.aggregate or args.threshold:
        print(f"run.json updated; re-export the bundle with `linegate export onnx {args.run}`")
    return 0


def _precisions(text: str, target: str) -> list[str]:
    from export.precision import PRECISIONS

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in PRECISIONS]
    if bad or not values:
        raise ValueError(f"--precision {text!r}: a comma list of {', '.join(PRECISIONS)}")
    if target == "tensorrt" and len(values) != 1:
        raise ValueError("linegate export tensorrt builds one engine: give one --precision (fp32, fp16 or int8)")
    return values


def cmd_export(args: argparse.Namespace) -> int:
    from export.precision import Tolerance

    tolerance = Tolerance(args.max_flips, args.max_auroc_drop)
    if args.target == "tensorrt":
        from export.tensorrt_build import build_engine

        precision = _precisions(args.precision or "fp16", "tensorrt")[0]
        path = build_engine(args.path, precision, args.max_batch, args.opt_batch, args.workspace_gib,
                            args.timing_cache, args.run, tolerance, validate=not args.no_validate)
        print(f"engine: {path}")
        return 0
    from export.precision import add_variants

    precisions = _precisions(args.precision or ("fp32" if args.target == "onnx" else "fp16,int8"), args.target)
    if args.target == "onnx":
        from export.onnx_export import export_onnx

        bundle = export_onnx(args.path, args.out)
        print(f"bundle: {bundle}")
        run = args.path
    else:  # quantize: variants of an existing bundle
        bundle, run = args.path, args.run
    from export.precision import summary

    for precision, facts in add_variants(bundle, precisions, run, tolerance).items():
        print(f"{precision}: written (sha256 {facts['sha256'][:12]}): {summary(facts['deviation'])}")
    return 0


# `linegate run` flags -> the config keys they set (flags override the --config file).
RUN_FLAG_KEYS = {
    "bundle": "engine.bundle", "engine": "engine.kind", "precision": "engine.precision",
    "max_batch": "batching.max_batch", "max_wait_ms": "batching.max_wait_ms",
    "threshold": "decision.threshold", "aggregate": "decision.aggregate",
    "overlay_accepts": "overlay.accepts_every", "publish": "publisher.endpoint",
    "wait_subscribers": "publisher.wait_subscribers", "wait_timeout": "publisher.wait_timeout_s",
    "sndhwm": "publisher.sndhwm", "stop_timeout": "service.stop_timeout_s",
    "control": "control.endpoint", "metrics": "metrics.listen", "publish_frames": "publisher.frames",
}


def _run_config(args: argparse.Namespace):
    from edge.config import ConfigError, apply_overrides, read_toml, validate

    overrides = {key: getattr(args, dest) for dest, key in RUN_FLAG_KEYS.items()
                 if getattr(args, dest, None) is not None}
    if args.config:
        raw, where = read_toml(args.config), args.config
        if overrides or args.source:
            where += " (with command-line overrides)"
    elif not (args.bundle and args.source):
        raise ValueError("give --config FILE.toml, or --bundle DIR and at least one --source")
    else:
        raw, where = {}, "command line"
    try:
        return validate(apply_overrides(raw, overrides, args.source), where)
    except ConfigError as exc:
        if where == "command line":  # name the flag the user typed, not the config key
            message = str(exc)
            for dest, key in RUN_FLAG_KEYS.items():
                message = message.replace(f"key '{key}'", f"--{dest.replace('_', '-')} ({key})")
            raise ValueError(message) from None
        raise


def cmd_run(args: argparse.Namespace) -> int:
    from edge.service import run_service

    config = _run_config(args)
    if not args.verbose:
        logging.getLogger().setLevel(config.logging.level.upper())
    return run_service(config, reload=lambda: _run_config(args))  # SIGHUP: the file again, flags on top


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge.config import load_config
    from edge.service import preflight

    config = load_config(args.file)
    checked = preflight(config).checked  # everything `run` checks before reading a frame
    print(f"{args.file}: ok")
    for line in checked.lines:
        print(f"  {line}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from edge.auth import make_keypair

    public, secret = make_keypair(args.dir, args.name)
    key = public.read_text().split("public-key", 1)[1].split('"')[1]
    print(f"public key {key}\n  {public}  (share: the publisher's allowed_keys directory, or "
          f"subscribers' --server-key)\n  {secret}  (keep private, mode 0600)")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from lineside.watch import watch

    return watch(args.endpoint, json_lines=args.json_lines, count=args.count,
                 save_overlays=args.save_overlays, timeout_s=args.timeout_s,
                 server_key=args.server_key, client_key=args.client_key)


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.bench import run

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, frames=args.frames, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    from lineside.watch import add_watch_arguments

    parser = argparse.ArgumentParser(prog="linegate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic parts -> train -> calibrate -> export -> stream -> subscriber")
    p.add_argument("--workdir", default="demo-run", help="where the data, run and bundle go (default: demo-run)")
    p.add_argument("--frames", type=int, default=200, help="parts to stream in the live run")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="fit, calibrate and evaluate a detector; export the bundle")
    p.add_argument("data", help="one folder per class, or the MVTec AD layout")
    p.add_argument("--normal-class", default="normal")
    p.add_argument("--model", default="auto", choices=["auto", "padim", "fcdd", "patchcore"],
                   help="auto (default): fit PaDiM and PatchCore, keep the better on the calibration set "
                        "(RUN/candidates/ holds both); or force one")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="lite0", choices=["lite0", "lite1", "lite2"],
                   help="EfficientNet-Lite backbone (default lite0; benchmarks/results/backbones.md compares them)")
    p.add_argument("--weights", default="imagenet",
                   help="backbone weights: imagenet (packaged), random, or a .pth file of --backbone's architecture")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--geometry", default="auto", help=_geometry_help())
    p.add_argument("--split", type=_split_counts, default=None,
                   help="auto (default: 60%% of the good images fit, 20%% calibrate, 20%% test; defects half "
                        "calibrate, half test, 2 per class for outlier exposure) or four counts "
                        "TRAIN_NORMAL,CALIB_NORMAL,CALIB_PER_ANOMALY,TRAIN_PER_ANOMALY (the seed protocol: "
                        "70,30,15,2)")
    p.add_argument("--aggregate", default="auto",
                   help="image score from the anomaly map: auto (default: the best calibration AUROC, near "
                        "ties to the widest separation), mean (the seeds'), max, topk:P (mean of the top P%% "
                        "cells), each optionally after a Gaussian blur of the map: max+blur:1")
    p.add_argument("--threshold", default="binormal",
                   help="binormal (default: the cutoff with the best TPR - FPR between normal distributions "
                        "fitted to each class's Box-Cox transformed calibration scores; youden's point when "
                        "it cannot be fitted), youden (seed: the same criterion on the calibration ROC; when "
                        "the classes do not overlap, the middle of the gap between them), f1, fpr:RATE "
                        "(largest tolerated false-reject rate of good parts on the calibration set, e.g. "
                        "fpr:0.02) or cost:C@P (least expected cost on a line "
                        "where P of the parts are defective and an escape costs C false rejects, e.g. "
                        "cost:20@0.01)")
    p.add_argument("--epochs", type=int, default=None, help="FCDD training epochs (default 200, the seed's)")
    p.add_argument("--coreset-ratio", type=float, default=None,
                   help="PatchCore memory bank size as a fraction of the training patches (default 0.1)")
    p.add_argument("--bank-size", type=int, default=None,
                   help="PatchCore: most memory bank entries (default 4096; 0: the coreset ratio alone)")
    p.add_argument("--projection-dims", type=int, default=None,
                   help="PatchCore: principal components the patches are projected to (default 64; 0: all)")
    p.add_argument("--dims", type=int, default=None,
                   help="PaDiM random feature dimensions (default: the paper's 100)")
    p.add_argument("--neighbourhood", type=int, default=None,
                   help="PaDiM: average each backbone feature map over an NxN neighbourhood before the "
                        "Gaussians (odd N; default 3, locally aware features as in PatchCore; 1: the "
                        "paper's raw features)")
    p.add_argument("--augment", default=None,
                   help="PaDiM and PatchCore: add mirrored copies of the normal training images: hflip, "
                        "vflip or hflip,vflip. Only where a mirrored part looks normal (e.g. lit from above: "
                        "hflip); a part fitted the wrong way round would then pass. jpeg[:Q] adds JPEG-compressed "
                        "copies at qualities Q..95 (default Q 75): for a camera that sends MJPEG. Combine: "
                        "hflip,jpeg:80. Default: none")
    p.add_argument("--no-export", action="store_true", help="skip writing RUN/bundle")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="recalibrate and evaluate a run: metrics.json + RUN/report/report.html")
    p.add_argument("run")
    p.add_argument("--aggregate", default=None, help="recalibrate with another aggregate (stored in run.json)")
    p.add_argument("--threshold", default=None, help="recalibrate with another threshold method (stored in run.json)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a run to a bundle; reduced-precision variants; TensorRT engines",
                       description="onnx RUN: the run -> RUN/bundle (model.onnx) [+ variants with --precision]. "
                                   "quantize BUNDLE: FP16/INT8 ONNX variants, each validated against FP32 on the "
                                   "run's calibration images. tensorrt BUNDLE: an engine for this GPU from the "
                                   "bundle's ONNX model of --precision.")
    p.add_argument("target", choices=["onnx", "quantize", "tensorrt"])
    p.add_argument("path", help="RUN for onnx, BUNDLE for quantize and tensorrt")
    p.add_argument("--out", default=None, help="onnx: bundle directory (default RUN/bundle)")
    p.add_argument("--precision", default=None,
                   help="onnx/quantize: comma list of fp32,fp16,int8 (default fp32 / fp16,int8); "
                        "tensorrt: one of fp32, fp16, int8 (default fp16)")
    p.add_argument("--run", default=None,
                   help="quantize/tensorrt: the training run whose calibration images validate the variant "
                        "(default: the bundle's parent directory)")
    p.add_argument("--max-flips", type=int, default=1,
                   help="calibration decisions a variant may change vs FP32 (default 1)")
    p.add_argument("--max-auroc-drop", type=float, default=0.005,
                   help="calibration AUROC a variant may lose vs FP32 (default 0.005)")
    p.add_argument("--max-batch", type=int, default=8, help="tensorrt: largest batch of the profile (default 8)")
    p.add_argument("--opt-batch", type=int, default=None, help="tensorrt: batch to tune for (default --max-batch)")
    p.add_argument("--workspace-gib", type=float, default=2.0, help="tensorrt: builder workspace limit (GiB)")
    p.add_argument("--timing-cache", default=None,
                   help="tensorrt: timing cache file kept between builds (default ~/.cache/linegate/)")
    p.add_argument("--no-validate", action="store_true",
                   help="tensorrt: skip comparing the engine with ONNX Runtime on calibration images")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="stream sources through a bundle and publish decisions",
                       description="Run the edge runtime from a TOML config (--config; see "
                       "systemd/linegate.toml) and/or flags; a flag overrides the file's key.")
    p.add_argument("--config", metavar="FILE.toml", help="the service config (validated before anything starts)")
    p.add_argument("--bundle")
    p.add_argument("--source", action="append",
                   help="folder:PATH, video:PATH, camera:INDEX|PATH|URL, gst:PIPELINE, synthetic[:k=v,...]; "
                        "repeatable (ids cam0, cam1, ...); replaces the config's [[source]] tables")
    p.add_argument("--publish", default="tcp://127.0.0.1:5556", help="ZeroMQ endpoint to bind")
    p.add_argument("--engine", default=None, choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto (default): TensorRT where the bundle has an engine and this box a GPU for it, "
                        "else ONNX Runtime")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8"],
                   help="which of the bundle's models to run (default: fp32 on ONNX Runtime, the best "
                        "engine on TensorRT)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    p.add_argument("--aggregate", default=None, help="mean, max or topk:P (needs --threshold)")
    p.add_argument("--overlay-accepts", type=int, default=0, metavar="N",
                   help="overlay every Nth accepted frame too (rejects always get one; 0 = none)")
    p.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="wait for N subscriptions before reading the sources")
    p.add_argument("--wait-timeout", type=float, default=10.0)
    p.add_argument("--sndhwm", type=int, default=1000, help="send high-water mark per subscriber")
    p.add_argument("--stop-timeout", type=float, metavar="S",
                   help="seconds from SIGTERM to exit, draining included (default 10)")
    p.add_argument("--control", metavar="ENDPOINT", help="control endpoint for `linegate ctl` (e.g. tcp://127.0.0.1:5557)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics (e.g. 127.0.0.1:9108)")
    p.add_argument("--publish-frames", choices=["none", "reject"], help="publish each reject's full frame (PNG)")
    # Every flag that maps to a config key defaults to None here, whatever its add_argument
    # says: only flags actually given override the --config file (defaults live in edge.config).
    p.set_defaults(func=cmd_run, **{dest: None for dest in RUN_FLAG_KEYS})

    p = sub.add_parser("check-config", help="validate a `linegate run` config file and exit")
    p.add_argument("file", metavar="FILE.toml")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("keys", help="make a CURVE key pair (NAME.key public, NAME.key_secret private)")
    p.add_argument("dir", metavar="DIR", help="where to write the pair")
    p.add_argument("--name", default="linegate", help="file name stem (default: linegate)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("watch", help="print decisions published by `linegate run`")
    add_watch_arguments(p)
    p.set_defaults(func=cmd_watch)

    from lineside import ctl

    p = sub.add_parser("ctl", help="steer a running line: status, threshold, pause, resume, load")
    ctl.add_arguments(p)
    p.set_defaults(func=ctl.main)

    from lineside import history, record  # light: psycopg is imported only for a postgresql:// target

    p = sub.add_parser("record", help="record every decision, event and reject image (SQLite or PostgreSQL)")
    record.add_arguments(p)
    p.set_defaults(func=record.main)
    p = sub.add_parser("history", help="query the record made by `linegate record`")
    history.add_arguments(p)
    p.set_defaults(func=history.main)

    from lineside.view.cli import add_arguments as add_view_arguments, main as view_main

    p = sub.add_parser("view", help="the operator's browser page: live decisions, rejects, threshold")
    add_view_arguments(p)
    p.set_defaults(func=view_main)

    from benchmarks.bench import add_arguments as add_bench_arguments  # light: no torch, no onnx

    p = sub.add_parser("bench", help="throughput (backbone alone, model, pipeline), latency and memory "
                       "of a bundle: JSON + Markdown + plots")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:  # an optional part (training, bench) not installed here
        extra = "bench" if args.command == "bench" else "train"
        print(f"linegate {args.command}: error: needs the Python package {exc.name!r}, which this install "
              f"lacks; pip install 'linegate[{extra}]' (see README)", file=sys.stderr)
        return 2  # an install to complete: not something a restart cures
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Expected failures (bad data, bad bundle, bad endpoint) get one clear line, no trace.
        log.debug("details", exc_info=True)
        print(f"linegate {args.command}: error: {exc}", file=sys.stderr)
        # Under systemd, 2 means "fix the configuration" and is not restarted. A port still
        # held by the instance before (closing) may pass: `run` exits with a status systemd
        # retries. (No TensorRT here is not such a state: `--engine auto` is the setting for a
        # box that may come up without it.)
        from edge.publisher import EndpointInUse
        from edge.service import EXIT_CONFIG, EXIT_RUN_FAILED

        if args.command == "run" and isinstance(exc, EndpointInUse):
            return EXIT_RUN_FAILED
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
