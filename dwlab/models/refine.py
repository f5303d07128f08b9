"""Box refinement (paper Eq. 9-10).

At anchor point (x, y) with coarse distances (l, t, r, b), a 3x3 conv predicts 8 offsets in
stride units, giving four boundary points

    B_l = (x - l + dx_l, y + dy_l)    B_t = (x + dx_t, y - t + dy_t)
    B_r = (x + r + dx_r, y + dy_r)    B_b = (x + dx_b, y + b + dy_b)

The coarse distances are decoded into a box map (x1, y1, x2, y2 per location); x1 is sampled
bilinearly at B_l, y1 at B_t, x2 at B_r, y2 at B_b, and the refined box is turned back into
distances from (x, y) (ReLU). Sampling positions are clamped to the feature map, so both
samplers (``torchvision.ops.deform_conv2d`` as a depthwise deformable conv with unit 1x1
weights, as the released code does, or ``grid_sample``) give the same result. The offsets conv
starts at zero: where neighbouring locations predict the same box, the refined box is the
coarse one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# offset channel k holds (dx, dy) of boundary point k // 2; boundary order l, t, r, b
# box map channel sampled at each boundary point: x1 at B_l, y1 at B_t, x2 at B_r, y2 at B_b


class BoxRefine(nn.Module):
    def __init__(self, in_channels: int, sampler: str = "deform_conv", anchor_offset: float = 0.5) -> None:
        super().__init__()
        if sampler not in ("deform_conv", "grid_sample"):
            raise ValueError(f"refine sampler must be deform_conv or grid_sample, got {sampler!r}")
        self.sampler = sampler
        self.anchor_offset = anchor_offset
        self.offsets = nn.Conv2d(in_channels, 8, 3, padding=1)
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.offsets.bias)

    def forward(self, reg_feature: Tensor, distances: Tensor, stride: int) -> Tensor:
        """reg_feature ``Tensor[B, F, H, W]``, coarse distances ``Tensor[B, 4, H, W]`` (l, t, r, b
        pixels) -> refined distances ``Tensor[B, 4, H, W]``."""
        b, _, h, w = distances.shape
        offsets = self.offsets(reg_feature).float()  # [B, 8, H, W], stride units, (dx, dy) pairs
        dist = distances.float() / stride  # in index units
        ys = torch.arange(h, device=dist.device, dtype=dist.dtype).view(1, h, 1).expand(b, h, w)
        xs = torch.arange(w, device=dist.device, dtype=dist.dtype).view(1, 1, w).expand(b, h, w)
        l, t, r, bo = dist.unbind(1)
        # Eq. 9: boundary points in feature-index units (x, y) for l, t, r, b
        px = torch.stack([xs - l, xs, xs + r, xs], 1) + offsets[:, 0::2]
        py = torch.stack([ys, ys - t, ys, ys + bo], 1) + offsets[:, 1::2]
        px = px.clamp(0, w - 1)
        py = py.clamp(0, h - 1)
        # the box map, in index units: x1 = x - l, y1 = y - t, x2 = x + r, y2 = y + b
        box_map = torch.stack([xs - l, ys - t, xs + r, ys + bo], 1)
        if self.sampler == "grid_sample":
            sampled = self._grid_sample(box_map, px, py)
        else:
            sampled = self._deform_sample(box_map, px - xs.unsqueeze(1), py - ys.unsqueeze(1))
        x1, y1, x2, y2 = sampled.unbind(1)
        # Eq. 10: refined distances from (x, y), back to pixels
        refined = torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], 1).clamp(min=0) * stride
        return refined  # fp32, like the coarse distances

    @staticmethod
    def _grid_sample(box_map: Tensor, px: Tensor, py: Tensor) -> Tensor:
        b, c, h, w = box_map.shape
        gx = px / max(w - 1, 1) * 2 - 1  # [B, 4, H, W]
        gy = py / max(h - 1, 1) * 2 - 1
        grid = torch.stack([gx, gy], -1).reshape(b * c, h, w, 2)
        out = F.grid_sample(box_map.reshape(b * c, 1, h, w), grid, mode="bilinear", align_corners=True)
        return out.reshape(b, c, h, w)

    @staticmethod
    def _deform_sample(box_map: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
        from torchvision.ops import deform_conv2d  # only imported when refinement is used

        c = box_map.shape[1]
        offset = torch.stack([dy, dx], 2).flatten(1, 2)  # [B, 2*C, H, W], (dy, dx) per group
        weight = torch.ones(c, 1, 1, 1, device=box_map.device, dtype=box_map.dtype)
        return deform_conv2d(box_map, offset, weight)
