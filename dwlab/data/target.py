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


def check_labels(targets: list[Target], num_classes: int) -> None:
    """Assert that every label is a class index in ``[0, num_classes)``; targets on the host
    (reading device labels would make the host wait: the training step checks its targets here,
    before they move to the device)."""
    labels = [t.labels.reshape(-1) for t in targets]
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    assert labels.device.type == "cpu", f"check_labels reads labels on the host, got {labels.device}"
    assert labels.numel() == 0 or (0 <= int(labels.min()) and int(labels.max()) < num_classes), labels


def targets_to(targets: list[Target], device: torch.device) -> list[Target]:
    """The targets on ``device`` with one copy per field, not two per image: every image's boxes
    (``Tensor[G, 4]``) and labels concatenated, copied asynchronously (from pinned memory on
    CUDA), and split back into per-image views. Values unchanged."""
    counts = [t.labels.numel() for t in targets]
    boxes = torch.cat([t.boxes.reshape(-1, 4) for t in targets]) if targets else torch.zeros(0, 4)
    labels = torch.cat([t.labels.reshape(-1) for t in targets]) if targets else torch.zeros(0, dtype=torch.long)
    if torch.device(device).type == "cuda":
        boxes, labels = boxes.pin_memory(), labels.pin_memory()
    boxes, labels = boxes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return [
        Target(b, lab, t.image_id, t.scale, t.orig_size)
        for t, b, lab in zip(targets, boxes.split(counts), labels.split(counts))
    ]
