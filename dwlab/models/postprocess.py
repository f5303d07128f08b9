"""Inference: head outputs -> per-image detections (METHOD.md: score 0.05, top 1000 per level,
batched NMS 0.6, 100 detections). Score = sigmoid(cls) * sigmoid(centerness)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from dwlab.models.outputs import HeadOutputs


@dataclass
class Detections:
    """One image's detections: boxes ``Tensor[D, 4]`` xyxy, scores ``Tensor[D]``, labels ``Tensor[D]``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


@torch.no_grad()
def postprocess(
    outputs: HeadOutputs,
    image_sizes: Tensor,
    *,
    score_thresh: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_thresh: float = 0.6,
    max_dets: int = 100,
) -> list[Detections]:
    """Detections per image in the network's input frame; ``image_sizes`` ``Tensor[B, 2]`` (h, w)
    are the unpadded sizes boxes are clipped to."""
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
        results.append(Detections(boxes[keep], scores[keep], labels[keep]))
    return results
