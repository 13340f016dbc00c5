"""The evaluation report: one HTML file, readable offline, beside its PNG plots.

RUN/report/report.html shows the calibration and test metrics, the aggregate choice, a
per-class accuracy table, and links these plots (all in RUN/report/):
  histograms.png  image scores per class, calibration and test, with the threshold line (and the
                  fitted class densities of `--threshold binormal` on the calibration side)
  roc.png         ROC curves of the calibration and test sets with their AUC
  confusion.png   test confusion matrix (normal/anomalous x accept/reject) and per-class decisions
  overlays/       heatmap overlays of every test false positive and false negative, and a few
                  true positives and negatives (seed "Explain Classification Decisions")
"""
from __future__ import annotations

import html
import shutil
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import boxcox  # noqa: E402
from scipy.stats import norm  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from edge.decision import ACCEPT, REJECT, Decision  # noqa: E402
from edge.images import ImageReadError, read_image  # noqa: E402
from edge.overlay import render_overlay  # noqa: E402

from .detectors import get_detector  # noqa: E402

PLOTS = ("histograms.png", "roc.png", "confusion.png")
EXAMPLES_PER_KIND = 4  # true positives and true negatives shown beside every error
METRIC_KEYS = ("auroc", "accuracy", "mean_accuracy", "precision", "recall", "specificity", "f1", "fpr", "fnr")


def _fitted_counts(x: np.ndarray, fit: dict, which: str, n: int, bin_width: float) -> np.ndarray:
    """A binormal fit's density of one class on the score axis, as images per histogram bin:
    the normal density of the transformed score boxcox(x / scale) times the transform's slope
    (x / scale)^(lambda - 1) / scale."""
    lam, scale, sd = fit["boxcox_lambda"], fit["scale"], fit[f"{which}_sd"]
    z = (boxcox(x / scale, lam) - fit[f"{which}_mean"]) / sd
    return norm.pdf(z) / sd * (x / scale) ** (lam - 1) / scale * n * bin_width


def _histograms(path: Path, scored: dict, threshold: float, normal: str, fit: dict | None = None) -> None:
    fig, axes = plt.subplots(1, len(scored), figsize=(6 * len(scored), 4), squeeze=False)
    for ax, (name, sc) in zip(axes[0], scored.items()):
        classes = np.asarray(sc.images.classes)
        bins = np.histogram_bin_edges(sc.scores, bins=30)
        order = [normal] + sorted(set(classes) - {normal})
        for cls in order:
            ax.hist(sc.scores[classes == cls], bins=bins, alpha=0.55, label=f"{cls} ({(classes == cls).sum()})")
        if fit and fit.get("threshold") is not None and name == "calibration":  # `--threshold binormal`
            x = np.linspace(max(bins[0], 1e-9), bins[-1], 400)
            good = classes == normal
            for which, n, style in (("normal", good.sum(), "-"), ("anomalous", (~good).sum(), ":")):
                ax.plot(x, _fitted_counts(x, fit, which, int(n), bins[1] - bins[0]), color="k",
                        linestyle=style, linewidth=1, label=f"fitted {which}")
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.set_title(f"{name} set")
        ax.set_xlabel("image score")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _roc(path: Path, scored: dict) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, sc in scored.items():
        RocCurveDisplay.from_predictions(sc.anomalous, sc.scores, name=name, ax=ax)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_title("ROC (positive: anomalous)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _confusion(path: Path, test, threshold: float, normal: str) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    rejected = test.scores >= threshold
    ConfusionMatrixDisplay.from_predictions(
        test.anomalous, rejected, labels=[False, True], display_labels=["normal", "anomalous"],
        ax=ax1, colorbar=False, cmap="Blues")
    ax1.set_xlabel(f"decision ({ACCEPT} | {REJECT})")
    ax1.set_title("test: truth x decision")
    classes = np.asarray(test.images.classes)
    names = [normal] + sorted(set(classes) - {normal})
    counts = np.array([[np.sum((classes == c) & ~rejected), np.sum((classes == c) & rejected)] for c in names])
    ax2.imshow(counts, cmap="Blues")
    for (i, j), v in np.ndenumerate(counts):
        ax2.text(j, i, str(v), ha="center", va="center",
                 color="white" if v > counts.max() / 2 else "black")
    ax2.set_xticks([0, 1], [ACCEPT, REJECT])
    ax2.set_yticks(range(len(names)), names)
    ax2.set_title("test: class x decision")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pick_examples(test, threshold: float) -> list[tuple[str, int]]:
    """Every error, and a few correct decisions spread over the score range."""
    rejected = test.scores >= threshold
    kinds = {"false_positive": ~test.anomalous & rejected, "false_negative": test.anomalous & ~rejected,
             "true_positive": test.anomalous & rejected, "true_negative": ~test.anomalous & ~rejected}
    picks = []
    for kind, mask in kinds.items():
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(test.scores[idx])]
        if kind.startswith("true") and len(idx) > EXAMPLES_PER_KIND:
            idx = idx[np.linspace(0, len(idx) - 1, EXAMPLES_PER_KIND).round().astype(int)]
        picks += [(kind, int(i)) for i in idx]
    return picks


