"""Threshold calibration and the seed's evaluation metrics (scikit-learn does the counting).

Convention everywhere (training, bundle, runtime): a part is rejected when its score is
>= the threshold, the same convention as sklearn's roc_curve.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import inv_boxcox
from scipy.stats import boxcox, norm
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

from edge.decision import aggregate_maps

# What `--aggregate auto` (the default) chooses from: the seeds' mean, top-k% means and the max,
# the focused ones also after a blur of the map (PaDiM's and PatchCore's papers blur before the
# max). Small defects light a few cells of the map: the mean of the whole map drowns them.
AGGREGATE_CANDIDATES = ("mean", "topk:25", "topk:10", "topk:5", "topk:1", "max",
                        "topk:5+blur:1", "topk:1+blur:1", "max+blur:1")
# Calibration AUROCs closer than the best one's standard error (and never closer than this) count
# as a tie, broken by the widest separation: with the tens to hundreds of calibration images a
# line has, such a difference is sampling noise (the standard error is ~0.04 at 25 defects and
# 95 good parts), and picking the top AUROC among noise picks the calibration set's accidents.
AUROC_TIE = 0.005
THRESHOLD_METHODS = ("binormal, youden, f1, fpr:RATE (RATE: the largest tolerated false-reject rate of good "
                     "parts, 0..1) or cost:C@P (an escaped defect costs C false rejects; P: the line's defect rate, 0..1)")


def _checked(scores: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    anomalous = np.asarray(anomalous, dtype=bool)
    if anomalous.all() or not anomalous.any():
        raise ValueError("calibration needs both normal and anomalous images to pick a threshold")
    return scores, anomalous


def _below(scores: np.ndarray, chosen: float) -> float:
    """The threshold for "reject every score >= chosen": halfway between `chosen` (a calibration
    score) and the next lower calibration score, so a part scoring a hair below a calibration
    image is not decided by float noise."""
    if not np.isfinite(chosen):  # reject nothing: sit just above the highest score
        top = float(scores.max())
        return float(np.nextafter(top + abs(top) * 1e-6, np.inf))
    lower = scores[scores < chosen]
    return float((chosen + lower.max()) / 2) if lower.size else float(chosen)


def youden_threshold(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """Threshold maximising TPR - FPR on the ROC of the calibration set (seed).

    roc_curve keeps the first maximum, i.e. the higher threshold when two tie.
    """
    scores, anomalous = _checked(scores, anomalous)
    fpr, tpr, thresholds = roc_curve(anomalous, scores)
    return _below(scores, thresholds[int(np.argmax(tpr - fpr))])


def f1_threshold(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """Threshold maximising F1 of the anomalous class on the calibration set (the higher
    threshold when two tie: fewer good parts rejected)."""
    scores, anomalous = _checked(scores, anomalous)
    precision, recall, thresholds = precision_recall_curve(anomalous, scores)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = np.flatnonzero(f1 == f1.max()).max()  # thresholds ascend: the last is the highest
    return _below(scores, thresholds[best])


def fpr_threshold(scores: np.ndarray, anomalous: np.ndarray, rate: float) -> float:
    """The lowest threshold (most defects caught) whose false-reject rate of good calibration
    parts is at most `rate`."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"threshold fpr:{rate}: RATE must be in [0, 1), e.g. fpr:0.01")
    scores, anomalous = _checked(scores, anomalous)
    fpr, _, thresholds = roc_curve(anomalous, scores, drop_intermediate=False)
    return _below(scores, thresholds[np.flatnonzero(fpr <= rate).max()])


def cost_threshold(scores: np.ndarray, anomalous: np.ndarray, escape_cost: float, prevalence: float) -> float:
    """The threshold with the least expected cost per part on the line, a false reject costing
    1 and an escaped defect `escape_cost`, when a fraction `prevalence` of the line's parts are
    defective: (1 - prevalence) x FPR + escape_cost x prevalence x (1 - TPR), the rates read off
    the calibration ROC. The calibration set's own mix of good and bad parts (chosen to have
    enough of each) does not enter; the line's does. Youden's point is the special case
    escape_cost x prevalence = 1 - prevalence. Ties go to the higher threshold."""
    if not escape_cost > 0 or not 0.0 < prevalence < 1.0:
        raise ValueError(f"threshold cost:{escape_cost}@{prevalence}: C must be > 0 and P in (0, 1), "
                         "e.g. cost:20@0.01")
    scores, anomalous = _checked(scores, anomalous)
    fpr, tpr, thresholds = roc_curve(anomalous, scores, drop_intermediate=False)
    cost = (1.0 - prevalence) * fpr + escape_cost * prevalence * (1.0 - tpr)
    return _below(scores, thresholds[int(np.argmin(cost))])  # argmin: the first, highest threshold


# Fewer calibration images of a class than this and the fitted normal is mostly noise.
BINORMAL_MIN_PER_CLASS = 5


