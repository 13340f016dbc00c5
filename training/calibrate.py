"""Threshold calibration and the seed's evaluation metrics (scikit-learn does the counting).

Convention everywhere (training, bundle, runtime): a part is rejected when its score is
>= the threshold, the same convention as sklearn's roc_curve.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve


def youden_threshold(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """Threshold maximising TPR - FPR on the ROC of the calibration set (seed).

    roc_curve's thresholds are calibration scores themselves; the returned threshold sits
    halfway between the chosen score and the next lower one, so a part scoring a hair
    below a calibration image is not decided by float noise.
    """
    scores = np.asarray(scores, dtype=np.float64)
    anomalous = np.asarray(anomalous, dtype=bool)
    if anomalous.all() or not anomalous.any():
        raise ValueError("calibration needs both normal and anomalous images to pick a threshold")
    fpr, tpr, thresholds = roc_curve(anomalous, scores)
    best = int(np.argmax(tpr - fpr))
    chosen = thresholds[best]
    lower = scores[scores < chosen]
    return float((chosen + lower.max()) / 2) if lower.size else float(chosen)


def binary_metrics(scores: np.ndarray, anomalous: np.ndarray, threshold: float) -> dict:
    """Seed metrics for 'anomalous' as the positive class at a threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(anomalous, dtype=bool)
    pred = scores >= threshold
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[False, True]).ravel())

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    specificity = ratio(tn, tn + fp)
    out = {
        "n": int(y.size),
        "accuracy": ratio(tp + tn, y.size),
        "mean_accuracy": (recall + specificity) / 2,  # balanced accuracy (seed: "mean accuracy")
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "fpr": ratio(fp, fp + tn),
        "fnr": ratio(fn, fn + tp),
        "confusion": [[tn, fp], [fn, tp]],
        "auroc": float(roc_auc_score(y, scores)) if 0 < y.sum() < y.size else None,
    }
    return out


def per_class_accuracy(scores: np.ndarray, classes: list[str], normal_class: str, threshold: float) -> dict:
    """Fraction of each class decided correctly (normal -> accept, anything else -> reject)."""
    scores = np.asarray(scores)
    classes_arr = np.asarray(classes)
    result = {}
    for cls in sorted(set(classes)):
        mask = classes_arr == cls
        rejected = scores[mask] >= threshold
        correct = ~rejected if cls == normal_class else rejected
        result[cls] = {"n": int(mask.sum()), "accuracy": float(correct.mean())}
    return result


def normalisation_range(calib_scores: np.ndarray) -> tuple[float, float]:
    """Score normalisation by the calibration set's min / max (seed 002)."""
    return float(np.min(calib_scores)), float(np.max(calib_scores))


def display_range(normal_maps: np.ndarray, anomalous_maps: np.ndarray | None) -> tuple[float, float]:
    """Heatmap colour range from the calibration maps: typical normal patch -> cold,
    the top of the anomalous patches (or of the normal ones when none) -> hot."""
    low = float(np.median(normal_maps))
    top_source = anomalous_maps if anomalous_maps is not None and anomalous_maps.size else normal_maps
    high = float(np.percentile(top_source, 99.9))
    return low, max(high, low + 1e-6)
