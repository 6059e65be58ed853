"""GLUE metrics against values worked out by hand, their degenerate cases, and (when installed) scipy/sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arc_dist.data.glue import GLUE_TASKS
from arc_dist.data.metrics import (
    accuracy,
    compute_glue_metrics,
    f1_binary,
    main_metric,
    matthews_corrcoef,
    pearson,
    spearman,
)

# Confusion matrix A (positive class 1):
#   preds  = 1 1 1 0 0 0 1 0
#   labels = 1 1 0 0 0 1 1 0
#   tp = positions 0,1,6 -> 3   fp = position 2 -> 1   fn = position 5 -> 1   tn = positions 3,4,7 -> 3
PREDS_A = [1, 1, 1, 0, 0, 0, 1, 0]
LABELS_A = [1, 1, 0, 0, 0, 1, 1, 0]

# Confusion matrix B: tp = 2, fp = 1, fn = 3, tn = 4 (10 examples, laid out block by block)
PREDS_B = [1, 1] + [1] + [0, 0, 0] + [0, 0, 0, 0]
LABELS_B = [1, 1] + [0] + [1, 1, 1] + [0, 0, 0, 0]

# Five points: x = 1..5, y = 2 4 5 4 5
X5 = [1.0, 2.0, 3.0, 4.0, 5.0]
Y5 = [2.0, 4.0, 5.0, 4.0, 5.0]


def test_accuracy_by_hand() -> None:
    # A: 3 tp + 3 tn correct out of 8 -> 6/8
    assert accuracy(PREDS_A, LABELS_A) == pytest.approx(0.75)
    # B: 2 tp + 4 tn out of 10
    assert accuracy(PREDS_B, LABELS_B) == pytest.approx(0.6)


def test_f1_by_hand() -> None:
    # A: 2tp / (2tp + fp + fn) = 6 / (6 + 1 + 1) = 0.75
    assert f1_binary(PREDS_A, LABELS_A) == pytest.approx(0.75)
    # B: precision 2/3, recall 2/5 -> 2*(2/3)(2/5) / (2/3 + 2/5) = (8/15) / (16/15) = 0.5 = 4 / (4 + 1 + 3)
    assert f1_binary(PREDS_B, LABELS_B) == pytest.approx(0.5)


def test_mcc_by_hand() -> None:
    # A: (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / sqrt(4*4*4*4) = 8/16
    assert matthews_corrcoef(PREDS_A, LABELS_A) == pytest.approx(0.5)
    # B: (2*4 - 1*3) / sqrt((2+1)(2+3)(4+1)(4+3)) = 5 / sqrt(525) = 0.2182178902...
    assert matthews_corrcoef(PREDS_B, LABELS_B) == pytest.approx(5 / math.sqrt(525))
    assert matthews_corrcoef(PREDS_B, LABELS_B) == pytest.approx(0.2182178902)
    # perfect and perfectly inverted predictions
    assert matthews_corrcoef(LABELS_A, LABELS_A) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - v for v in LABELS_A], LABELS_A) == pytest.approx(-1.0)


def test_pearson_by_hand() -> None:
    # dx = -2 -1 0 1 2, dy = -2 0 1 0 1 (means 3 and 4)
    # sum dx*dy = 4 + 0 + 0 + 0 + 2 = 6; sum dx^2 = 10; sum dy^2 = 4 + 0 + 1 + 0 + 1 = 6
    # r = 6 / sqrt(10 * 6) = 0.7745966692...
    assert pearson(X5, Y5) == pytest.approx(6 / math.sqrt(60))
    assert pearson(X5, Y5) == pytest.approx(0.7745966692)
    assert pearson(X5, [-v for v in X5]) == pytest.approx(-1.0)


def test_spearman_with_ties_by_hand() -> None:
    # ranks of x: 1 2 3 4 5. y sorted: 2 | 4 4 | 5 5 -> 2 gets rank 1, the 4s share (2+3)/2 = 2.5,
    # the 5s share (4+5)/2 = 4.5, so ranks of y = 1 2.5 4.5 2.5 4.5 (mean 3)
    # d(rank x) = -2 -1 0 1 2; d(rank y) = -2 -0.5 1.5 -0.5 1.5
    # sum of products = 4 + 0.5 + 0 - 0.5 + 3 = 7; sum d(rank y)^2 = 4 + 0.25 + 2.25 + 0.25 + 2.25 = 9
    # rho = 7 / sqrt(10 * 9) = 0.7378647873...
    assert spearman(X5, Y5) == pytest.approx(7 / math.sqrt(90))
    assert spearman(X5, Y5) == pytest.approx(0.7378647873)
    # monotone but non-linear -> exactly 1
    assert spearman(X5, [v**3 for v in X5]) == pytest.approx(1.0)


def test_degenerate_cases() -> None:
    # constant prediction: the confusion matrix has an empty column -> MCC undefined, reported 0.0
    assert matthews_corrcoef([1] * 8, LABELS_A) == 0.0
    assert matthews_corrcoef([0] * 8, LABELS_A) == 0.0
    # constant labels: an empty row
    assert matthews_corrcoef(PREDS_A, [0] * 8) == 0.0
    # no positive prediction: tp = fp = 0, fn = 4 -> F1 = 0 / 4 = 0.0
    assert f1_binary([0] * 8, LABELS_A) == 0.0
    # no positive anywhere: 0/0, reported 0.0
    assert f1_binary([0] * 8, [0] * 8) == 0.0
    # constant scores: correlations undefined, reported 0.0 (never nan)
    assert pearson([2.5] * 5, Y5) == 0.0
    assert spearman(X5, [3.0] * 5) == 0.0


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])
    with pytest.raises(ValueError, match="outside"):
        matthews_corrcoef([0, 2], [0, 1])


def test_compute_glue_metrics_names_and_logits() -> None:
    # logits for A: argmax of each row gives PREDS_A
    logits = torch.tensor([[0.0, 1.0] if p else [1.0, 0.0] for p in PREDS_A])
    labels = torch.tensor(LABELS_A)
    assert compute_glue_metrics("cola", logits, labels) == {"mcc": pytest.approx(0.5)}
    assert compute_glue_metrics("CoLA", PREDS_A, LABELS_A) == {"mcc": pytest.approx(0.5)}
    assert compute_glue_metrics("mrpc", logits, labels) == {"f1": pytest.approx(0.75), "accuracy": pytest.approx(0.75)}
    assert compute_glue_metrics("qqp", logits.numpy(), LABELS_A).keys() == {"f1", "accuracy"}
    for task in ("sst2", "qnli", "rte", "wnli"):
        assert compute_glue_metrics(task, logits, labels) == {"accuracy": pytest.approx(0.75)}
    # three-way MNLI logits
    mnli_logits = np.eye(3)[[0, 1, 2, 2]]
    assert compute_glue_metrics("mnli", mnli_logits, [0, 1, 2, 0]) == {"accuracy": pytest.approx(0.75)}
    # STS-B regression scores, flat or [N, 1] as a 1-output head gives them
    expected = {"pearson": pytest.approx(6 / math.sqrt(60)), "spearman": pytest.approx(7 / math.sqrt(90))}
    assert compute_glue_metrics("sts-b", X5, Y5) == expected
    assert compute_glue_metrics("stsb", torch.tensor(X5).unsqueeze(1), torch.tensor(Y5)) == expected
    assert compute_glue_metrics("stsb", torch.tensor(X5, dtype=torch.bfloat16), Y5) == expected
    with pytest.raises(ValueError, match="regression"):
        compute_glue_metrics("stsb", np.zeros((5, 2)), Y5)


def test_main_metric() -> None:
    assert {t: main_metric(t) for t in GLUE_TASKS} == {
        "cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1", "stsb": "pearson",
        "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
    }
    for spec in GLUE_TASKS.values():
        assert spec.main_metric in spec.metrics


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=200)
    preds = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    assert matthews_corrcoef(preds, labels) == pytest.approx(metrics.matthews_corrcoef(labels, preds))
    assert f1_binary(preds, labels) == pytest.approx(metrics.f1_score(labels, preds))
    assert accuracy(preds, labels) == pytest.approx(metrics.accuracy_score(labels, preds))


@pytest.mark.parametrize("seed", range(5))
def test_against_scipy(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    y = np.round(rng.uniform(0, 5, size=300), 1)  # one decimal: many ties, like STS-B gold scores
    x = np.round(y + rng.normal(0, 1.0, size=300), 1)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
