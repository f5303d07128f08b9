"""Inference: head outputs -> per-image detections (METHOD.md: score 0.05, top 1000 per level,
batched NMS 0.6, 100 detections). Score = sigmoid(cls) * sigmoid(centerness).

Optionally PAA's score voting (``eval.score_voting``; Kim and Lee, ECCV 2020, §3.4; released
kkhoot/PAA ``paa/inference.py``, as MMDetection's ``PAAHead.score_voting``): after NMS, each
kept box b is replaced by the average of the image's pre-NMS candidate boxes c_i of its class,
weighted by

    p_i = score_i * exp(-(1 - IoU(b, c_i))^2 / sigma),   sigma 0.025,

over the candidates with IoU(b, c_i) > 0.01 (the kept box among them, with weight score_b);
its score and label stay. The candidates are the boxes NMS saw (above the score threshold,
top-k per level, clipped). PAA's score is sqrt(sigmoid(cls) * sigmoid(iou)), the square root
of the product dwlab ranks by (same order, same AP), so score_i in p_i is sqrt(s_i): the
released weights for a PAA model, the geometric mean of the two branches for any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from dwlab.config import EvalConfig
from dwlab.models.outputs import HeadOutputs

VOTE_MIN_IOU = 0.01  # a candidate votes for a kept box it overlaps by more than this (released)


@dataclass
class Detections:
    """One image's detections: boxes ``Tensor[D, 4]`` xyxy, scores ``Tensor[D]``, labels ``Tensor[D]``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def postprocess_settings(cfg: EvalConfig) -> dict[str, Any]:
    """``postprocess``'s keyword arguments from the ``eval`` section."""
    return {
        "score_thresh": cfg.score_thresh, "pre_nms_topk": cfg.pre_nms_topk, "nms_thresh": cfg.nms_thresh,
        "max_dets": cfg.max_dets, "score_voting": cfg.score_voting, "score_voting_sigma": cfg.score_voting_sigma,
    }  # fmt: skip


@torch.no_grad()
def postprocess(
    outputs: HeadOutputs,
    image_sizes: Tensor,
    *,
    score_thresh: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_thresh: float = 0.6,
    max_dets: int = 100,
    score_voting: bool = False,
    score_voting_sigma: float = 0.025,
) -> list[Detections]:
    """Detections per image in the network's input frame; ``image_sizes`` ``Tensor[B, 2]`` (h, w)
    are the unpadded sizes boxes are clipped to. ``score_voting``: the kept boxes voted from the
    candidates (module docstring); off, nothing of it runs."""
    if score_voting and not score_voting_sigma > 0:
        raise ValueError(f"score_voting_sigma: expected a number > 0, got {score_voting_sigma!r}")
    scores_all = outputs.scores().float()  # [B, A, C]
    boxes_all = outputs.boxes().float()  # [B, A, 4]
    num_classes = scores_all.shape[-1]
    level_slices = torch.tensor(outputs.anchors.level_sizes).cumsum(0).tolist()
    results = []
    for b in range(scores_all.shape[0]):
        keep_boxes, keep_scores, keep_labels = [], [], []
        start = 0
        for end in level_slices:  # top-k per level (5 levels)
            scores = scores_all[b, start:end].flatten()
            candidates = torch.nonzero(scores > score_thresh).squeeze(1)
            scores = scores[candidates]
            if scores.numel() > pre_nms_topk:
                scores, order = scores.topk(pre_nms_topk)
                candidates = candidates[order]
            anchor_idx = start + candidates // num_classes
            keep_boxes.append(boxes_all[b, anchor_idx])
            keep_scores.append(scores)
            keep_labels.append(candidates % num_classes)
            start = end
        boxes = clip_boxes_to_image(torch.cat(keep_boxes), tuple(image_sizes[b].tolist()))
        scores, labels = torch.cat(keep_scores), torch.cat(keep_labels)
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_dets]
        kept = boxes[keep]
        if score_voting:
            kept = vote_boxes(kept, labels[keep], boxes, scores, labels, score_voting_sigma)
        results.append(Detections(kept, scores[keep], labels[keep]))
    return results


def vote_boxes(
    kept: Tensor, kept_labels: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor, sigma: float
) -> Tensor:
    """PAA's score voting (module docstring) for one image: the voted boxes ``Tensor[D, 4]`` of the
    ``kept`` boxes ``Tensor[D, 4]`` (labels ``Tensor[D]``), from the N candidates ``boxes``
    ``Tensor[N, 4]``, ``scores`` ``Tensor[N]`` (the product s; voting weighs by sqrt(s)) and
    ``labels`` ``Tensor[N]``; all candidates at once.

    Written as b + sum_i p_i (c_i - b) / sum_i p_i (the weighted mean, rearranged), so a box no
    other candidate overlaps keeps its coordinates exactly; a box with no voter at all (zero
    area, where its IoU with itself is undefined) keeps them too.
    """
    iou = box_iou(kept, boxes)  # (D, N) IoU of each kept box with each candidate
    voters = (kept_labels[:, None] == labels[None]) & (iou > VOTE_MIN_IOU)
    weight = torch.where(voters, scores.sqrt()[None] * torch.exp(-((1 - iou) ** 2) / sigma), 0.0)  # (D, N) p_i
    shift = (weight[..., None] * (boxes[None] - kept[:, None])).sum(1)  # (D, 4) sum_i p_i (c_i - b)
    return kept + shift / weight.sum(1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
