"""Image + box transforms: keep-ratio resize, horizontal flip, normalisation. Boxes xyxy pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_keep_ratio(
    image: Tensor, boxes: Tensor, min_size: int, max_size: int
) -> tuple[Tensor, Tensor, float]:
    """Resize ``Tensor[3, H, W]`` uint8 so the shorter side is ``min_size`` and the longer at
    most ``max_size``; boxes ``Tensor[G, 4]`` follow. Returns (image, boxes, scale)."""
    h, w = image.shape[1:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(
            image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )[0].clamp_(0, 255)
    else:
        image = image.float()
    boxes = boxes * torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
    return image, boxes, scale


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror ``Tensor[3, H, W]`` and its xyxy boxes left-right."""
    w = image.shape[-1]
    flipped = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([w, 0.0, w, 0.0])
    return image.flip(-1), flipped


def normalize(image: Tensor) -> Tensor:
    """0..255 float ``Tensor[3, H, W]`` -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return (image - mean) / std


def denormalize(image: Tensor) -> Tensor:
    """``normalize``'s inverse, scaled to [0, 1]: ``Tensor[3, H, W]`` for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return image * std + mean
