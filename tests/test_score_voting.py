"""PAA's score voting at inference (``eval.score_voting``, ``dwlab/models/postprocess.py``) on
hand-sized heads: boxes whose voted coordinates are computed here by hand."""

import inspect
import math

import pytest
import torch

from dwlab.config import EvalConfig
from dwlab.models import postprocess as post
from dwlab.models.outputs import Anchors, HeadOutputs
from dwlab.models.postprocess import postprocess, postprocess_settings, vote_boxes

SIZES = torch.tensor([[32, 32]])


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def head(dtype: torch.dtype = torch.float32) -> HeadOutputs:
    """A 4x4 grid (stride 8, points at 4, 12, 20, 28), 2 classes, every centerness logit 30
    (sigmoid 1 in fp32, so the score is sigmoid(cls)); the boxes that score:

    - anchor 5, point (12, 12): A = [6, 6, 18, 18], class 1, score 0.64 (kept)
    - anchor 6, point (20, 12): B = [6, 6, 18, 16], class 1, score 0.25; IoU(A, B) = 120 / 144
      = 5/6 > 0.6, so NMS removes it and it votes for A
    - anchor 9, point (12, 20): A's box again, class 0, score 0.36: kept (another class), votes
      only for itself
    - anchor 15, point (28, 28): C = [25, 25, 31, 31], class 1, score 0.81: overlaps nothing
    """
    anchors = Anchors.grid([(4, 4)], [8], 0.5, torch.device("cpu"))
    cls = torch.full((1, 16, 2), -20.0)
    dist = torch.full((1, 16, 4), 6.0)
    cls[0, 5, 1] = logit(0.64)
    cls[0, 6, 1] = logit(0.25)
    dist[0, 6] = torch.tensor([14.0, 6.0, -2.0, 4.0])
    cls[0, 9, 0] = logit(0.36)
    dist[0, 9] = torch.tensor([6.0, 14.0, 6.0, -2.0])
    cls[0, 15, 1] = logit(0.81)
    dist[0, 15] = 3.0
    ctr = torch.full((1, 16), 30.0)
    return HeadOutputs(cls.to(dtype), ctr.to(dtype), dist.to(dtype), anchors)


def by_score(det) -> dict[float, tuple[int, list[float]]]:
    return {round(s, 2): (int(c), b) for s, c, b in zip(det.scores.tolist(), det.labels.tolist(), det.boxes.tolist())}


def test_two_overlapping_boxes_give_the_hand_computed_vote():
    (plain,) = postprocess(head(), SIZES)
    (voted,) = postprocess(head(), SIZES, score_voting=True)
    assert by_score(plain) == {
        0.81: (1, [25.0, 25.0, 31.0, 31.0]),
        0.64: (1, [6.0, 6.0, 18.0, 18.0]),
        0.36: (0, [6.0, 6.0, 18.0, 18.0]),
    }
    # weights sqrt(score) * exp(-(1 - IoU)^2 / 0.025): A itself 0.8 * 1, B 0.5 * exp(-(1/6)^2 / 0.025)
    w_b = 0.5 * math.exp(-((1 - 5 / 6) ** 2) / 0.025)  # 0.1646...
    y2 = (0.8 * 18 + w_b * 16) / (0.8 + w_b)  # 17.6587...
    assert by_score(voted)[0.64][1] == pytest.approx([6.0, 6.0, 18.0, y2], abs=1e-5)
    assert y2 == pytest.approx(17.6587, abs=1e-4)
    # scores, labels and order unchanged; C and the class-0 box keep their coordinates exactly
    assert torch.equal(voted.scores, plain.scores) and torch.equal(voted.labels, plain.labels)
    assert by_score(voted)[0.81] == (1, [25.0, 25.0, 31.0, 31.0])
    assert by_score(voted)[0.36] == (0, [6.0, 6.0, 18.0, 18.0])


