"""The official GLUE metrics, written out in numpy so evaluation needs neither scikit-learn nor scipy.

All values are fractions (0.9, not 90). Undefined correlations (a constant prediction or label vector, which an
untrained model easily produces in the first evaluations) are reported as 0.0 rather than nan: the checkpoint
selector compares these numbers, and nan compares false with everything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arc_dist.data.glue import TaskSpec, get_task


def _as_numpy(values: Any) -> np.ndarray:
    """Accept lists, numpy arrays and torch tensors (on any device) alike."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.detach().cpu().numpy()
    return np.asarray(values)


def _pair(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _as_numpy(preds).reshape(-1), _as_numpy(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def _binary_counts(preds: Any, labels: Any) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) with class 1 as the positive class."""
    p, y = _pair(preds, labels)
    for name, v in (("predictions", p), ("labels", y)):
        if not np.isin(v, (0, 1)).all():
            raise ValueError(f"binary metric got {name} outside {{0, 1}}: {np.unique(v)[:10].tolist()}")
    p, y = p.astype(bool), y.astype(bool)
    return int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()), int((~p & ~y).sum())


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _pair(preds, labels)
    return float((p == y).mean())


def f1_binary(preds: Any, labels: Any) -> float:
    """F1 of class 1: 2tp / (2tp + fp + fn); 0.0 when there is no positive prediction or label at all."""
    tp, fp, fn, _ = _binary_counts(preds, labels)
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Binary Matthews correlation (CoLA); 0.0 when a row or column of the confusion matrix is empty, e.g. when
    the model predicts one class for everything (scikit-learn's convention)."""
    tp, fp, fn, tn = _binary_counts(preds, labels)
    denom = float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)
    if denom == 0.0:
        return 0.0
    return float((tp * tn - fp * fn) / np.sqrt(denom))


def pearson(preds: Any, labels: Any) -> float:
    """Pearson correlation; 0.0 when either side is constant (undefined)."""
    p, y = _pair(preds, labels)
    p, y = p.astype(np.float64) - p.mean(dtype=np.float64), y.astype(np.float64) - y.mean(dtype=np.float64)
    denom = np.sqrt((p * p).sum() * (y * y).sum())
    if denom == 0.0:
        return 0.0
    return float(np.clip((p * y).sum() / denom, -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks where tied values share the mean of the ranks they span (scipy's ``rankdata`` 'average')."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    # start index of each run of equal values, and the run each sorted position belongs to
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(preds: Any, labels: Any) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties share their mean rank)."""
    p, y = _pair(preds, labels)
    return pearson(_average_ranks(p), _average_ranks(y))


def _class_ids(predictions: Any) -> np.ndarray:
    pred = _as_numpy(predictions)
    return pred.argmax(axis=-1) if pred.ndim == 2 else pred


def compute_glue_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's official metrics under their names (``mcc``, ``accuracy``, ``f1``, ``pearson``, ``spearman``).

    ``predictions`` are logits ``[N, num_labels]`` (arg-maxed), class ids ``[N]``, or regression scores ``[N]`` /
    ``[N, 1]``. For MNLI the caller scores each dev split separately (matched, mismatched).
    """
    spec = get_task(task)
    if spec.is_regression:
        scores = _as_numpy(predictions)
        if scores.ndim == 2 and scores.shape[1] != 1:
            raise ValueError(f"{spec.name} is a regression task: expected scores [N] or [N, 1], got {scores.shape}")
        pred = scores.reshape(-1)
    else:
        pred = _class_ids(predictions)
    fns = {"mcc": matthews_corrcoef, "accuracy": accuracy, "f1": f1_binary, "pearson": pearson, "spearman": spearman}
    return {name: fns[name](pred, labels) for name in spec.metrics}


def main_metric(task: str | TaskSpec) -> str:
    """The metric that picks the best checkpoint (CoLA mcc, MRPC/QQP f1, STS-B pearson, the rest accuracy)."""
    return get_task(task).main_metric