@dataclass(frozen=True)
class BinormalFit:
    """The scores are divided by `scale` (their geometric mean: lambda does not depend on it,
    and it keeps the transformed scores clear of float64's limits whatever the detector's
    units), Box-Cox transformed with `boxcox_lambda`, and each class's transformed scores
    fitted with a normal (mean, SD); `threshold` is on the original score scale."""
    scale: float
    boxcox_lambda: float
    normal_mean: float
    normal_sd: float
    anomalous_mean: float
    anomalous_sd: float
    threshold: float

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def empty_json() -> dict:
        """metrics.json's `threshold_fit` when there is no fit: the same keys, all null."""
        return {f.name: None for f in fields(BinormalFit)}


def binormal_fit(scores: np.ndarray, anomalous: np.ndarray) -> BinormalFit:
    """Youden's cutoff estimated from fitted distributions instead of the calibration ROC:
    the scores are Box-Cox transformed (one lambda for all, scipy's maximum likelihood), each
    class is fitted with a normal distribution, and the threshold maximises TPR - FPR of the
    fitted pair (the "normal method" of Fluss, Faraggi & Reiser, Biometrical Journal 2005).

    Why: when the calibration classes do not overlap, every threshold in the gap between them
    has the same empirical TPR - FPR, and `youden` takes the gap's middle whatever the spread
    of each class. Good parts score in a tight cluster and defects spread wide, so the fitted
    cutoff sits nearer the good parts, where the faint defects a small calibration set did not
    show will fall. Raises ValueError (saying why) when it cannot be fitted."""
    scores, anomalous = _checked(scores, anomalous)
    few = min(int(anomalous.sum()), int((~anomalous).sum()))
    if few < BINORMAL_MIN_PER_CLASS:
        raise ValueError(f"threshold binormal needs at least {BINORMAL_MIN_PER_CLASS} calibration images "
                         f"of each kind (normal, anomalous); it has {few}")
    if not np.isfinite(scores).all():
        raise ValueError("threshold binormal: a calibration score is not a finite number")
    if scores.min() <= 0:
        raise ValueError(f"threshold binormal needs positive scores (Box-Cox); the calibration scores "
                         f"go down to {scores.min():.4g}")
    if np.ptp(scores[~anomalous]) == 0 or np.ptp(scores[anomalous]) == 0:
        raise ValueError("threshold binormal: one kind's calibration scores are all equal; there is no "
                         "spread to fit")
    transformed, scale, lam = boxcox_scaled(scores)
    normal, defect = transformed[~anomalous], transformed[anomalous]
    mn, sn, md, sd = normal.mean(), normal.std(ddof=1), defect.mean(), defect.std(ddof=1)
    if not (sn > 0 and sd > 0 and md > mn):
        raise ValueError("threshold binormal: the anomalous calibration images do not score above the "
                         "normal ones on average")
    threshold = scale * float(inv_boxcox(binormal_cutoff(mn, sn, md, sd), lam))
    if not (np.isfinite(threshold) and scores[~anomalous].min() < threshold <= scores[anomalous].max()):
        raise ValueError(f"threshold binormal: the fitted cutoff ({threshold:.4g}) falls outside the "
                         "calibration scores; the fit does not describe them")
    return BinormalFit(scale, float(lam), float(mn), float(sn), float(md), float(sd), threshold)


def binormal_cutoff(normal_mean: float, normal_sd: float, anomalous_mean: float, anomalous_sd: float) -> float:
    """The t between the two means with the largest TPR - FPR when normal scores follow
    N(normal_mean, normal_sd) and anomalous ones N(anomalous_mean, anomalous_sd).

    It minimises log(FPR + FNR) = log(1 - J), each rate from its own tail (logsf, logcdf):
    for well separated classes 1 - J is far below float64's resolution near 1, and J itself
    would be flat to the minimiser."""
    span = anomalous_mean - normal_mean

    def log_errors(u: float) -> float:  # u: 0 at the normal mean, 1 at the anomalous one
        t = normal_mean + u * span
        return float(np.logaddexp(norm.logsf((t - normal_mean) / normal_sd),
                                  norm.logcdf((t - anomalous_mean) / anomalous_sd)))

    u = minimize_scalar(log_errors, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-10}).x
    return float(normal_mean + u * span)


def binormal_threshold(scores: np.ndarray, anomalous: np.ndarray) -> float:
    return binormal_fit(scores, anomalous).threshold


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def parse_threshold_method(method: str) -> tuple[str, tuple[float, ...]]:
    """"binormal" | "youden" | "f1" | "fpr:RATE" | "cost:C@P" -> (name, parameters); a bad string
    raises naming the choices."""
    if method in ("binormal", "youden", "f1"):
        return method, ()
    if method.startswith("fpr:"):
        rate = _number(method[4:])
        if 0.0 <= rate < 1.0:
            return "fpr", (rate,)
    if method.startswith("cost:") and method.count("@") == 1:
        escape_cost, prevalence = (_number(part) for part in method[5:].split("@"))
        if escape_cost > 0 and 0.0 < prevalence < 1.0 and np.isfinite(escape_cost):
            return "cost", (escape_cost, prevalence)
    raise ValueError(f"threshold method {method!r}: use {THRESHOLD_METHODS}")


