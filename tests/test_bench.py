"""dwlab bench: the loop reference agrees with the DW assigner, the memory probe sees memory,
the report has every part and target, the sweep part runs, bad options are one line."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dwlab.assign import ASSIGNERS
from dwlab.assign.base import weighted_total
from dwlab.assign.dw import DWAssigner, DWParams
from dwlab.bench.loss import LossCase, check_agreement, loss_fns, synthetic_batch
from dwlab.bench.measure import in_fresh_process, interleaved_medians, peak_extra_bytes
from dwlab.bench.reference import dw_loss_per_gt_loop
from dwlab.bench.run import BenchOptions, run_bench
from dwlab.cli import app

CPU = torch.device("cpu")


@pytest.mark.parametrize("num_gts", [0, 1, 7, 40])
def test_loop_reference_matches_dw_terms_and_gradients(num_gts):
    case = LossCase(num_gts, height=192, width=256, num_classes=5, seed=num_gts)
    assert check_agreement(case, CPU, rtol=1e-5) <= 1e-5
    outputs, targets = synthetic_batch(case, CPU)
    dw = DWAssigner(case.num_classes)
    grads = []
    for fn in (lambda: dw(outputs, targets), lambda: dw_loss_per_gt_loop(outputs, targets, dw)):
        weighted_total(fn(), dw.loss_weights).backward()
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in (outputs.cls_logits, outputs.centerness, outputs.distances)])
        for t in (outputs.cls_logits, outputs.centerness, outputs.distances):
            t.grad = None
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_loop_reference_refuses_other_variants():
    outputs, targets = synthetic_batch(LossCase(3, 128, 128, 5), CPU)
    with pytest.raises(ValueError, match="paper variant"):
        dw_loss_per_gt_loop(outputs, targets, DWAssigner(5, DWParams(variant="official")))


def test_loss_fns_run_forward_and_backward_and_leave_no_grad():
    fns = loss_fns(LossCase(4, 128, 160, 5), CPU)
    assert set(fns) == {"dw", "loop", "fcos"}
    times = interleaved_medians(fns, reps=2, warmup=1, device=CPU)
    assert all(t > 0 for t in times.values())


def _allocate_64mib() -> None:
    x = torch.ones(16 * 2**20)  # 64 MiB of float32, touched
    assert float(x[-1]) == 1.0


def _peak_of_allocation() -> int:
    return peak_extra_bytes(_allocate_64mib, CPU)


def test_peak_memory_sees_a_64_mib_tensor_in_a_fresh_process():
    peak = in_fresh_process(_peak_of_allocation)
    assert 60 * 2**20 <= peak <= 120 * 2**20


def test_report_has_every_part_and_target(tmp_path):
    opts = BenchOptions(
        parts=("train", "loss", "eval", "data"), reps=1, warmup=0, gt_counts=(2, 6), loss_image=(128, 192),
        eval_images=6, load_batches=1, threads=2, set_=["train.batch_size=2", "model.fpn_channels=32",
                                                        "model.head_norm_groups=8", "model.head_convs=1"],
    )  # fmt: skip
    sections = []
    text = run_bench(opts, echo=sections.append)
    assert len(sections) == 4
    for heading in ("## Targets", "## Training step", "## DW weights + loss alone", "## Evaluation of a 6-image",
                    "## Data loading", "torchvision FCOS", "| cores |", "| load (1 min) at start |"):  # fmt: skip
        assert heading in text
    for target in ("DW / FCOS assigner <= 1.05", "dwlab DW / torchvision FCOS <= 1.0", "never slower than the per-GT loop",
                   "<= 1.5x the FCOS loss", "peak memory <= 200 MB at 6 GTs", "data loading >= 3x"):  # fmt: skip
        assert target in text
    assert "Sweep concurrency" not in text
    assert all(f"| dwlab {m} |" in text for m in ASSIGNERS if m not in ("dw", "fcos"))  # every method's step
    assert "| dwlab TOOD on its T-head |" in text and "| dwlab DW* (DW on the T-head) |" in text


def test_the_report_warns_when_the_machine_was_busy():
    from dwlab.bench.run import busy_note

    assert busy_note(0.3, 2) == []
    assert "**The machine was busy** (load 2.4 at the start, 2 cores)" in busy_note(2.4, 2)[0]


def test_train_part_at_the_mini_scale_times_its_trials_step():
    """At the learning scale the step is the trials' model and precision (ResNet-10, bf16
    autocast, the generated data's 6 classes), so that its rows read beside Table 6's in-trial
    step times; DW is timed as Table 6 trains it, as released and on the paper's equations."""
    opts = BenchOptions(scale="mini", parts=("train",), reps=1, warmup=0, threads=1, set_=["train.batch_size=2"])
    text = run_bench(opts, echo=lambda _: None)
    assert "# dwlab bench (mini scale, cpu)" in text
    assert "resnet10, FPN 64, 2-conv GN(16) head, 6 classes, batch 2 of 128x128" in text and "bf16 autocast" in text
    assert all(f"| dwlab {m} |" in text for m in ASSIGNERS if m not in ("dw", "fcos"))
    assert "| dwlab DW |" in text and "| dwlab DW, paper equations |" in text


