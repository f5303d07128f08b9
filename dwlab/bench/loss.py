"""The DW weights and loss alone: dwlab's pair-based ``DWAssigner`` against the per-GT loop
reference and against the FCOS assigner's loss, on the same synthetic head outputs.

Each figure is forward + backward of the loss with respect to the head outputs (leaf tensors),
so the weights, the loss and its gradient are all in it; the network is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dwlab.assign.base import weighted_total
from dwlab.assign.dw import DWAssigner
from dwlab.assign.fcos import FCOSAssigner
from dwlab.bench.measure import in_fresh_process, interleaved_medians, peak_extra_bytes
from dwlab.bench.reference import dw_loss_per_gt_loop
from dwlab.data.target import Target
from dwlab.models.backbone import STRIDES
from dwlab.models.outputs import Anchors, HeadOutputs

METHODS = ("dw", "loop", "fcos")


@dataclass(frozen=True)
class LossCase:
    """One image of ``height x width`` (padded to 32) with ``num_gts`` GTs over ``num_classes``."""

    num_gts: int
    height: int = 800
    width: int = 1333
    num_classes: int = 80
    seed: int = 0


def synthetic_batch(case: LossCase, device: torch.device) -> tuple[HeadOutputs, list[Target]]:
    """Head outputs of one image (leaf tensors with grad) and its GTs, reproducible from the seed.

    GTs: log-uniform sides 16-400 px, centres uniform in the image. Outputs: class logits near
    the focal prior (-4.6), predicted distances about 4 strides, so IoUs with the GTs spread.
    """
    gen = torch.Generator().manual_seed(case.seed)
    pad = lambda n: math.ceil(n / 32) * 32  # noqa: E731
    sizes = [(math.ceil(pad(case.height) / s), math.ceil(pad(case.width) / s)) for s in STRIDES]
    anchors = Anchors.grid(sizes, list(STRIDES), 0.5, device)
    a, g = len(anchors), case.num_gts
    side = torch.exp(torch.empty(g, 2).uniform_(math.log(16), math.log(400), generator=gen))
    centre = torch.rand(g, 2, generator=gen) * torch.tensor([case.width, case.height])
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1)
    boxes = torch.stack([boxes[:, 0].clamp(0, case.width), boxes[:, 1].clamp(0, case.height),
                         boxes[:, 2].clamp(0, case.width), boxes[:, 3].clamp(0, case.height)], 1)  # fmt: skip
    labels = torch.randint(case.num_classes, (g,), generator=gen)
    cls = torch.randn(1, a, case.num_classes, generator=gen) - 4.6
    ctr = torch.randn(1, a, generator=gen)
    dist = torch.exp(torch.randn(1, a, 4, generator=gen) * 0.5) * anchors.strides.cpu()[None, :, None] * 4
    leaves = [t.to(device).requires_grad_() for t in (cls, ctr, dist)]
    outputs = HeadOutputs(cls_logits=leaves[0], centerness=leaves[1], distances=leaves[2], anchors=anchors)
    return outputs, [Target(boxes.to(device), labels.to(device))]


def loss_fns(case: LossCase, device: torch.device) -> dict:
    """``{method: () -> None}``: one forward + backward of each loss on the case's outputs."""
    outputs, targets = synthetic_batch(case, device)
    dw = DWAssigner(case.num_classes)
    fcos = FCOSAssigner(case.num_classes)
    losses = {"dw": lambda: (dw(outputs, targets), dw.loss_weights),
              "loop": lambda: (dw_loss_per_gt_loop(outputs, targets, dw), dw.loss_weights),
              "fcos": lambda: (fcos(outputs, targets), fcos.loss_weights)}  # fmt: skip

    def step(loss_fn):
        def run():
            total = weighted_total(*loss_fn())
            total.backward()
            for leaf in (outputs.cls_logits, outputs.centerness, outputs.distances):
                leaf.grad = None

        return run

    return {name: step(fn) for name, fn in losses.items()}


def check_agreement(case: LossCase, device: torch.device, rtol: float = 1e-3) -> float:
    """Largest relative difference between dwlab's DW terms and the loop's; raises above ``rtol``."""
    outputs, targets = synthetic_batch(case, device)
    dw = DWAssigner(case.num_classes)
    with torch.no_grad():
        ours, ref = dw(outputs, targets), dw_loss_per_gt_loop(outputs, targets, dw)
    worst = max(abs(float(ours[k] - ref[k])) / max(abs(float(ref[k])), 1e-12) for k in ref)
    if worst > rtol:
        terms = ", ".join(f"{k}: {float(ours[k]):.6g} vs {float(ref[k]):.6g}" for k in ref)
        raise RuntimeError(f"DW loss and the per-GT loop disagree ({terms})")
    return worst


def _peak_task(case: LossCase, method: str, device_name: str, threads: int) -> int:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    fn = loss_fns(case, device)[method]
    return peak_extra_bytes(fn, device)


def peak_memory(case: LossCase, method: str, device: torch.device) -> int:
    """Peak extra bytes of one forward + backward (CPU: in a fresh process, see ``peak_extra_bytes``)."""
    if device.type == "cuda":
        return _peak_task(case, method, str(device), torch.get_num_threads())
    return in_fresh_process(_peak_task, case, method, "cpu", torch.get_num_threads())


def bench_losses(
    gt_counts: tuple[int, ...], *, height: int, width: int, device: torch.device, reps: int, warmup: int
) -> list[dict]:
    """One row per GT count: median ms and peak MiB of each method, pairs, anchors."""
    rows = []
    for num_gts in gt_counts:
        case = LossCase(num_gts, height, width)
        worst = check_agreement(case, device)
        times = interleaved_medians(loss_fns(case, device), reps=reps, warmup=warmup, device=device)
        outputs, targets = synthetic_batch(case, device)
        pairs = DWAssigner(case.num_classes).assign(outputs, targets).anchor.numel()
        row = {"gts": num_gts, "anchors": len(outputs.anchors), "pairs": pairs, "agree": worst}
        for method in METHODS:
            row[f"{method}_ms"] = times[method] * 1e3
            row[f"{method}_mib"] = peak_memory(case, method, device) / 2**20
        rows.append(row)
    return rows
