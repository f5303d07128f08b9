"""TOOD's task-aligned head, the T-head (Feng, Zhong, Gao, Scott, Huang, "TOOD: Task-aligned
One-stage Object Detection", ICCV 2021, §3.1), as a head of dwlab's detector: the same inputs
(P3-P7) and the same outputs (``FCOSHead``'s three per-level lists) as the FCOS head, so that
every assigner runs on it unchanged (``model.head: tood``).

Per level, from the FPN feature X^fpn (TOOD Eq. 1-6):

- Interactive features (Eq. 1): N = ``stacked_convs`` (6 released) 3x3 conv + GN + ReLU layers in
  one shared stack, X^inter_k = ReLU(conv_k(X^inter_{k-1})); all N outputs are concatenated,
  ``Tensor[B, N F, H, W]``.
- Task decomposition (Eq. 2-3), one per task (cls, reg): layer attention
  w = sigmoid(conv2(ReLU(conv1(avgpool(X^inter))))) ``Tensor[B, N]`` (hidden N F / la_down_rate
  channels, la_down_rate = 8 N as released: F / 8), then X^task = ReLU(GN(conv1x1(concat_k
  w_k X^inter_k))). The per-image weights are folded into the 1x1 reduction conv's weight
  (``[B, F, N F]``, one batched matmul) instead of scaling N F channels of every location.
- Task-aligned prediction (Eq. 4-6): Z = conv3x3(X^cls) class logits; the cls probability map
  M = sigmoid(conv3x3(ReLU(conv1x1(X^inter)))) ``Tensor[B, 1, H, W]``; the aligned score
  P^align = sqrt(sigmoid(Z) * M) (Eq. 5); distances in stride units
  d = scale_level * exp(conv3x3(X^reg)) (released ``anchor_type='anchor_free'``) decoded into a
  box map from the anchor point, whose four coordinates are re-sampled bilinearly at learnt
  offsets O ``Tensor[B, 8, H, W]`` ((dy, dx) per coordinate, from conv3x3(ReLU(conv1x1(X^inter))))
  by ``torchvision.ops.deform_conv2d`` as a 1x1 depthwise deformable conv with unit weights and
  4 offset groups (Eq. 6: B^align(i, j, c) = B(i + O(i, j, 2c), j + O(i, j, 2c + 1), c)); a sample
  outside the map reads zeros (mmcv's kernel does the same; dwlab's box refinement clamps instead).

Initialisation (released ``init_weights``): convs normal std 0.01 with zero bias, the layer
attention's convs std 0.001, the offset convs std 0.001 with zero bias (so boxes start
re-sampled at their own location), the class conv and the probability map's last conv biased to
the class prior (``prior_prob``: P^align starts at sqrt(p * p) = p).

How the T-head fills dwlab's outputs (``dwlab.models.outputs.HeadOutputs``), and where it departs:

- **cls logits = logit(P^align)**, not Z: every assigner reads sigmoid(cls) as the class score,
  so each of them (focal, QFL, VFL, DW's, TOOD's losses and their assignment costs) sees TOOD's
  aligned score. The logit is computed in log space from Z and M's logit (``aligned_logit``),
  finite for any inputs, with the analytic backward of MMDetection's ``SigmoidGeometricMean``
  carried through the logit (the naive sqrt(sigmoid * sigmoid) has infinite or NaN gradients
  when both logits are very negative; mmdetection PR #7090).
- **centerness**: the T-head has no quality branch; dwlab's head keeps one, a 3x3 conv on X^reg
  (as the FCOS head's is on its reg tower), for the assigners that train it (FCOS and ATSS
  centerness, PAA and OTA IoU prediction, SimOTA objectness, AutoAssign's ImpObj) or train the
  joint score sigmoid(cls) * sigmoid(centerness) (GFL, VFL, TOOD, DW, AutoAssign). With those
  joint-score methods the score trained and ranked is P^align * sigmoid(centerness): one factor
  more than TOOD's P^align (the released T-head ranks by P^align alone), the same factor the
  FCOS head gives them. Inference ranks every method by that joint score.
- **distances**: the aligned box B^align, turned back into (l, t, r, b) from the anchor point, in
  pixels and fp32 (the FCOS head's convention): the box arithmetic and the deformable sampling
  run in fp32 under autocast. Where the sampled box is invalid (x1 > x2 or y1 > y2) the unsampled
  box is kept (mmdetection PR #7567; otherwise GIoU goes negative). Distances are then clamped at
  0 (``HeadOutputs`` holds distances >= 0, as dwlab's box refinement does): a sampled box that
  does not contain its anchor point is cut at the point, where TOOD's GIoU would see it whole.
- Distances are exp(.) of the regression conv (bias 0: one stride at init), so
  ``model.reg_bias_init`` (the FCOS head's ReLU bias) does not apply; the anchor point is dwlab's
  ``stride * (i + anchor_offset)`` (TOOD's anchor-free points have offset 0).
- The interactive convs have no bias (mmcv's ``ConvModule`` drops it before a norm layer), as
  released; GN has ``norm_groups`` groups (32 released).
- torchvision's ``deform_conv2d`` CUDA backward accumulates with atomics: a T-head run on a GPU
  is not bit-reproducible even with ``train.deterministic`` (the CPU is).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _AlignedLogit(torch.autograd.Function):
    """logit(sqrt(sigmoid(z) * sigmoid(q))) with its analytic gradient; see ``aligned_logit``."""

    @staticmethod
    def forward(ctx, z: Tensor, q: Tensor) -> Tensor:
        sp_z, sp_q = F.softplus(z), F.softplus(q)  # -log sigmoid(-z), -log sigmoid(-q)
        log_m = -0.5 * (F.softplus(-z) + F.softplus(-q))  # log M, M = sqrt(s_z s_q)
        # log(1 - s_z s_q) = log(a + b (1 - a)), a = sigmoid(-z), b = sigmoid(-q), in log space
        log_1m_prod = torch.logaddexp(-sp_z, -sp_q - F.softplus(-z))
        m = log_m.exp()
        half_1p_m = 0.5 * (1.0 + m)
        # 1 - M = (1 - s_z s_q) / (1 + M), so logit(M) = log M - log(1 - s_z s_q) + log(1 + M)
        out = log_m - log_1m_prod + torch.log1p(m)
        # d logit(M) / dz = (1 - s_z) / (2 (1 - M)) = a (1 + M) / (2 (1 - s_z s_q)): in [0, 1]
        ctx.save_for_backward(half_1p_m * (-sp_z - log_1m_prod).exp(), half_1p_m * (-sp_q - log_1m_prod).exp())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        dz, dq = ctx.saved_tensors
        return grad * dz, grad * dq


def aligned_logit(z: Tensor, q: Tensor) -> Tensor:
    """The logit of TOOD's aligned score sqrt(sigmoid(z) * sigmoid(q)) (TOOD Eq. 5).

    z ``Tensor[...]`` class logits, q the probability map's logits, broadcastable to z; the
    result has their broadcast shape, in fp32 (fp64 for fp64 inputs). Finite, with finite gradients, for any finite inputs: the
    forward is in log space and the backward analytic (d/dz = (1 - sigmoid(z)) / (2 (1 - M)), in
    [0, 1]), like MMDetection's ``SigmoidGeometricMean`` carried through the logit.
    """
    dtype = torch.promote_types(torch.promote_types(z.dtype, q.dtype), torch.float32)
    z, q = torch.broadcast_tensors(z.to(dtype), q.to(dtype))  # the expand's backward sums q's gradient
    return _AlignedLogit.apply(z, q)


class TaskDecomposition(nn.Module):
    """One task's features from the interactive stack (TOOD Eq. 2-3): layer attention over the
    N layers, folded into the 1x1 reduction conv, then GN and ReLU."""

    def __init__(self, channels: int, stacked_convs: int, norm_groups: int) -> None:
        super().__init__()
        self.channels, self.stacked_convs = channels, stacked_convs
        total = channels * stacked_convs
        hidden = total // (stacked_convs * 8)  # la_down_rate = 8 N (released): F / 8 channels
        self.layer_attention = nn.Sequential(
            nn.Conv2d(total, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, stacked_convs, 1), nn.Sigmoid()
        )
        self.reduction = nn.Conv2d(total, channels, 1, bias=False)
        self.norm = nn.GroupNorm(norm_groups, channels)
        for conv in (self.layer_attention[0], self.layer_attention[2]):
            nn.init.normal_(conv.weight, std=0.001)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.reduction.weight, std=0.01)

    def forward(self, inter: Tensor, pooled: Tensor) -> Tensor:
        """inter ``Tensor[B, N F, H, W]`` the concatenated stack, pooled ``Tensor[B, N F, 1, 1]``
        its spatial mean -> ``Tensor[B, F, H, W]``."""
        b, _, h, w = inter.shape
        n, f = self.stacked_convs, self.channels
        attention = self.layer_attention(pooled).reshape(b, 1, n, 1)  # w_k per image (Eq. 2)
        # conv1x1(concat_k w_k X_k) = (W scaled by w_k on layer k's input channels) applied to X
        weight = (attention * self.reduction.weight.reshape(1, f, n, f)).reshape(b, f, n * f)
        out = torch.bmm(weight.to(inter.dtype), inter.reshape(b, n * f, h * w)).reshape(b, f, h, w)
        return F.relu(self.norm(out))


class THead(nn.Module):
    """TOOD's T-head (see the module docstring). Per level: aligned cls logits (C), a
    centerness logit (on the reg features) and aligned (l, t, r, b) distances in pixels."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        *,
        stacked_convs: int = 6,
        norm_groups: int = 32,
        prior_prob: float = 0.01,
        anchor_offset: float = 0.5,
        centerness_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if stacked_convs < 1:
            raise ValueError(f"stacked_convs must be >= 1, got {stacked_convs}")
        if channels < 8 or channels % norm_groups:
            raise ValueError(f"channels={channels} must be >= 8 and divisible by norm_groups={norm_groups}")
        self.strides = strides
        self.anchor_offset = anchor_offset
        total, quarter = channels * stacked_convs, channels // 4
        self.inter_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(norm_groups, channels),
                          nn.ReLU())
            for _ in range(stacked_convs)
        )  # fmt: skip
        self.cls_decomp = TaskDecomposition(channels, stacked_convs, norm_groups)
        self.reg_decomp = TaskDecomposition(channels, stacked_convs, norm_groups)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.cls_prob = nn.Sequential(nn.Conv2d(total, quarter, 1), nn.ReLU(), nn.Conv2d(quarter, 1, 3, padding=1))
        self.reg_offset = nn.Sequential(nn.Conv2d(total, quarter, 1), nn.ReLU(), nn.Conv2d(quarter, 8, 3, padding=1))
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)  # dwlab's quality slot (module docstring)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        prior_bias = -math.log((1 - prior_prob) / prior_prob)
        for conv in (*(s[0] for s in self.inter_convs), self.cls_logits, self.bbox_pred, self.cls_prob[0],
                     self.cls_prob[2], self.centerness):  # fmt: skip
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for conv in (self.reg_offset[0], self.reg_offset[2]):
            nn.init.normal_(conv.weight, std=0.001)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, prior_bias)
        nn.init.constant_(self.cls_prob[2].bias, prior_bias)
        nn.init.constant_(self.centerness.bias, centerness_bias)  # 0; an assigner's HeadInit may set a prior

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], None]:
        """features: per level ``Tensor[B, F, H_l, W_l]``. Returns per-level lists of aligned cls
        logits ``[B, C, H, W]`` (fp32), centerness ``[B, 1, H, W]`` and aligned distances
        ``[B, 4, H, W]`` (l, t, r, b pixels, fp32), as ``FCOSHead.forward``, and no distribution
        logits (GFL's distribution head is an FCOS-head option)."""
        cls_out, ctr_out, dist_out = [], [], []
        for level, (x, stride) in enumerate(zip(features, self.strides)):
            stack = []
            for conv in self.inter_convs:  # Eq. 1
                x = conv(x)
                stack.append(x)
            inter = torch.cat(stack, 1)
            pooled = F.adaptive_avg_pool2d(inter, 1)
            cls_feat, reg_feat = self.cls_decomp(inter, pooled), self.reg_decomp(inter, pooled)
            cls_out.append(aligned_logit(self.cls_logits(cls_feat), self.cls_prob(inter)))  # Eq. 5
            ctr_out.append(self.centerness(reg_feat))
            # fp32 from here on, as the FCOS head's distances: stride units until the last line
            dist = self.scales[level] * self.bbox_pred(reg_feat).float().exp()
            dist_out.append(self.align_boxes(dist, self.reg_offset(inter).float()) * stride)
        return cls_out, ctr_out, dist_out, None

    def align_boxes(self, dist: Tensor, offsets: Tensor) -> Tensor:
        """Eq. 6. dist ``Tensor[B, 4, H, W]`` (l, t, r, b) in stride units, offsets ``Tensor[B, 8,
        H, W]`` ((dy, dx) in cells for x1, y1, x2, y2) -> aligned (l, t, r, b) in stride units, >= 0."""
        # imported here: only a T-head run loads torchvision's deformable ops
        from torchvision.ops import deform_conv2d

        _, _, h, w = dist.shape
        ys = torch.arange(h, device=dist.device, dtype=dist.dtype).view(1, h, 1) + self.anchor_offset
        xs = torch.arange(w, device=dist.device, dtype=dist.dtype).view(1, 1, w) + self.anchor_offset
        l, t, r, b = dist.unbind(1)
        box = torch.stack([xs - l, ys - t, xs + r, ys + b], 1)  # the box map, xyxy in stride units
        weight = torch.ones(4, 1, 1, 1, device=dist.device, dtype=dist.dtype)  # 4 groups: one coordinate each
        sampled = deform_conv2d(box, offsets, weight)
        x1, y1, x2, y2 = sampled.unbind(1)
        invalid = ((x1 > x2) | (y1 > y2)).unsqueeze(1)  # mmdetection PR #7567: keep the unsampled box
        x1, y1, x2, y2 = torch.where(invalid, box, sampled).unbind(1)
        return torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], 1).clamp(min=0)