def pick_threshold(scores: np.ndarray, anomalous: np.ndarray, method: str = "binormal") -> float:
    name, params = parse_threshold_method(method)
    if name == "binormal":
        return binormal_threshold(scores, anomalous)
    if name == "youden":
        return youden_threshold(scores, anomalous)
    if name == "f1":
        return f1_threshold(scores, anomalous)
    if name == "cost":
        return cost_threshold(scores, anomalous, *params)
    return fpr_threshold(scores, anomalous, *params)


def aggregate_aurocs(maps: np.ndarray, anomalous: np.ndarray,
                     candidates: tuple[str, ...] = AGGREGATE_CANDIDATES) -> dict[str, float]:
    """AUROC of each candidate image score (an aggregate of the anomaly maps)."""
    y = np.asarray(anomalous, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("calibration needs both normal and anomalous images to choose an aggregate")
    return {name: float(roc_auc_score(y, aggregate_maps(maps, name))) for name in candidates}


def boxcox_scaled(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(transformed, scale, lambda): positive scores divided by their geometric mean (lambda does
    not depend on it, and it keeps the transformed scores clear of float64's limits whatever the
    detector's units), then Box-Cox transformed with one lambda (scipy's maximum likelihood)."""
    scale = float(np.exp(np.mean(np.log(scores))))
    transformed, lam = boxcox(scores / scale)
    return transformed, scale, float(lam)


def separation(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """How far the defective calibration images score above the good ones, in units of the good
    scores' spread, measured where the threshold is fitted (binormal_fit): on the Box-Cox scale of
    the calibration scores, (mean of the defects - mean of the good) / SD of the good.

    Why that scale: it makes the measure the same for any c * score ** p (the fitted lambda
    absorbs the power, the scale the factor), so a squared distance (PaDiM's Mahalanobis) and a
    plain one (PatchCore's nearest patch), or a mean and a max of the same map, compare on their
    ordering and spread and not on their units. On the raw scale a detector whose scores are
    skewed (a few good parts far out) looked narrower or wider for its units alone. Scores that
    Box-Cox cannot take (one <= 0, or all equal) are measured as they are."""
    scores, anomalous = _checked(scores, anomalous)
    if scores.min() > 0 and np.ptp(scores) > 0 and np.isfinite(scores).all():
        scores = boxcox_scaled(scores)[0]
    good, bad = scores[~anomalous], scores[anomalous]
    spread = float(np.std(good, ddof=1)) if good.size > 1 else 0.0
    if not np.isfinite(spread) or spread <= 0:
        spread = float(np.ptp(scores)) or 1.0
    return float((np.mean(bad) - np.mean(good)) / spread)


def auroc_standard_error(auroc: float, n_anomalous: int, n_normal: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUROC measured on this many images."""
    a = min(max(float(auroc), 0.0), 1.0)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_anomalous - 1) * (q1 - a * a) + (n_normal - 1) * (q2 - a * a)) / (n_anomalous * n_normal)
    return float(np.sqrt(max(var, 0.0)))


@dataclass(frozen=True)
class Choice:
    """What a calibration-set choice (aggregate, detector) picked, and every candidate's figures."""
    chosen: str
    auroc: dict[str, float]
    separation: dict[str, float]
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def choose_best(aurocs: dict[str, float], separations: dict[str, float], n_anomalous: int, n_normal: int,
                what: str = "aggregate") -> Choice:
    """The candidate with the best calibration AUROC; candidates within the best AUROC's standard
    error (at least AUROC_TIE) of it are a tie, broken by the widest separation (then by the
    order given)."""
    best = max(aurocs.values())
    tolerance = max(AUROC_TIE, auroc_standard_error(best, n_anomalous, n_normal))
    tied = [name for name, auc in aurocs.items() if auc >= best - tolerance]
    chosen = max(tied, key=lambda name: separations[name])  # max keeps the first of equals
    if len(tied) == 1:
        reason = f"best calibration AUROC ({aurocs[chosen]:.4f}), the others more than {tolerance:.3f} below"
    else:
        reason = (f"calibration AUROC {aurocs[chosen]:.4f}, within {tolerance:.3f} (the AUROC's standard error on "
                  f"{n_normal} good and {n_anomalous} defective images) of the best ({best:.4f}) like "
                  f"{', '.join(n for n in tied if n != chosen)}; the widest separation of good and defective "
                  f"calibration images (mean defect {separations[chosen]:+.2f} SD of the good scores above the "
                  "mean good one, on the Box-Cox scale)")
    return Choice(chosen, aurocs, separations, f"{what} {chosen}: {reason}")


def choose_aggregate(cal_maps: np.ndarray, cal_anomalous: np.ndarray,
                     candidates: tuple[str, ...] = AGGREGATE_CANDIDATES) -> Choice:
    """`--aggregate auto`: chosen on the calibration maps alone (the test set cannot influence it)."""
    aurocs = aggregate_aurocs(cal_maps, cal_anomalous, candidates)
    seps = {name: separation(aggregate_maps(cal_maps, name), cal_anomalous) for name in candidates}
    y = np.asarray(cal_anomalous, dtype=bool)
    return choose_best(aurocs, seps, int(y.sum()), int((~y).sum()))


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
