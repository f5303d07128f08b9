"""Batches of images that share an orientation (``data.group_by_aspect``): a batch pads its
images to the largest of each side, so a landscape image next to a portrait one at 1333x800
would train on about 1333x1333 of mostly padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Iterable

from torch.utils.data import Sampler


def orientation_groups(dataset) -> list[int]:
    """Per dataset index: 1 for an image at least as wide as tall, else 0 (from the COCO
    ``images`` entries of a ``CocoDetection``)."""
    images = dataset.coco.imgs
    return [int(images[i]["width"] >= images[i]["height"]) for i in dataset.image_ids]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices drawn from ``sampler`` in its order, each from one
    group; at the end the groups' remainders are batched together. Always
    ``ceil(len(sampler) / batch_size)`` batches, so data-parallel ranks with equal shards take
    equal numbers of steps."""

    def __init__(self, sampler: Iterable[int] | Sized, groups: list[int], batch_size: int):
        self.sampler, self.groups, self.batch_size = sampler, groups, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        rest = [i for bucket in buckets.values() for i in bucket]
        for start in range(0, len(rest), self.batch_size):
            yield rest[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)
