"""PatchCore's fit time on a real training set's size (issue 20 item 5).

Fits `fit_patchcore` (the code `linegate train --model patchcore` runs, its defaults) on N
normal images at 224 x 224 and reports the time of each stage: backbone features, principal
projection, coreset selection. For comparison, the previous fit (no bank cap, no projection,
the exact greedy coreset over every patch with a 128-dim random projection) is timed for
`--before-picks` picks on the patches of `--before-images` of the same images and
extrapolated to the bank it would select on all of them (coreset ratio 0.1): each pick reads
every patch once, so its time grows with the patches (linearly; more once they leave the
cache, so the extrapolation is on the low side).

    python -m benchmarks.patchcore_fit --data DIR --normal-class good [--images 1000] [--seed 0]
        [--before-picks 200] [--out benchmarks/results] [--name patchcore_fit]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from training.backbone import load_backbone
    from training.coreset import DEFAULT_CORESET_RATIO, _greedy, _progress, fit_patchcore
    from training.cpu import one_thread
    from training.data import load_images
    from training.patchcore import local_patch_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="one folder per class")
    parser.add_argument("--normal-class", default="normal")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--before-picks", type=int, default=200)
    parser.add_argument("--before-images", type=int, default=250)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="patchcore_fit")
    args = parser.parse_args(argv)
    folder = Path(args.data) / args.normal_class
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if len(files) < args.images:
        parser.error(f"{folder}: {len(files)} images, --images {args.images} asked for")
    rng = np.random.default_rng(args.seed)
    chosen = [files[i] for i in sorted(rng.choice(len(files), args.images, replace=False))]
    started = time.time()
    images = load_images([(str(p), args.normal_class) for p in chosen], (224, 224))
    load_seconds = time.time() - started
    backbone = load_backbone("imagenet", 224, args.backbone)
    started = time.time()
    model = fit_patchcore(backbone, torch.from_numpy(images.tensors), seed=args.seed)
    fit_seconds = time.time() - started
    h, w = model.map_size
    patches = args.images * h * w

    # the previous fit's coreset: every patch, all its dims -> 128 random dims, exact greedy
    before_bank = round(DEFAULT_CORESET_RATIO * patches)
    with torch.no_grad():
        feats = torch.cat([local_patch_features(backbone, torch.from_numpy(images.tensors[i:i + 16]))
                           .permute(0, 2, 3, 1).reshape(-1, model.projection.shape[0])
                           for i in range(0, args.before_images, 16)])
        gen = torch.Generator().manual_seed(args.seed)
        x = feats @ (torch.randn(feats.shape[1], 128, generator=gen) / math.sqrt(128))
        del feats
        x_sq = (x * x).sum(dim=1)
        with one_thread(), _progress(args.before_picks) as bar:
            started = time.time()
            _greedy(x, x_sq, args.before_picks, gen, bar)
            per_pick = (time.time() - started) / args.before_picks * args.images / args.before_images
    result = {
        "data": str(folder), "images": args.images, "image_size": [224, 224], "backbone": args.backbone,
        "patches": patches, "bank_size": int(model.bank.shape[0]), "projection_dims": int(model.bank.shape[1]),
        "load_seconds": round(load_seconds, 1), "fit_seconds": round(fit_seconds, 1), "stages": model.fit_seconds,
        "before": {"bank_size": before_bank, "picks_timed": args.before_picks, "images_timed": args.before_images,
                   "picks_per_second": round(1 / per_pick, 1),
                   "coreset_seconds_extrapolated": round(before_bank * per_pick)},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{platform.processor() or platform.platform()}; load average at end {[round(v, 1) for v in os.getloadavg()]}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m benchmarks.patchcore_fit", *(sys.argv[1:] if argv is None else argv)]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
