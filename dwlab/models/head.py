"""The FCOS head: shared cls and reg towers over P3-P7, outputs only (no targets, no loss).

Two head options of GFL (Li et al., "Generalized Focal Loss", NeurIPS 2020) and GFLv2 (Li et
al., "Generalized Focal Loss V2: Learning Reliable Localization Quality Estimation for Dense
Object Detection", CVPR 2021), off by default (the head is then the FCOS head, bit for bit):

- ``reg_max`` n (GFL §3, the "general distribution"): the reg branch predicts, per point and
  side, logits over the n + 1 bins ``0..n`` (stride units); the distance is the distribution's
  integral (GFL Eq. 4), ``y_hat = sum_i P(y_i) y_i = softmax(logits) . [0, 1, ..., n]``, times
  the stride, in float32 (``integral``). The raw logits go out with the distances
  (``HeadOutputs.distribution``) for the Distribution Focal Loss.
- ``dgqp`` (GFLv2 §3, the Distribution-Guided Quality Predictor): per side the top-k (k = 4)
  probabilities of the distribution and their mean, 4 x 5 = 20 statistics
  (F = Concat(Topkm(P^w)), ``dgqp_features``), through a 1x1 conv to 64 channels, ReLU and a
  1x1 conv to 1: the quality logit, whose sigmoid is I in GFLv2's ``J = C x I``
  (classification x quality). It takes
  the place of the centerness branch: the head has no centerness conv then, and its quality
  logit is ``HeadOutputs.centerness``, so the score every assigner trains and inference ranks
  by, ``sigmoid(cls) * sigmoid(centerness)``, is GFLv2's joint score. Computed in float32 with
  autocast off (the released code casts the distribution to float before the softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DGQP_TOPK = 4  # GFLv2's k: top-k probabilities per side (released ``reg_topk``)
DGQP_CHANNELS = 64  # GFLv2's hidden width p (released ``reg_channels``)


def integral(logits: Tensor) -> Tensor:
    """GFL Eq. 4: the expectation of the distribution over the bins ``0..n``,
    ``sum_i softmax(logits)_i * i``, in float32. logits ``Tensor[..., n + 1]`` -> ``Tensor[...]``
    (in bins, i.e. stride units)."""
    probs = F.softmax(logits.float(), dim=-1)
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return (probs * bins).sum(-1)


def dgqp_features(logits: Tensor, topk: int = DGQP_TOPK) -> Tensor:
    """GFLv2's DGQP input F = Concat(Topkm(P^w)): per side, the ``topk`` largest probabilities of softmax(logits) and their
    mean, concatenated side by side: logits ``Tensor[..., 4, n + 1]`` -> ``Tensor[..., 4 * (topk
    + 1)]`` (20 for k = 4), in float32, with gradient into the distribution (as released)."""
    probs = F.softmax(logits.float(), dim=-1)
    top = probs.topk(topk, dim=-1).values  # [..., 4, k]
    return torch.cat([top, top.mean(-1, keepdim=True)], dim=-1).flatten(-2)


def _tower(channels: int, num_convs: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Per level: cls logits (C), centerness logit (on the reg tower) and (l, t, r, b) distances
    = ReLU(scale_level * conv(reg tower)) * stride, optionally refined (paper Eq. 9-10).
    ``dcn_last``: the last conv of each tower is a DCNv2 (``dwlab.models.dcn``) with the same
    initial weights, as the released DW code's DCN config (``dcn_on_last_conv``).

    ``reg_max`` n: distances = ``integral(scale_level * conv(reg tower)) * stride`` over n + 1
    bins per side (GFL; the conv's bias starts at 0, a uniform distribution, and
    ``reg_bias_init`` does not apply); ``dgqp``: the centerness conv is replaced by GFLv2's
    quality predictor on the distribution (needs ``reg_max``). See the module docstring."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        *,
        num_convs: int = 4,
        norm_groups: int = 32,
        prior_prob: float = 0.01,
        reg_bias_init: float = 0.0,
        box_refine: bool = False,
        refine_sampler: str = "deform_conv",
        anchor_offset: float = 0.5,
        centerness_bias: float = 0.0,
        dcn_last: bool = False,
        reg_max: int | None = None,
        dgqp: bool = False,
    ) -> None:
        super().__init__()
        if reg_max is not None and reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        if dgqp and reg_max is None:
            raise ValueError("dgqp needs reg_max (the quality predictor reads the box distribution)")
        if reg_max is not None and box_refine:
            raise ValueError("box_refine with reg_max (a distribution head) is not implemented")
        if reg_max is not None and reg_max + 1 < DGQP_TOPK and dgqp:
            raise ValueError(f"dgqp needs reg_max >= {DGQP_TOPK - 1}, got {reg_max}")
        self.strides = strides
        self.reg_max = reg_max
        self.cls_tower = _tower(channels, num_convs, norm_groups)
        self.reg_tower = _tower(channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4 if reg_max is None else 4 * (reg_max + 1), 3, padding=1)
        self.quality = None
        if dgqp:  # GFLv2's DGQP in the centerness branch's place
            self.quality = nn.Sequential(
                nn.Conv2d(4 * (DGQP_TOPK + 1), DGQP_CHANNELS, 1), nn.ReLU(), nn.Conv2d(DGQP_CHANNELS, 1, 1)
            )
        else:
            self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        if reg_max is None:  # a distribution's logits start at 0 (GFL), a uniform distribution
            nn.init.constant_(self.bbox_pred.bias, reg_bias_init)
        # 0; an assigner's HeadInit may set a prior
        nn.init.constant_(self._quality_conv.bias, centerness_bias)
        if dcn_last and num_convs:  # MMDetection's dcn_on_last_conv: each tower's last conv is a DCNv2
            from dwlab.models.dcn import ModulatedDeformConv2d

            for tower in (self.cls_tower, self.reg_tower):
                tower[-3] = ModulatedDeformConv2d.from_conv(tower[-3])
        self.refine = None
        if box_refine:
            from dwlab.models.refine import BoxRefine

            self.refine = BoxRefine(channels, refine_sampler, anchor_offset)

    @property
    def _quality_conv(self) -> nn.Conv2d:
        """The conv whose output is the centerness (quality) logit."""
        return self.centerness if self.quality is None else self.quality[-1]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor] | None]:
        """features: per level ``Tensor[B, F, H_l, W_l]``. Returns per-level lists of
        cls ``[B, C, H, W]``, centerness ``[B, 1, H, W]`` (DGQP's quality logit with ``dgqp``),
        distances ``[B, 4, H, W]`` (the refined ones with refinement) and, with ``reg_max`` n,
        the distribution logits ``[B, 4 * (n + 1), H, W]`` in float32 (side-major: side
        ``s``'s bins are channels ``s (n + 1) .. s (n + 1) + n``); None without it."""
        cls_out, ctr_out, dist_out = [], [], []
        logits_out: list[Tensor] | None = None if self.reg_max is None else []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            cls_feat = self.cls_tower(feature)
            reg_feat = self.reg_tower(feature)
            cls_out.append(self.cls_logits(cls_feat))
            if self.reg_max is not None:
                dist, quality = self._distribution(reg_feat, level, stride, logits_out)
                ctr_out.append(self.centerness(reg_feat) if quality is None else quality)
                dist_out.append(dist)
                continue
            ctr_out.append(self.centerness(reg_feat))
            # fp32 from here on (as MMDetection): under fp16 autocast, distances above 512 px
            # would step by 0.5 px and overflow to inf past 65504 / stride
            dist = torch.relu(self.scales[level] * self.bbox_pred(reg_feat).float()) * stride
            if self.refine is not None:
                dist = self.refine(reg_feat, dist, stride)
            dist_out.append(dist)
        return cls_out, ctr_out, dist_out, logits_out

    def _distribution(
        self, reg_feat: Tensor, level: int, stride: int, logits_out: list[Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """GFL's distribution branch of one level: appends its logits ``[B, 4 (n + 1), H, W]`` to
        ``logits_out``; returns the distances ``[B, 4, H, W]`` (pixels) and, with DGQP, the
        quality logit ``[B, 1, H, W]``; all float32, autocast off after the conv."""
        logits = (self.scales[level] * self.bbox_pred(reg_feat)).float()  # the released Scale on the logits
        logits_out.append(logits)
        b, _, h, w = logits.shape
        with torch.autocast(logits.device.type, enabled=False):
            sides = logits.reshape(b, 4, self.reg_max + 1, h, w).movedim(2, -1)  # [B, 4, H, W, n + 1]
            dist = integral(sides) * stride
            if self.quality is None:
                return dist, None
            stats = dgqp_features(sides.movedim(1, -2))  # [B, H, W, 20]
            return dist, self.quality(stats.movedim(-1, 1))
