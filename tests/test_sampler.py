"""Orientation-grouped batches: one orientation per batch, every index once, and a batch count
that depends only on the shard's length (data-parallel ranks take equal numbers of steps)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from dwlab.config import validate
from dwlab.data.sampler import GroupedBatchSampler, orientation_groups
from dwlab.runner import build_datasets, make_loader
from tests.conftest import tiny_config


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_batches_are_one_orientation_until_the_remainders(batch_size):
    groups = [0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0]
    sampler = RandomSampler(range(len(groups)), generator=torch.Generator().manual_seed(0))
    batches = list(GroupedBatchSampler(sampler, groups, batch_size))
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))
    assert len(batches) == len(GroupedBatchSampler(sampler, groups, batch_size)) == math.ceil(len(groups) / batch_size)
    full = [b for b in batches if len(b) == batch_size]
    assert all(len({groups[i] for i in b}) == 1 for b in full[: len(full) - 1])  # only the last may mix


def test_every_rank_takes_the_same_number_of_steps():
    groups = [1] * 7 + [0] * 4  # uneven orientations across shards
    lengths = {len(list(GroupedBatchSampler(DistributedSampler(range(11), 3, r, seed=0), groups, 2))) for r in range(3)}
    assert lengths == {2}  # ceil(4 / 2): each shard holds 4 of the 11 (padded) indices


def test_the_train_loader_groups_by_orientation_when_asked(synth_root):
    cfg = validate(tiny_config(synth_root, data={"group_by_aspect": True}), "t")
    train, _ = build_datasets(cfg)
    loader = make_loader(train, 4, cfg, train=True, generator=torch.Generator().manual_seed(0))
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    groups = orientation_groups(train)
    assert groups == [int(train.coco.imgs[i]["width"] >= train.coco.imgs[i]["height"]) for i in train.image_ids]
    batches = list(loader.batch_sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(train)))
    full = [b for b in batches if len(b) == 4]
    assert all(len({groups[i] for i in b}) == 1 for b in full[:-1])  # the remainders' batch may mix
