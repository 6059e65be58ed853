"""Stage-2 losses against hand-written references."""

import math

import pytest
import torch

from arc_dist.config import KDConfig
from arc_dist.data.glue import get_task
from arc_dist.replace.trainer import kd_loss, task_loss


def test_task_loss_classification_and_regression():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    assert task_loss(logits, labels, get_task("sst2")).item() == pytest.approx(expected)
    scores = torch.tensor([[1.0], [3.0]])
    assert task_loss(scores, torch.tensor([2.0, 2.0]), get_task("stsb")).item() == pytest.approx(1.0)


def test_kd_loss_is_temperature_scaled_kl():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    temp = 2.0
    p = torch.softmax(t / temp, -1)
    expected = (p * (p.log() - torch.log_softmax(s / temp, -1))).sum() * temp**2
    got = kd_loss(s, t, KDConfig(weight=1.0, temperature=temp), get_task("sst2"))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert kd_loss(t, t, KDConfig(weight=1.0, temperature=3.0), get_task("rte")).item() == pytest.approx(0.0, abs=1e-7)
