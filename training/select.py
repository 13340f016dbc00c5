"""`linegate train --model auto` (the default): fit the detectors that are cheap to fit, keep
the one that separates the calibration set best, and say why.

PaDiM (per-position Gaussians) is the sharper model of parts that sit in the same place in
every frame; PatchCore (a memory bank of patches) does not care where a patch is, so it holds
up when parts arrive rotated or shifted. Which one a line needs is a property of its parts, so
it is measured on the calibration set, exactly as the image score is: the best calibration
AUROC, a near tie (calibrate.AUROC_TIE) broken by the widest separation of good and defective
calibration images. The test set never takes part. FCDD trains by gradient descent (minutes to
hours on a CPU), so it is fitted only when asked for by name.

Each candidate is a complete run in RUN/candidates/NAME (its own report, and exportable with
`linegate export onnx RUN/candidates/NAME`); the chosen one's files are copied to RUN.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from . import calibrate

log = logging.getLogger(__name__)
AUTO = "auto"
AUTO_CANDIDATES = ("padim", "patchcore")
RUN_FILES = ("model.pt", "run.json", "split.json", "metrics.json", "predictions.csv")


def train_auto(train_one: Callable[..., dict], out: str | Path, candidates: tuple[str, ...] = AUTO_CANDIDATES,
               report: bool = True, **options: Any) -> dict:
    """Train every candidate with `train_one(out=..., model=NAME, report=..., **options)` and
    copy the best one's run into `out`; returns its metrics with `detector_choice` added."""
    out = Path(out)
    results: dict[str, dict] = {}
    for number, name in enumerate(candidates, 1):
        log.info("--model auto: fitting candidate %d of %d, %s", number, len(candidates), name)
        results[name] = train_one(out=out / "candidates" / name, model=name, report=report, **options)
    first = next(iter(results.values()))["calibration"]  # every candidate calibrates on the same images
    n_normal = first["confusion"][0][0] + first["confusion"][0][1]
    choice = calibrate.choose_best({n: m["calibration"]["auroc"] for n, m in results.items()},
                                   {n: m["calibration"]["separation"] for n, m in results.items()},
                                   first["n"] - n_normal, n_normal, "detector")
    log.info("--model auto: %s", choice.reason)
    chosen_dir = out / "candidates" / choice.chosen
    for name in RUN_FILES:
        shutil.copy2(chosen_dir / name, out / name)
    if (chosen_dir / "report").is_dir():
        shutil.rmtree(out / "report", ignore_errors=True)
        shutil.copytree(chosen_dir / "report", out / "report")
    metrics = results[choice.chosen]
    metrics["detector_choice"] = {
        **choice.to_json(), "requested": AUTO,
        "candidates": {n: {"calibration_auroc": m["calibration"]["auroc"], "separation": m["calibration"]["separation"],
                           "aggregate": m["calibration"]["aggregate"], "fit_seconds": m["fit_seconds"],
                           "run": str(out / "candidates" / n)} for n, m in results.items()}}
    metrics["train_seconds"] = round(sum(m["train_seconds"] for m in results.values()), 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    page = out / "report" / "report.html"
    if page.is_file():  # the candidate's own report, plus why it was chosen
        from .report import detector_choice_html

        text = page.read_text()
        page.write_text(text.replace("<h2>Metrics</h2>", detector_choice_html(metrics["detector_choice"]) +
                                     "\n<h2>Metrics</h2>", 1))
    meta = json.loads((out / "run.json").read_text())
    meta["model_requested"] = AUTO
    (out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    return metrics