def _overlays(folder: Path, test, cal: dict, upsample: str) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    threshold = cal["threshold"]
    lo, span = cal["normalisation"]["min"], cal["normalisation"]["max"] - cal["normalisation"]["min"]
    shown = []
    for n, (kind, i) in enumerate(_pick_examples(test, threshold)):
        path = test.images.paths[i]
        try:
            rgb = read_image(path)
        except ImageReadError:  # gone since scoring: the table still lists it
            rgb = None
        score = float(test.scores[i])
        decision = Decision(score, (score - lo) / span if span else 0.0, threshold,
                            REJECT if score >= threshold else ACCEPT)
        entry = {"kind": kind, "path": path, "class": test.images.classes[i], "score": score, "file": None}
        if rgb is not None:
            name = f"{kind}_{n:03d}_{Path(path).stem}.png"
            image = render_overlay(rgb, test.maps[i], tuple(cal["display_range"]), decision, upsample=upsample)
            cv2.imwrite(str(folder / name), image)
            entry["file"] = f"{folder.name}/{name}"
        shown.append(entry)
    return shown


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _augment_text(meta: dict) -> str:
    """The report says when the model learned from mirrored images: a mirrored part passes it."""
    augment = meta.get("augment") or []
    mirrors = [a for a in augment if not a.startswith("jpeg")]
    jpeg = [a for a in augment if a.startswith("jpeg")]
    if not augment:
        return ""
    parts = []
    if mirrors:
        parts.append(f"mirrors ({html.escape(', '.join(mirrors))}): a mirrored part counts as normal")
    if jpeg:
        parts.append(f"JPEG copies ({html.escape(jpeg[0])}, qualities from {jpeg[0][5:] or '75'} to 95)")
    return f", fitted on {meta.get('train_images')} normal images including {'; '.join(parts)}"


def _fallback_text(cal: dict) -> str:
    if not cal.get("method_fallback"):
        return ""
    return (f" (<b>{html.escape(cal['method_requested'])}</b> was asked for and could not be used: "
            f"{html.escape(cal['method_fallback'])})")


def _split_text(split: dict, exposure: int | None = None) -> str:
    if not split:
        return ""
    n = {k: len(split.get(k, [])) for k in ("train", "train_anomalous", "calibration", "test")}
    used = "" if exposure is None or exposure == n["train_anomalous"] else f" (this run used {exposure})"
    return (f"Split: {n['train']} good images fit, {n['train_anomalous']} defects for outlier exposure{used}, "
            f"{n['calibration']} calibrate, {n['test']} test ({html.escape(split.get('policy') or 'fixed counts')}).")


def detector_choice_html(choice: dict) -> str:
    """The section `--model auto` adds to the chosen candidate's report."""
    rows = "".join(f"<tr><th>{html.escape(n)}</th><td>{_fmt(c['calibration_auroc'])}</td><td>{_fmt(c['separation'])}</td>"
                   f"<td>{html.escape(c['aggregate'])}</td><td>{c['fit_seconds']:.0f} s</td>"
                   f"<td>{html.escape(c['run'])}</td></tr>" for n, c in choice["candidates"].items())
    return (f"<h2>Detector: chosen on the calibration set</h2><p>{html.escape(choice['reason'])}</p>"
            "<table><tr><th>candidate</th><th>calibration AUROC</th><th>separation</th><th>aggregate</th>"
            f"<th>fit</th><th>run</th></tr>{rows}</table>")


