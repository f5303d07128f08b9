"""The data-parallel normaliser rule, pinned on two real gloo processes: averaged over workers,
then clamped to at least 1 (the released code's). Equal to one process on the same global batch
when the per-worker mean is at least 1; different below 1, by the factor the docstring gives."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dwlab.distributed import normaliser


def _worker(rank: int, init: str, values: list[float], out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(values))
    try:
        out[rank] = float(normaliser(values[rank], torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def _normalisers(tmp_path, values: list[float]) -> list[float]:
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", values, out), nprocs=len(values))
    return [out[r] for r in range(len(values))]


@pytest.mark.parametrize(
    ("values", "ddp_over_one_process"),
    [
        ([3.0, 5.0], 1.0),  # mean 4 >= 1: DDP equals one process
        ([0.6, 0.6], 1.2 / 2),  # mean 0.6 clamps to 1 per worker, the total 1.2 does not clamp
        ([0.2, 0.0], 1.0 / 2),  # an image without GT: both clamp, DDP averages two halves
    ],
)
def test_ddp_normaliser_matches_one_process_only_at_a_mean_of_at_least_one(tmp_path, values, ddp_over_one_process):
    per_worker = _normalisers(tmp_path, values)
    assert per_worker == pytest.approx([max(sum(values) / 2, 1.0)] * 2)
    sums = [1.5, 2.5]  # each worker's unnormalised loss sum
    ddp = sum(s / n for s, n in zip(sums, per_worker)) / 2  # DDP averages the workers' gradients
    one = sum(sums) / max(sum(values), 1.0)  # one process on both halves (no group: no averaging)
    assert ddp / one == pytest.approx(ddp_over_one_process)
    assert float(normaliser(sum(values), torch.device("cpu"))) == pytest.approx(max(sum(values), 1.0))


# ----------------------------------------------------------------------------- evaluation


def _eval_worker(rank: int, init: str, raw: dict, out_dir: str, out) -> None:
    from pathlib import Path

    from dwlab.config import validate
    from dwlab.models.detector import build_model
    from dwlab.runner import build_datasets, evaluate

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks
        cfg = validate(raw, "t")
        _, val = build_datasets(cfg)
        model = build_model(cfg.model, val.num_classes)
        out[rank] = evaluate(model, val, cfg, torch.device("cpu"), Path(out_dir) / f"det{rank}.json")
    finally:
        dist.destroy_process_group()


def test_two_rank_evaluation_equals_one_process(tmp_path):
    """Each rank scores its shard (5 images: DistributedSampler pads one shard with a repeat,
    which must count once); rank 0 gathers the detections and scores them: the same metrics
    and detections as one process, and every rank gets the metrics."""
    import json

    from dwlab.config import validate
    from dwlab.data.synth import generate
    from dwlab.models.detector import build_model
    from dwlab.runner import build_datasets, evaluate
    from tests.conftest import tiny_config

    root = generate(tmp_path / "data", n_train=2, n_val=5, seed=3, image_size=128)
    raw = tiny_config(root, eval={"score_thresh": 0.0, "batch_size": 2})  # random weights: keep every box
    out = mp.Manager().dict()
    mp.spawn(_eval_worker, args=(f"file://{tmp_path / 'rendezvous'}", raw, str(tmp_path), out), nprocs=2)

    torch.manual_seed(0)
    cfg = validate(raw, "t")
    _, val = build_datasets(cfg)
    one = evaluate(build_model(cfg.model, val.num_classes), val, cfg, torch.device("cpu"), tmp_path / "one.json")
    assert out[0] == out[1] == pytest.approx(one)
    key = lambda d: (d["image_id"], d["category_id"], d["score"])  # noqa: E731
    gathered = sorted(json.loads((tmp_path / "det0.json").read_text()), key=key)
    single = sorted(json.loads((tmp_path / "one.json").read_text()), key=key)
    assert len(gathered) == len(single) > 0
    assert [key(d)[:2] for d in gathered] == [key(d)[:2] for d in single]
    assert [d["score"] for d in gathered] == pytest.approx([d["score"] for d in single], rel=1e-4)
    assert not (tmp_path / "det1.json").exists()  # rank 0 writes
