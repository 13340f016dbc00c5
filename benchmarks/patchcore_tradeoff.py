"""PatchCore's test AUROC for bank sizes x projected dims, on one fit set's features.

Features of the fit and test images are extracted once (Lite0, 224 x 224, PatchCore's locally
aware patches); each BANK:DIMS config then projects them to DIMS principal components (DIMS
at least the patch's own, 232 on Lite0: none), selects the coreset with the code `linegate
train` runs (training/coreset.py), and scores the test images by the mean and by the max of
their nearest-bank-distance maps.
Offline: no calibration, no threshold; the AUROCs compare configs, not detectors.

    python -m benchmarks.patchcore_tradeoff --data DIR --normal-class good [--fit 1000]
        [--test-good 300] [--test-defective 300] [--configs 232:4096,64:4096,...] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    import torch
    from sklearn.metrics import roc_auc_score

    from training.backbone import load_backbone
    from training.coreset import greedy_coreset, principal_projection
    from training.data import load_images
    from training.padim import extract
    from training.patchcore import local_patch_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="one folder per class")
    parser.add_argument("--normal-class", default="good")
    parser.add_argument("--fit", type=int, default=1000)
    parser.add_argument("--test-good", type=int, default=300)
    parser.add_argument("--test-defective", type=int, default=300)
    parser.add_argument("--configs", default="232:4096,64:4096,64:8192,32:4096,64:2048")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="patchcore_tradeoff")
    args = parser.parse_args(argv)
    root = Path(args.data)
    rng = np.random.default_rng(args.seed)
    good = sorted(str(p) for p in (root / args.normal_class).iterdir())
    bad = sorted(str(p) for d in root.iterdir() if d.is_dir() and d.name != args.normal_class for p in d.iterdir())
    rng.shuffle(good)
    rng.shuffle(bad)
    fit = [(p, "good") for p in good[:args.fit]]
    test = [(p, "good") for p in good[args.fit:args.fit + args.test_good]] + \
           [(p, "defective") for p in bad[:args.test_defective]]
    backbone = load_backbone("imagenet", 224)

    def patches(items):
        emb = extract(lambda x: local_patch_features(backbone, x),
                      torch.from_numpy(load_images(items, (224, 224)).tensors), 16)
        return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])

    train, query = patches(fit), patches(test)
    labels = np.array([c != "good" for _, c in test])
    rows = []
    for text in args.configs.split(","):
        dims, bank = (int(v) for v in text.split(":"))
        started = time.time()
        if dims < train.shape[1]:
            projection, offset = principal_projection(train, dims, args.seed)
            p, q = train @ projection + offset, query @ projection + offset
        else:
            p, q = train, query
        chosen = greedy_coreset(p, bank, args.seed)
        seconds = time.time() - started
        d = torch.cat([torch.cdist(q[i:i + 40_000], p[chosen]).min(dim=1).values
                       for i in range(0, len(q), 40_000)]).reshape(len(test), -1)
        rows.append({"dims": dims, "bank": bank, "auroc_mean": round(roc_auc_score(labels, d.mean(1).numpy()), 4),
                     "auroc_max": round(roc_auc_score(labels, d.amax(1).numpy()), 4),
                     "projection_and_coreset_seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    result = {"data": str(root), "fit": len(fit), "test_good": args.test_good, "test_defective": args.test_defective,
              "rows": rows, "command": " ".join(["python -m benchmarks.patchcore_tradeoff",
                                                 *(sys.argv[1:] if argv is None else argv)])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