def test_dw_steps_train_as_table_6s_dw_rows():
    from dwlab.bench.train_step import step_fns
    from dwlab.config import load_config

    cfg = load_config("smoke", ["train.batch_size=1", "model.fpn_channels=32", "model.head_norm_groups=8", "model.head_convs=1"])
    fns = step_fns(cfg, 6, CPU)
    variant = {name: fns[name].func.assigner.params.variant
               for name in ("dwlab DW", "dwlab DW + refine", "dwlab DW* (DW on the T-head)", "dwlab DW, paper equations")}
    assert variant == {"dwlab DW": "official", "dwlab DW + refine": "official", "dwlab DW* (DW on the T-head)": "official",
                       "dwlab DW, paper equations": "paper"}  # fmt: skip


def test_eval_and_data_parts_at_the_paper_scale_use_the_generated_datasets_names(tmp_path):
    """The paper preset names COCO 2017's files; the bench's generated dataset has its own. Tiny:
    64 px images, a ResNet-18 with a narrow FPN, 3 val images, 1 loaded batch of 2."""
    out = tmp_path / "bench.md"
    tiny = ["model.backbone=resnet18", "model.pretrained=false", "model.fpn_channels=32", "model.head_convs=1",
            "model.head_norm_groups=8", "data.min_size=64", "data.max_size=96", "data.num_workers=0",
            "train.batch_size=2", "eval.batch_size=2"]  # fmt: skip
    args = ["bench", "--scale", "paper", "--parts", "eval,data", "--eval-images", "3", "--load-batches", "1",
            "--reps", "1", "--warmup", "0", "--threads", "2", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args + [a for item in tiny for a in ("--set", item)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "# dwlab bench (paper scale, cpu)" in text and "## Evaluation of a 3-image val set" in text
    assert "over 2 generated images" in text  # the one measured batch of 2, after the warm-up one
    assert "| data loading >= 3x training throughput |" in text


def test_sweep_part_runs_both_ways_on_a_local_ray(tmp_path):
    from dwlab.bench.sweep import bench_sweep

    tiny = {"train.epochs": 1, "data.synth.n_train": 8, "data.synth.n_val": 4, "train.progress": False,
            "train.max_iters_per_epoch": 1, "train.batch_size": 4, "model.fpn_channels": 32,
            "model.head_norm_groups": 8, "model.head_convs": 1}  # fmt: skip
    s = bench_sweep(2, 2, tiny, device="cpu")
    assert s["trials"] == 2 and s["sequential_s"] > 0 and s["concurrent_s"] > 0 and s["ray_start_s"] > 0
    assert s["speedup"] == pytest.approx(s["sequential_s"] / s["concurrent_s"])
    assert s["devices"] == "cpu" and s["gpus_per_trial"] == 0  # as the trials' runs record it, like the single run


def test_the_sweep_parts_trials_get_a_share_of_the_gpus_on_cuda_only():
    from dwlab.bench.sweep import gpu_share

    assert gpu_share("cpu", 2) == 0.0
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert gpu_share("cuda", 2) == min(1.0, n / 2) and gpu_share("cuda", 3) * 3 <= n


@pytest.mark.parametrize(
    "args, message",
    [
        (["--parts", "train,nope"], "unknown part 'nope'"),
        (["--device", "tpu"], "expected cpu or cuda, got 'tpu'"),
        (["--scale", "huge"], "expected one of smoke, mini, paper, got 'huge'"),
    ],
)
def test_bad_options_are_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "bench.md"
    res = CliRunner().invoke(app, ["bench", "--out", str(out), *args])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.exists()


def test_throughput_part_compares_the_smoke_and_mini_steps_on_one_thread():
    opts = BenchOptions(parts=("throughput",), reps=1, warmup=0, threads=2,
                        set_=["train.batch_size=2", "model.fpn_channels=32", "model.head_norm_groups=8"])  # fmt: skip
    text = run_bench(opts, echo=lambda _: None)
    assert "## Training images / s per thread" in text
    assert "mini training images/s per thread >= 2x the smoke fp32 step" in text
    rows = [line for line in text.splitlines() if line.startswith(("| smoke |", "| mini |"))]
    assert len(rows) == 2 and "bf16 autocast, channels_last" in rows[1] and "| fp32 |" in rows[0]
    assert torch.get_num_threads() == 2  # the part's single thread does not leak
