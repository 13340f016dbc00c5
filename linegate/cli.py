"""The `linegate` console script.

It lives outside `edge` so that the runtime package never imports training or export, and
it imports each of them only for the subcommands that need them: `linegate run` and
`linegate watch` start on a box without torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

log = logging.getLogger("linegate")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _split_counts(text: str):
    from training.data import SplitCounts

    try:
        values = [int(v) for v in text.split(",")]
        if len(values) != 4 or min(values) < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError("--split takes four counts: TRAIN_NORMAL,CALIB_NORMAL,"
                                         "CALIB_PER_ANOMALY,TRAIN_PER_ANOMALY (seed: 70,30,15,2)") from None
    return SplitCounts(*values)


def cmd_train(args: argparse.Namespace) -> int:
    from export.onnx_export import export_onnx
    from training.train import train

    weights = None if args.weights == "random" else args.weights
    metrics = train(args.data, args.out, args.normal_class, args.model, args.seed, weights,
                    args.image_size, args.split, aggregate=args.aggregate)
    test, cal = metrics["test"], metrics["calibration"]
    print(f"calibration: threshold {cal['threshold']:.4g} ({cal['method']}), AUROC {cal['auroc']:.4f}")
    print(f"test: AUROC {test['auroc']:.4f}  accuracy {test['accuracy']:.4f}  precision "
          f"{test['precision']:.4f}  recall {test['recall']:.4f}  confusion {test['confusion']}")
    if metrics["skipped"]:
        print(f"skipped {len(metrics['skipped'])} unreadable file(s): see the warnings above")
    if not args.no_export:
        print(f"bundle: {export_onnx(args.out)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.train import evaluate

    metrics = evaluate(args.run)
    print(json.dumps({k: metrics["test"][k] for k in ("auroc", "accuracy", "f1", "confusion")}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.target == "onnx":
        from export.onnx_export import export_onnx

        print(f"bundle: {export_onnx(args.path, args.out)}")
        return 0
    print("linegate export tensorrt: not in this version; run the bundle's model.onnx with "
          "`linegate run --engine onnxruntime`", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from edge.bundle import load_bundle
    from edge.decision import DecisionRule
    from edge.engine import open_engine
    from edge.pipeline import Pipeline, RunOptions
    from edge.publisher import Publisher
    from edge.sources import parse_source

    bundle = load_bundle(args.bundle)
    sources = [parse_source(spec, f"cam{i}") for i, spec in enumerate(args.source)]
    options = RunOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         overlay_accepts_every=args.overlay_accepts, wait_subscribers=args.wait_subscribers,
                         wait_timeout_s=args.wait_timeout)
    rule = DecisionRule.from_bundle(bundle, args.threshold, args.aggregate)
    engine = open_engine(bundle, args.engine)
    publisher = Publisher(args.publish, model_id=bundle.model_id, sndhwm=args.sndhwm)
    print(f"publishing on {publisher.endpoint}", file=sys.stderr, flush=True)
    pipeline = Pipeline(bundle, engine, rule, sources, publisher, options)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pipeline.stop())
    summary = pipeline.run()
    log.info("done: %d frames, %d rejects, %d errors, %.1f frames/s", summary.frames,
             summary.rejects, summary.errors, summary.fps)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from edge.subscriber import watch

    return watch(args.endpoint, json_lines=args.json, count=args.count,
                 save_overlays=args.save_overlays, timeout_s=args.timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, frames=args.frames, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    from edge.subscriber import add_watch_arguments

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
    p.add_argument("--model", default="padim", choices=["padim"])
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="imagenet",
                   help="backbone weights: imagenet (packaged), random, or a .pth file")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--split", type=_split_counts, default=None,
                   help="TRAIN_NORMAL,CALIB_NORMAL,CALIB_PER_ANOMALY,TRAIN_PER_ANOMALY (default 70,30,15,2)")
    p.add_argument("--aggregate", default="mean",
                   help="image score from the anomaly map: mean (seed default), max or topk:P")
    p.add_argument("--no-export", action="store_true", help="skip writing RUN/bundle")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="recompute metrics.json for a run")
    p.add_argument("run")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a run to a bundle")
    p.add_argument("target", choices=["onnx", "tensorrt"])
    p.add_argument("path", help="RUN for onnx, BUNDLE for tensorrt")
    p.add_argument("--out", default=None, help="bundle directory (default RUN/bundle)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="stream sources through a bundle and publish decisions")
    p.add_argument("--bundle", required=True)
    p.add_argument("--source", action="append", required=True,
                   help="folder:PATH, video:PATH, camera:INDEX|PATH|URL, synthetic[:k=v,...]; repeatable")
    p.add_argument("--publish", default="tcp://127.0.0.1:5556", help="ZeroMQ endpoint to bind")
    p.add_argument("--engine", default="auto", choices=["auto", "onnxruntime"])
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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("watch", help="print decisions published by `linegate run`")
    add_watch_arguments(p)
    p.set_defaults(func=cmd_watch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Expected failures (bad data, bad bundle, bad endpoint) get one clear line, no trace.
        log.debug("details", exc_info=True)
        print(f"linegate {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