def test_sigma_sets_how_far_a_vote_reaches():
    (wide,) = postprocess(head(), SIZES, score_voting=True, score_voting_sigma=1.0)
    w_b = 0.5 * math.exp(-((1 / 6) ** 2) / 1.0)
    assert by_score(wide)[0.64][1][3] == pytest.approx((0.8 * 18 + w_b * 16) / (0.8 + w_b), abs=1e-5)
    with pytest.raises(ValueError, match="score_voting_sigma: expected a number > 0, got 0"):
        postprocess(head(), SIZES, score_voting=True, score_voting_sigma=0)


def test_vote_boxes_by_hand_and_a_zero_area_box_keeps_its_coordinates():
    kept = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0]])  # the second has no area
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [5.0, 5.0, 5.0, 9.0], [40.0, 0, 50, 10]])
    scores = torch.tensor([0.81, 0.36, 0.5, 0.9])
    voted = vote_boxes(kept, torch.tensor([0, 0]), boxes, scores, torch.tensor([0, 0, 0, 0]), 0.025)
    w = 0.6 * math.exp(-(0.2**2) / 0.025)  # IoU 0.8; the box at x 40..50 does not overlap
    assert voted[0].tolist() == pytest.approx([0.0, 0.0, 10.0, (0.9 * 10 + w * 8) / (0.9 + w)], abs=1e-5)
    assert voted[1].tolist() == [5.0, 5.0, 5.0, 9.0] and torch.isfinite(voted).all()


def test_an_image_without_detections_and_a_batch_with_one():
    out = head()
    empty = HeadOutputs(torch.full_like(out.cls_logits, -20.0), out.centerness, out.distances, out.anchors)
    (det,) = postprocess(empty, SIZES, score_voting=True)
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,) and det.labels.shape == (0,)
    batch = HeadOutputs(torch.cat([empty.cls_logits, out.cls_logits]), out.centerness.repeat(2, 1),
                        out.distances.repeat(2, 1, 1), out.anchors)  # fmt: skip
    first, second = postprocess(batch, SIZES.repeat(2, 1), score_voting=True)
    (alone,) = postprocess(out, SIZES, score_voting=True)
    assert len(first.scores) == 0 and torch.equal(second.boxes, alone.boxes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_heads_vote_finite_boxes(dtype):
    (det,) = postprocess(head(dtype), SIZES, score_voting=True)
    (ref,) = postprocess(head(), SIZES, score_voting=True)
    assert det.boxes.dtype == torch.float32 and torch.isfinite(det.boxes).all()
    assert torch.equal(det.labels, ref.labels)
    assert (det.boxes - ref.boxes).abs().max() < 0.05  # the logits are rounded; the boxes are exact


def test_off_by_default_and_then_nothing_of_it_runs(monkeypatch):
    assert EvalConfig().score_voting is False and EvalConfig().score_voting_sigma == 0.025
    assert inspect.signature(postprocess).parameters["score_voting"].default is False
    (before,) = postprocess(head(), SIZES)

    def refuse(*args, **kwargs):
        raise AssertionError("score voting ran while off")

    monkeypatch.setattr(post, "vote_boxes", refuse)
    (off,) = postprocess(head(), SIZES, **postprocess_settings(EvalConfig()))
    assert torch.equal(off.boxes, before.boxes) and torch.equal(off.scores, before.scores)
    with pytest.raises(AssertionError, match="ran while off"):
        postprocess(head(), SIZES, **postprocess_settings(EvalConfig(score_voting=True)))


def test_the_eval_section_gives_every_postprocess_setting():
    cfg = EvalConfig(score_thresh=0.1, pre_nms_topk=7, nms_thresh=0.5, max_dets=9, score_voting=True,
                     score_voting_sigma=0.5)  # fmt: skip
    settings = postprocess_settings(cfg)
    keyword_only = [n for n, p in inspect.signature(postprocess).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert sorted(settings) == sorted(keyword_only)
    assert settings == {"score_thresh": 0.1, "pre_nms_topk": 7, "nms_thresh": 0.5, "max_dets": 9,
                        "score_voting": True, "score_voting_sigma": 0.5}  # fmt: skip