def _html(meta: dict, metrics: dict, shown: list[dict]) -> str:
    cal, test = metrics["calibration"], metrics["test"]
    rows = "".join(f"<tr><th>{k}</th><td>{_fmt(cal.get(k))}</td><td>{_fmt(test.get(k))}</td></tr>"
                   for k in METRIC_KEYS)
    conf = f"<tr><th>confusion [[tn, fp], [fn, tp]]</th><td>{cal['confusion']}</td><td>{test['confusion']}</td></tr>"
    classes = sorted(set(cal["per_class"]) | set(test["per_class"]))
    per_class = "".join(
        f"<tr><th>{html.escape(c)}</th>" + "".join(
            f"<td>{_fmt(s['per_class'][c]['accuracy'])} ({s['per_class'][c]['n']})</td>" if c in s["per_class"]
            else "<td>-</td>" for s in (cal, test)) + "</tr>" for c in classes)
    seps = cal.get("aggregate_separation", {})
    aggs = "".join(f"<tr><th>{html.escape(a)}</th><td>{_fmt(v)}</td><td>{_fmt(seps.get(a))}</td></tr>"
                   for a, v in cal["aggregate_auroc"].items())
    figures = "".join(f'<figure><img src="{p}" alt="{p}"></figure>' for p in PLOTS)
    cards = []
    for e in shown:
        img = f'<img src="{html.escape(e["file"])}" alt="overlay">' if e["file"] else "<p>(image unreadable)</p>"
        cards.append(f'<figure class="ov">{img}<figcaption>{e["kind"].replace("_", " ")}<br>'
                     f'{html.escape(e["class"])}, score {e["score"]:.4g}<br>'
                     f'<small>{html.escape(Path(e["path"]).name)}</small></figcaption></figure>')
    errors = sum(e["kind"].startswith("false") for e in shown)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>linegate report: {html.escape(meta['detector'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{text-align:left;background:#f4f4f4}}
figure{{display:inline-block;margin:6px}} img{{max-width:100%}} .ov img{{width:224px}}
figcaption{{font-size:12px;text-align:center}}</style></head><body>
<h1>linegate evaluation: {html.escape(meta['detector'])}</h1>
<p>data {html.escape(str(meta.get('data', '')))}, seed {meta.get('seed')}, normal class
{html.escape(meta['normal_class'])}, input {meta['image_size'][0]}x{meta['image_size'][1]}{_augment_text(meta)}.
{_split_text(metrics.get('split', {}), meta.get('outlier_exposure'))}
Score = <b>{html.escape(cal['aggregate'])}</b> of the anomaly map (requested: {html.escape(cal['aggregate_requested'])});
threshold {cal['threshold']:.6g} by <b>{html.escape(cal['method'])}</b> on the calibration set
(reject if score &ge; threshold){_fallback_text(cal)}; normalisation min/max {cal['normalisation']['min']:.4g} /
{cal['normalisation']['max']:.4g}; heatmap display range {cal['display_range'][0]:.4g} .. {cal['display_range'][1]:.4g}.</p>
<h2>Metrics</h2>
<table><tr><th></th><th>calibration ({cal['n']})</th><th>test ({test['n']})</th></tr>{rows}{conf}</table>
<h2>Per-class accuracy</h2>
<table><tr><th>class</th><th>calibration</th><th>test</th></tr>{per_class}</table>
<h2>Aggregate: each candidate on the calibration set</h2>
<p>{html.escape(cal.get('aggregate_reason', ''))}</p>
<table><tr><th>aggregate</th><th>AUROC</th><th>separation (Box-Cox scale, SD of good scores)</th></tr>{aggs}</table>
<h2>Plots</h2>{figures}
<h2>Test overlays: {errors} error(s), and examples of correct decisions</h2>
{''.join(cards)}
</body></html>
"""


def write_report(folder: Path, meta: dict, metrics: dict, scored: dict) -> Path:
    """Draw the plots and overlays into `folder` (replaced) and write folder/report.html."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cal = metrics["calibration"]
    normal = meta["normal_class"]
    _histograms(folder / "histograms.png", scored, cal["threshold"], normal, cal.get("threshold_fit"))
    _roc(folder / "roc.png", scored)
    _confusion(folder / "confusion.png", scored["test"], cal["threshold"], normal)
    shown = _overlays(folder / "overlays", scored["test"], cal, get_detector(meta["detector"]).upsample)
    path = folder / "report.html"
    path.write_text(_html(meta, metrics, shown))
    return path
