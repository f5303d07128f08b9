"""Table 1 of the DW paper as code: each soft method's (w_pos, w_neg) on hand values; the plot."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dwlab.assign.table1 import METHODS, TABLE1
from dwlab.cli import app
from dwlab.losses import qfl_weights
from dwlab.plots import plot_table1

T = torch.tensor


def pair(method, s, iou, **kw):
    w_pos, w_neg = TABLE1[method].weights(s, iou, **kw)
    return float(w_pos), float(w_neg)


def test_the_soft_methods_are_listed():
    assert METHODS == ("gfl", "vfl", "tood", "autoassign", "dw")
    for row in TABLE1.values():
        assert row.w_pos(0.5, 0.8) == row.weights(0.5, 0.8)[0] and row.w_neg(0.5, 0.8) == row.weights(0.5, 0.8)[1]


def test_gfl_hand_values():
    # t = IoU = 0.8, |s - t|^2 = 0.09
    assert pair("gfl", 0.5, 0.8) == pytest.approx((0.09 * 0.8, 0.09 * 0.2))
    assert pair("gfl", 0.8, 0.8) == pytest.approx((0.0, 0.0))  # score on target: no loss at all
    assert pair("gfl", 0.5, 0.8, beta=1.0) == pytest.approx((0.3 * 0.8, 0.3 * 0.2))


def test_vfl_hand_values_do_not_depend_on_the_score():
    for s in (0.1, 0.5, 0.9):
        assert pair("vfl", s, 0.8) == pytest.approx((0.64, 0.16))
    assert pair("vfl", 0.5, 0.5) == pytest.approx((0.25, 0.25))


def test_tood_hand_values_and_normalisation():
    t = 0.5 * 0.8**6  # 0.131072
    assert pair("tood", 0.5, 0.8) == pytest.approx(((0.5 - t) ** 2 * t, (0.5 - t) ** 2 * (1 - t)))
    # the GT's best-aligned anchor (t = t_max) gets t_hat = its max IoU: the GFL weights at 0.8
    assert pair("tood", 0.5, 0.8, t_max=t, iou_max=0.8) == pytest.approx(pair("gfl", 0.5, 0.8))
    with pytest.raises(ValueError, match="iou_max"):
        TABLE1["tood"].weights(0.5, 0.8, t_max=t)


def test_autoassign_hand_values():
    # t = 0.5 * exp(-5 * 0.2); w_pos = exp(3 t); 1/(1-IoU) = 5 in a bag spanning 1/(1-0) = 1 .. 1/(1-0.9) = 10
    t = 0.5 * math.exp(-1.0)
    w_pos, w_neg = pair("autoassign", 0.5, 0.8)
    assert w_pos == pytest.approx(math.exp(3 * t))
    assert w_neg == pytest.approx((1 - 4 / 9) * 0.25)
    assert pair("autoassign", 0.5, 0.95)[1] == pytest.approx(0.0)  # above the bag's best IoU: f = 1
    assert pair("autoassign", 0.5, 0.8, prior=0.5)[0] == pytest.approx(0.5 * math.exp(3 * t))


def test_dw_hand_values():
    t = 0.5 * 0.8**5  # Eq. 3
    p_neg = (0.95**2 - 0.8**2) / (0.95**2 - 0.5**2)  # Eq. 5-6, gamma1 = 2
    assert pair("dw", 0.5, 0.8) == pytest.approx((math.exp(5 * t) * t, p_neg * 0.25), rel=1e-6)
    assert pair("dw", 0.5, 0.3)[1] == pytest.approx(0.25)  # IoU < 0.5: P_neg = 1, w_neg = s^2
    assert pair("dw", 0.5, 0.97)[1] == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_vectorised_and_broadcasting(method):
    s, iou = torch.linspace(0.05, 0.95, 7)[:, None], torch.linspace(0.0, 0.9, 5)[None, :]
    w_pos, w_neg = TABLE1[method].weights(s, iou)
    assert w_pos.shape == w_neg.shape == (7, 5)
    assert bool((w_pos >= 0).all() and (w_neg >= 0).all() and torch.isfinite(w_pos).all())
    one = TABLE1[method].weights(s[3, 0], iou[0, 2])
    assert float(one[0]) == pytest.approx(float(w_pos[3, 2])) and float(one[1]) == pytest.approx(float(w_neg[3, 2]))


def test_qfl_weights_sum_to_the_focal_factor():
    s, y = T([0.2, 0.7]), T([0.6, 0.1])
    w_pos, w_neg = qfl_weights(s, y)
    assert (w_pos + w_neg).tolist() == pytest.approx(((y - s).abs() ** 2).tolist())


def test_plot_table1_writes_a_png(tmp_path):
    path = plot_table1(tmp_path / "t1.png")
    with Image.open(path) as img:
        assert img.size[0] > 1000 and img.size[1] > 1000
    with pytest.raises(ValueError, match="unknown Table 1 methods"):
        plot_table1(tmp_path / "x.png", methods=["fcos"])
    res = CliRunner().invoke(app, ["plot", "table1", "--out", str(tmp_path / "cli.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli.png").stat().st_size > 0
