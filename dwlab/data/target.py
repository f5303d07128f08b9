"""The per-image target the data pipeline produces and the assigners consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Target:
    """Ground truth of one image in the network's input frame (after resize and flip).

    boxes: ``Tensor[G, 4]`` xyxy pixels, crowd boxes excluded; G may be 0.
    labels: ``Tensor[G]`` contiguous class indices 0..C-1, long.
    image_id: the COCO image id.
    scale: input pixels per original pixel (to map detections back).
    orig_size: (height, width) of the original image.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int = 0
    scale: float = 1.0
    orig_size: tuple[int, int] = (0, 0)

    def to(self, device: torch.device | str) -> Target:
        return Target(
            self.boxes.to(device), self.labels.to(device), self.image_id, self.scale, self.orig_size
        )
