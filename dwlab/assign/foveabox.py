"""FoveaBox label assignment (Kong, Sun, Liu, Jiang, Li, Shi, "FoveaBox: Beyound Anchor-Based
Object Detection", IEEE TIP 2020) and its loss, with the released code's constants
(taokong/FoveaBox ``mmdet/models/anchor_heads/fovea_head.py``, ``fovea_target_single`` and
``loss``; ``configs/foveabox/fovea_r50_fpn_4gpu_1x.py``). The head's defaults differ from the
config (its ``base_edge_list`` default has 126, its strides start at 4): the values here are
the config's, for strides 8-128 (P3-P7, dwlab's levels).

The paper's parts are named by their section titles (no copy of the paper was at hand to
check its equation numbers). Notation: level l (P3 = 0) with stride s_l, base edge r_l = ``base_edge_list[l]`` (16, 32, 64,
128, 256 = 2 s_l) and scale range [lo_l, hi_l] = ``scale_ranges[l]`` ((1, 64), (32, 128), (64,
256), (128, 512), (256, 2048)); GT g with box (x1, y1, x2, y2), width w, height h, centre (cx,
cy); anchor point (x, y).

Assignment (``fovea_match``):

- Scale assignment (paper, "Scale Assignment", eta = 2): g goes to every level whose range holds its size,
  lo_l <= sqrt(w h) <= hi_l (closed, as released). The ranges overlap by a factor 2, so a GT is
  on up to 2 levels.
- Positive area, the "fovea" (paper, "Object Fovea", with the released code's one sigma): the point of
  level l is positive for g when it lies in the box shrunk about its centre by sigma (0.4),
      |x - cx| <= sigma w / 2   and   |y - cy| <= sigma h / 2          (closed).
  The paper's second, larger region (sigma2) whose ring is ignored is **not** in the released
  code (FoveaBox #7, #8; MMDetection #1839) and not here: every other point is negative.
- Within a level, a point in several GTs' foveas takes the GT of smallest area (the released
  code writes GTs largest first, so smaller ones overwrite; ties here: the lower GT index).

Loss (N = number of positives, B images; normalisers averaged over workers, at least 1):

- ``loss_cls`` = sum over every (image, point, class) of FL(s, y) / (N + B), focal loss with
  gamma 1.5, alpha 0.4 (released config), y = 1 on a positive's class, 0 elsewhere.
- ``loss_box`` = sum over positives and the 4 sides of SmoothL1_beta(p - t) / N, beta 0.11, with
  the box target (paper, "Box Prediction"; released form: log of the distance over the base edge,
  the ratio clamped to [1/16, 16])
      t = ln(clamp(((x - x1), (y - y1), (x2 - x), (y2 - y)) / r_l, 1/16, 16))
  and, where the released head regresses t directly, p from dwlab's predicted distances
  (l, t, r, b) >= 0 (``HeadOutputs.distances``):
      p = ln(max(d / r_l, ``MIN_RATIO``))

Where the single FCOS head departs (decided, with the reason):

- The box term stays FoveaBox's (smooth-L1 in log space, not the detector's GIoU): the head's
  distances are positive pixel lengths, so ln(d / r_l) is the released head's output for the
  same box, and FoveaBox decodes x1 = x - r_l exp(p) exactly as d = r_l exp(p). What differs is
  the parameterisation: dwlab's d = ReLU(a u) s_l, so dp/du = 1/u where FoveaBox's is 1 (the
  same loss, larger steps for short sides). ``MIN_RATIO`` (1e-3, a hundredth of a pixel at
  P3) only keeps ln finite on a ReLU output of 0, where the gradient is 0 anyway.
- Scores: FoveaBox has no quality branch and ranks by sigmoid(cls); dwlab's detector ranks by
  the joint score s = sigmoid(cls) * sigmoid(ctr), so the focal loss trains s (as dwlab's GFL,
  VFL and TOOD do): the centerness logit is a second factor of the score with no target of its
  own.
- Points: both use the cell centre, (i + 0.5) s_l (``model.anchor_offset`` 0.5). The released
  code finds the fovea by rounding its edges to grid indices and clamping them into the feature
  map, so a fovea lying wholly in the half-stride border beyond the last point makes that edge
  point positive; here a point is positive only inside its fovea.
- No feature-alignment (``with_deform``) branch: the released 1x config leaves it off.

A small GT's fovea may hold no point: a side must reach stride / sigma (20 px on P3) before a
grid point is sure to fall in it. Measured on the embedded generated train set (400 images of
128 px, 1620 GTs): 24.4 % of the GTs, all of sqrt(area) < 32, have no positive on any level (a
GT has 2.9 positives on average). As released, nothing gives them one.
The smoke and mini presets keep the released ranges for this reason: divided by 4 like FCOS's,
they put a GT on a level whose stride is 4x coarser beside its fovea, and 60 % of those GTs got
no positive (0.4 per GT), the 0.3 AP of the first smoke Table 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    check_outputs,
    class_target,
    one_gt_per_anchor,
    pad_targets,
    positives,
)
from dwlab.box_ops import box_centers, boxes_to_distances
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import focal_loss
from dwlab.models.outputs import Anchors, HeadOutputs

MIN_RATIO = 1e-3  # floor of a predicted distance over the base edge, inside the log
TARGET_RATIO = (1.0 / 16.0, 16.0)  # released clamp of the target ratio before the log


@torch.no_grad()
def fovea_match(
    anchors: Anchors, gt_boxes: Tensor, gt_valid: Tensor, *, scale_ranges: Tensor, sigma: float
) -> Tensor:
    """Matched GT index per point, ``Tensor[B, A]`` long, -1 = background (module docstring).

    gt_boxes ``Tensor[B, G, 4]`` xyxy; gt_valid ``Tensor[B, G]``; scale_ranges ``Tensor[L, 2]``
    (lo, hi) of sqrt(w h) per level. Dense over ``[B, A, G]``, like ``fcos.fcos_match``.
    """
    b, g = gt_valid.shape
    if g == 0:
        return torch.full((b, len(anchors)), -1, dtype=torch.long, device=gt_boxes.device)
    wh = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=0)  # [B, G, 2]
    area = wh.prod(-1)  # [B, G]
    size = area.sqrt()
    lo, hi = scale_ranges[anchors.levels].unbind(-1)  # [A] each
    in_range = (size[:, None, :] >= lo[None, :, None]) & (size[:, None, :] <= hi[None, :, None])  # scale assignment
    offset = (anchors.points[None, :, None, :] - box_centers(gt_boxes)[:, None]).abs()  # [B, A, G, 2]
    in_fovea = (offset <= sigma * wh[:, None] / 2).all(-1)  # object fovea, one sigma (released)
    claims = in_range & in_fovea & gt_valid[:, None, :]
    return one_gt_per_anchor(claims, area[:, None, :].expand_as(claims), largest=False)


class FoveaBoxAssigner(LabelAssigner):
    """FoveaBox's scale and fovea assignment with its released loss (module docstring).

    Returns ``{"loss_cls", "loss_box"}``, unweighted; ``loss_weights`` gives ``loss_box`` the
    weight ``box_weight`` (1, released).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        base_edge_list: list[float] = (16.0, 32.0, 64.0, 128.0, 256.0),
        scale_ranges: list[list[float]] = ((1.0, 64.0), (32.0, 128.0), (64.0, 256.0), (128.0, 512.0), (256.0, 2048.0)),
        sigma: float = 0.4,
        focal_alpha: float = 0.4,
        focal_gamma: float = 1.5,
        smooth_l1_beta: float = 0.11,
        box_weight: float = 1.0,
    ) -> None:
        check_positive(num_classes=num_classes, sigma=sigma, smooth_l1_beta=smooth_l1_beta)
        if not sigma <= 1.0:
            raise ValueError(f"sigma must be in (0, 1] (the fovea is the box shrunk by sigma), got {sigma}")
        ranges = [list(r) for r in scale_ranges]
        if len(base_edge_list) != len(ranges) or not ranges:
            raise ValueError(
                f"base_edge_list {list(base_edge_list)} and scale_ranges {ranges} need one entry per level"
            )
        if any(len(r) != 2 or not 0 <= r[0] <= r[1] for r in ranges):
            raise ValueError(f"scale_ranges must be [lo, hi] pairs with 0 <= lo <= hi, got {ranges}")
        if any(not e > 0 for e in base_edge_list):
            raise ValueError(f"base_edge_list must be positive, got {list(base_edge_list)}")
        self.num_classes = num_classes
        self.base_edges, self.scale_ranges, self.sigma = [float(e) for e in base_edge_list], ranges, sigma
        self.focal_alpha, self.focal_gamma, self.beta = focal_alpha, focal_gamma, smooth_l1_beta
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight}

    @torch.no_grad()
    def match(self, outputs: HeadOutputs, targets: list[Target]) -> tuple[Tensor, Tensor, Tensor]:
        """``(matched Tensor[B, A], gt_boxes Tensor[B, G, 4], gt_labels Tensor[B, G])``, no gradient."""
        check_outputs(outputs, targets, self.num_classes)
        num_levels = len(outputs.anchors.level_sizes)
        assert num_levels == len(self.base_edges), (
            f"the detector has {num_levels} levels, base_edge_list and scale_ranges {len(self.base_edges)}"
        )
        device = outputs.cls_logits.device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        ranges = torch.tensor(self.scale_ranges, dtype=torch.float32, device=device)
        matched = fovea_match(outputs.anchors, gt_boxes, gt_valid, scale_ranges=ranges, sigma=self.sigma)
        return matched, gt_boxes, gt_labels

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        matched, gt_boxes, gt_labels = self.match(outputs, targets)
        device = outputs.cls_logits.device
        pos = positives(outputs, matched, gt_boxes, gt_labels)
        num_pos = float(pos.image.numel())

        target = class_target(outputs.cls_logits.shape, pos, torch.ones_like(pos.iou))
        loss_cls = focal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target,
            alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum",
        )  # fmt: skip

        edge = torch.tensor(self.base_edges, device=device)[outputs.anchors.levels[pos.anchor]][:, None]  # [P, 1]
        with torch.no_grad():  # box prediction target, released: ln of the clamped ratio
            ratio = boxes_to_distances(outputs.anchors.points[pos.anchor], pos.gt_boxes) / edge
            box_target = ratio.clamp(*TARGET_RATIO).log()
        pred = (outputs.distances[pos.image, pos.anchor].float() / edge).clamp(min=MIN_RATIO).log()
        loss_box = F.smooth_l1_loss(pred, box_target, beta=self.beta, reduction="sum")
        return {
            "loss_cls": loss_cls / normaliser(num_pos + len(targets), device),
            "loss_box": loss_box / normaliser(num_pos, device),
        }
