"""``dwlab report`` on a temp sqlite MLflow store filled through the real ``MlflowClient``.

The store holds what a sweep writes: one experiment per sweep, a parent run (dwlab.kind=sweep)
and FINISHED / FAILED / RUNNING trial runs with the sweep's tags, the flattened resolved config
as params and per-epoch metrics. Expected cells are computed by hand in the comments.
"""

from __future__ import annotations

import json
import math

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy.stats import kendalltau
from typer.testing import CliRunner

from dwlab import paper
from dwlab.cli import app
from dwlab.config import flatten, load_config
from dwlab.report import build_report, load
from dwlab.report.figures import DPI, FIGSIZE
from dwlab.report.tables import noise_threshold

EPOCHS = 3

# (table, point id, overrides, [(seed, status, final AP, AP50, AP75)])
TABLE2 = [
    # mean 32.0, sample std 2.00 on each metric; paper 41.5 / 59.8 / 45.0
    ("beta=5,mu=5", {"assigner.dw.beta": 5, "assigner.dw.mu": 5},
     [(0, "FINISHED", 0.30, 0.50, 0.28), (1, "FINISHED", 0.32, 0.52, 0.30), (2, "FINISHED", 0.34, 0.54, 0.32)]),
    # mean 35.5 ± 0.7 (n=2), one failed seed; paper 41.5 / 60.1 / 44.6
    ("beta=5,mu=6", {"assigner.dw.beta": 5, "assigner.dw.mu": 6},
     [(0, "FINISHED", 0.35, 0.55, 0.33), (1, "FINISHED", 0.36, 0.56, 0.34), (2, "FAILED", None, None, None)]),
    # 34.5 ± 0.7 (n=2): 1.0 below the best, threshold 2*sqrt((0.5+0.5)/2) = 1.41 -> noise
    ("beta=5,mu=7", {"assigner.dw.beta": 5, "assigner.dw.mu": 7},
     [(0, "FINISHED", 0.34, 0.54, 0.32), (1, "FINISHED", 0.35, 0.55, 0.33)]),
    # one seed: 33.0 (n=1)
    ("beta=4,mu=5", {"assigner.dw.beta": 4, "assigner.dw.mu": 5}, [(0, "FINISHED", 0.33, 0.53, 0.31)]),
    # no finished seed: a dash and the counts
    ("beta=5,mu=3", {"assigner.dw.beta": 5, "assigner.dw.mu": 3}, [(0, "RUNNING", None, None, None), (1, "FAILED", None, None, None)]),
    # not in the paper: 21.0 ± 1.4 (n=2)
    ("beta=2,mu=5", {"assigner.dw.beta": 2, "assigner.dw.mu": 5},
     [(0, "FINISHED", 0.20, 0.40, 0.18), (1, "FINISHED", 0.22, 0.42, 0.20)]),
]
TABLE3 = [
    ("gamma1=2,gamma2=2", {}, [(0, "FINISHED", 0.40, 0.60, 0.38), (1, "FINISHED", 0.42, 0.62, 0.40)]),
    ("gamma1=1,gamma2=1", {"assigner.dw.gamma1": 1, "assigner.dw.gamma2": 1},
     [(0, "FINISHED", 0.38, 0.58, 0.36), (1, "FINISHED", 0.38, 0.58, 0.36)]),
]
TABLE4 = [
    ("soft", {}, [(0, "FINISHED", 0.40, 0.60, 0.38)]),
    ("r=1.3", {"assigner.dw.bag": "threshold", "assigner.dw.bag_radius": 1.3}, [(0, "FINISHED", 0.37, 0.57, 0.35)]),
    ("k=9", {"assigner.dw.bag": "topk", "assigner.dw.bag_topk": 9}, [(0, "FINISHED", 0.36, 0.56, 0.34)]),
]
OFFICIAL = {"assigner.dw.variant": "official"}  # the released recipe: what the paper's Table 5 ran
TABLE5 = [
    ("full", OFFICIAL, [(0, "FINISHED", 0.40, 0.60, 0.38), (1, "FINISHED", 0.41, 0.61, 0.39)]),
    ("pos_only", {**OFFICIAL, "assigner.dw.neg_variant": "pos_only"}, [(0, "FINISHED", 0.30, 0.50, 0.28)]),
    # the paper's equations (the config's default variant): a row of its own, not pooled with "full"
    ("full-paper-eq", {}, [(0, "FINISHED", 0.36, 0.56, 0.34)]),
]
TABLE6 = [
    ("fcos", {"assigner.name": "fcos"}, [(0, "FINISHED", 0.30, 0.50, 0.28), (1, "FINISHED", 0.31, 0.51, 0.29)]),
    ("dw", OFFICIAL, [(0, "FINISHED", 0.40, 0.60, 0.38)]),
    ("dw+box_refine", {**OFFICIAL, "model.box_refine": True}, [(0, "FINISHED", 0.42, 0.62, 0.40)]),
    # DW on the paper's equations (the config's default variant): a row of its own, not DW's paper row
    ("dw-paper-eq", {}, [(0, "FINISHED", 0.37, 0.57, 0.35)]),
    # a method the config does not know yet: its params are written by hand below
    ("autoassign", {"assigner.name": "autoassign"}, [(0, "FAILED", None, None, None)]),
    # a method the paper does not list: named by its sweep label (POINT_LABELS), after the paper's rows
    ("simota", {"assigner.name": "simota"}, [(0, "FINISHED", 0.35, 0.55, 0.33)]),
    # DW on TOOD's T-head: a row of its own (not pooled with DW), named by its label
    ("dw+thead", {**OFFICIAL, "model.head": "tood"}, [(0, "FINISHED", 0.43, 0.63, 0.41)]),
    # TOOD with its T-head: with DW*, what the T-head claim reads where Table 7 never ran
    ("tood+thead", {"assigner.name": "tood", "model.head": "tood"}, [(0, "FINISHED", 0.41, 0.61, 0.39)]),
]
# it/s at seed 0, one more per seed: FCOS 250 and 200 ms, DW 250 ms, DW on the paper's equations 100 ms
STEP_RATES = {"fcos": 4.0, "dw": 4.0, "dw-paper-eq": 10.0}
POINT_LABELS = {"simota": "SimOTA", "fcos": "FCOS", "dw-paper-eq": "DW, paper equations", "dw+thead": "DW* (DW on the T-head)",
                "tood+thead": "TOOD (T-head)"}  # fmt: skip
R101, DCN = {"model.backbone": "resnet101"}, {"model.backbone_dcn": True, "model.head_dcn": True}
TABLE7 = [
    # 47.0 ± 1.4 on AP, AP50 65.0, AP75 51.0, APs (AP / 2) 23.5 ± 0.7; paper 46.2 / 64.8 / 50.0 / 27.1
    ("dw,r101", R101, [(0, "FINISHED", 0.46, 0.64, 0.50), (1, "FINISHED", 0.48, 0.66, 0.52)]),
    # 51.0 ± 1.4: 4.0 above DW, threshold 2 * 1.41 = 2.83
    ("dw+refine,r101", {**R101, "model.box_refine": True},
     [(0, "FINISHED", 0.50, 0.68, 0.54), (1, "FINISHED", 0.52, 0.70, 0.56)]),
    # 40.5 ± 0.7: 6.5 below DW, threshold 2 * sqrt((2 + 0.5) / 2) = 2.24
    ("fcos,r101", {**R101, "assigner.name": "fcos"}, [(0, "FINISHED", 0.40, 0.58, 0.42), (1, "FINISHED", 0.41, 0.59, 0.43)]),
    ("dw,r101-dcn", {**R101, **DCN}, [(0, "FINISHED", 0.50, 0.68, 0.54)]),
    # DCN in the backbone only: not the paper's ResNet-101-DCN detector, a block of its own
    ("dw,r101-backbone-dcn", {**R101, "model.backbone_dcn": True}, [(0, "FINISHED", 0.45, 0.63, 0.49)]),
    # DW on TOOD's T-head (an aux. module) at ResNet-101: a row of its own, not a rival in the R101 claim
    ("dw+thead,r101", {**R101, "model.head": "tood"}, [(0, "FINISHED", 0.55, 0.70, 0.60), (1, "FINISHED", 0.56, 0.71, 0.61)]),
]
SWEEPS = {"table2": TABLE2, "table3": TABLE3, "table4": TABLE4, "table5": TABLE5, "table6": TABLE6, "table7": TABLE7}


def _trial(client, exp_id, parent, table, point, overrides, seed, status, final, epochs=EPOCHS):
    known = {k: v for k, v in overrides.items() if k != "assigner.name" or v in ("fcos", "dw")}
    params = flatten(load_config("smoke", {**known, "train.epochs": epochs, "train.seed": seed}))
    params.update(overrides)
    tags = {
        "mlflow.parentRunId": parent, "dwlab.kind": "trial", "dwlab.sweep": table, "dwlab.table": table,
        "dwlab.sweep_file": f"experiments/{table}.yaml", "dwlab.point": point, "dwlab.point_overrides": json.dumps(overrides, sort_keys=True),
        "dwlab.seed": str(seed), "dwlab.config_hash": f"h{point}", "dwlab.git_commit": "0123456789abcdef0123",
        "dwlab.version": "0.1.0", "dwlab.host": "testhost", "dwlab.device": "cpu", "dwlab.scale": "smoke",
        "dwlab.dataset": "synth", "dwlab.backbone": "resnet18", "dwlab.world_size": "1",
        **({"dwlab.point_label": POINT_LABELS[point]} if point in POINT_LABELS else {}),
    }
    run_id = client.create_run(exp_id, tags=tags, run_name=f"{point}-s{seed}").info.run_id
    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    metrics = []
    for step in range(EPOCHS if status == "FINISHED" else 1):
        metrics += [Metric("loss", 1.0 - 0.2 * step, 1000 + step, step),
                    Metric("images_seen", 400.0 * (step + 1), 1000 + step, step)]
    if final is not None:
        ap, ap50, ap75 = final
        metrics += [Metric("AP", ap - 0.05, 1000, 0), Metric("AP", ap, 1002, EPOCHS - 1),
                    Metric("AP50", ap50, 1002, EPOCHS - 1), Metric("AP75", ap75, 1002, EPOCHS - 1),
                    Metric("APs", ap / 2, 1002, EPOCHS - 1)]
    if table == "table6" and point in STEP_RATES:  # the last epoch's step rate
        metrics.append(Metric("iters_per_s", STEP_RATES[point] + seed, 1002, EPOCHS - 1))
    client.log_batch(run_id, metrics=metrics)
    if status == "FAILED":
        client.set_tag(run_id, "dwlab.error", "RuntimeError: boom")
    if status != "RUNNING":
        client.set_terminated(run_id, status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlstore")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    for table, points in SWEEPS.items():
        exp_id = client.create_experiment(table, tags={"dwlab.table": table})
        parent = client.create_run(exp_id, tags={"dwlab.kind": "sweep", "dwlab.table": table}).info.run_id
        for point, overrides, seeds in points:
            for seed, status, ap, ap50, ap75 in seeds:
                final = None if ap is None else (ap, ap50, ap75)
                _trial(client, exp_id, parent, table, point, overrides, seed, status, final)
        client.set_terminated(parent, "FINISHED")
    client.create_experiment("empty")
    return uri


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return build_report(None, tmp_path_factory.mktemp("reports"), tracking_uri=store)


def _line(markdown: str, label: str, block: int = 0) -> list[str]:
    """The cells of the ``block``-th markdown line whose first cell is ``label``."""
    hits = [ln for ln in markdown.splitlines() if ln.startswith(f"| {label} |")]
    assert hits, f"no line '{label}' in\n{markdown}"
    return [c.strip() for c in hits[block].strip("|").split("|")]


def test_table2_cells_seed_aggregation_and_dash(report):
    md = (report.out / "table2.md").read_text()
    # label | AP ours | AP paper | dAP | AP50 ours | paper | d | AP75 ours | paper | d | gap | runs
    assert _line(md, "beta=5, mu=5") == [
        "beta=5, mu=5", "32.0 ± 2.0 (n=3)", "41.5", "-9.5", "52.0 ± 2.0 (n=3)", "59.8", "-7.8",
        "30.0 ± 2.0 (n=3)", "45.0", "-15.0", "-3.5 (sig.)", "3 finished",
    ]  # best is 35.5; threshold 2*sqrt((4 + 0.5)/2) = 3.0 < 3.5
    assert _line(md, "beta=5, mu=6") == [
        "beta=5, mu=6", "35.5 ± 0.7 (n=2)", "41.5", "-6.0", "55.5 ± 0.7 (n=2)", "60.1", "-4.6",
        "33.5 ± 0.7 (n=2)", "44.6", "-11.1", "best", "2 finished, 1 failed",
    ]
    assert _line(md, "beta=5, mu=7")[1:4] + _line(md, "beta=5, mu=7")[-2:] == [
        "34.5 ± 0.7 (n=2)", "41.4", "-6.9", "-1.0 (noise)", "2 finished"]
    assert _line(md, "beta=4, mu=5")[1:4] + [_line(md, "beta=4, mu=5")[-2]] == ["33.0 (n=1)", "41.3", "-8.3", "-2.5 (n<2)"]
    assert _line(md, "beta=5, mu=3")[:4] == ["beta=5, mu=3", "— (1 running, 1 failed)", "40.8", ""]
    assert _line(md, "beta=5, mu=3")[4] == "—" and _line(md, "beta=5, mu=3")[-1] == "1 running, 1 failed"
    assert _line(md, "beta=5, mu=4")[:3] == ["beta=5, mu=4", "not run", "41.2"]
    assert _line(md, "beta=2, mu=5")[:4] == ["beta=2, mu=5", "21.0 ± 1.4 (n=2)", "—", ""]
    # the cross: (5, 5) heads no block twice but sits in both the mu line and the beta line
    assert _line(md, "beta=5, mu=5", 1) == _line(md, "beta=5, mu=5", 0)
    assert md.index("**beta = 5, mu varied**") < md.index("**mu = 5, beta varied**")


def test_table2_header_and_agreement(report):
    md = (report.out / "table2.md").read_text()
    for text in ("**dataset**: synth", "**scale**: smoke", "**backbone**: resnet18",
                 "**schedule**: 3 epochs, batch 8 x 1 worker(s)", "**images seen**: 1,200 per run",
                 "**runs**: 13 (10 finished, 1 running, 2 failed)", "**dwlab**: 0.1.0, training revision 1 at commit 0123456789",
                 "**experiments**: table2", "Not a COCO reproduction"):
        assert text in md, text
    # tau over the 4 points with both: ours 32.0, 35.5, 34.5, 33.0 vs paper 41.5, 41.5, 41.4, 41.3
    tau = kendalltau([32.0, 35.5, 34.5, 33.0], [41.5, 41.5, 41.4, 41.3]).statistic
    assert f"{tau:.2f}" == "0.18"  # (3 concordant - 2 discordant) / sqrt(6 * 5)
    assert "Kendall tau, our AP ordering vs the paper's: 0.18 (p = " in md
    assert "over 4 points" in md
    assert ("Best here: beta=5, mu=6 at 35.5 AP. Paper's best: beta=5, mu=5 and beta=5, mu=6 at 41.5 AP; "
            "here beta=5, mu=5 is 32.0 (-3.5, significant).") in md
    assert "Within seed noise of the best here: beta=5, mu=7." in md
    assert "Cannot tell (fewer than 2 finished seeds): beta=4, mu=5." in md
    # beta=5,mu=7's gap 1.0 lies between 1 pooled std (0.71) and 2 (1.41): a third seed of it and
    # of the best decides; the command runs just those two points
    assert ("Undecided (gap between 1 and 2 pooled stds; one more seed here and at the best could move it "
            "either way): beta=5, mu=7: `dwlab sweep experiments/table2.yaml --seeds 3 --resume "
            "--point=beta=5,mu=6 --point=beta=5,mu=7`.") in md
    # beta=5,mu=5's gap 3.5 is past 2 pooled stds (3.0): decided, not listed
    assert md.count("Undecided") == 1


def test_csv_has_the_same_numbers(report):
    import pandas as pd

    frame = pd.read_csv(report.out / "table2.csv")
    row = frame[frame["label"] == "beta=5, mu=6"].iloc[0]
    assert (row["AP_mean"], row["AP_n"], row["AP_paper"], row["n_failed"]) == (35.5, 2, 41.5, 1)
    assert row["AP_std"] == pytest.approx(math.sqrt(0.5), abs=1e-4)
    assert row["AP_diff"] == pytest.approx(-6.0)
    missing = frame[frame["label"] == "beta=5, mu=4"].iloc[0]
    assert missing["n_runs"] == 0 and math.isnan(missing["AP_mean"])


def test_other_tables_layouts(report):
    t3 = (report.out / "table3.md").read_text()
    assert _line(t3, "gamma1=1, gamma2=1")[1:4] == ["38.0 ± 0.0 (n=2)", "41.0", "-3.0"]
    assert _line(t3, "gamma1=3, gamma2=2")[1:3] == ["not run", "41.3"]
    t4 = (report.out / "table4.md").read_text()
    assert _line(t4, "threshold r=1.3")[1:4] == ["37.0 (n=1)", "41.3", "-4.3"]
    assert _line(t4, "top-k k=9")[1:4] == ["36.0 (n=1)", "41.2", "-5.2"]
    assert _line(t4, "soft prior")[1:4] == ["40.0 (n=1)", "41.5", "-1.5"]
    t5 = (report.out / "table5.md").read_text()
    assert _line(t5, "full (DW)")[1:4] == ["40.5 ± 0.7 (n=2)", "41.5", "-1.0"]
    assert _line(t5, "pos_only")[1:4] == ["30.0 (n=1)", "39.5", "-9.5"]
    assert _line(t5, "full, paper equations")[1:3] == ["36.0 (n=1)", "—"]
    t6 = (report.out / "table6.md").read_text()
    assert _line(t6, "FCOS (ours: fcos)")[1:4] == ["30.5 ± 0.7 (n=2)", "38.6", "-8.1"]
    assert _line(t6, "DW + box refine (ours: dw+box_refine)")[1:4] == ["42.0 (n=1)", "42.2", "-0.2"]
    assert _line(t6, "AutoAssign(weight loss) (ours: autoassign)")[1:3] == ["— (1 failed)", "36.6"]
    # every row of the paper's Table 6 has a method here
    assert {k[0] for k in paper.TABLE6} <= set(paper.METHOD_TO_TABLE6.values())
    assert _line(t6, "FoveaBox (ours: foveabox)")[1:3] == ["not run", "36.4"]  # a method, no run
    rows = [ln for ln in t6.splitlines() if ln.startswith("| ") and "---" not in ln]
    # not in the paper: after its rows
    assert len(rows) == 1 + len(paper.TABLE6) + 4
    assert {r.split(" |")[0] for r in rows[-4:]} == {"| SimOTA", "| DW, paper equations", "| DW* (DW on the T-head)", "| TOOD (T-head)"}
    assert _line(t6, "SimOTA")[1:3] == ["35.0 (n=1)", "—"]
    assert _line(t6, "DW (ours: dw)")[1:4] == ["40.0 (n=1)", "41.5", "-1.5"]  # the FCOS-head runs alone
    assert _line(t6, "DW, paper equations")[1:3] == ["37.0 (n=1)", "—"]
    assert _line(t6, "DW* (DW on the T-head)")[1:3] == ["43.0 (n=1)", "—"]
    # Table 6 (and no grid table) has the step-time column: the seed mean of 250 and 200 ms
    assert "train ms/step" in t6 and "train ms/step" not in t5
    assert _line(t6, "FCOS (ours: fcos)")[11:13] == ["225", "2 finished"]
    assert _line(t6, "DW (ours: dw)")[11] == "250"
    assert _line(t6, "AutoAssign(weight loss) (ours: autoassign)")[11] == "—"  # no rate logged


def test_figures_are_pngs_of_the_expected_size(report):
    expected = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    names = [f"table{i}.png" for i in range(2, 7)] + [f"curves_table{i}.png" for i in range(2, 7)]
    for name in names:
        path = report.out / name
        assert path.stat().st_size > 1000, name
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == expected, name
    with Image.open(report.out / "fig3_pneg.png") as img:  # dwlab.plots.plot_pneg: 5 x 3.6 in at 150 dpi
        assert img.format == "PNG" and img.size == (750, 540)


def test_readme_indexes_every_table_and_figure(report):
    readme = (report.out / "README.md").read_text()
    for path in report.files:
        if path.name != "README.md" and path.suffix != ".csv":
            assert f"[{path.name}]({path.name})" in readme, path.name
    assert "best here beta=5, mu=6 at 35.5 AP" in readme
    assert "[table2.csv](table2.csv)" in readme


def test_noise_threshold():
    assert noise_threshold(2.0, 3, math.sqrt(0.5), 2, paper_scale=False) == pytest.approx(3.0)
    assert noise_threshold(0.01, 3, 0.01, 3, paper_scale=True) == pytest.approx(0.3)
    assert noise_threshold(math.nan, 1, 0.1, 3, paper_scale=False) is None
    assert noise_threshold(math.nan, 1, math.nan, 1, paper_scale=True) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_the_report(store, tmp_path):
    res = CliRunner().invoke(app, ["report", "--experiment", "table5", "--out", str(tmp_path), "--tracking-uri", store])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png") == ["README.md", "REPRODUCTION.md", "table5.csv", "table5.md"]
    assert "table5.md" in res.output


def test_cli_default_store_is_mlflow_tracking_uri(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    res = CliRunner().invoke(app, ["report", "-e", "table3", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "table3.md").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "table9"],
         "error: no experiment named 'table9' in {uri} (experiments there: Default, empty, table2, table3, "
         "table4, table5, table6, table7)"),
        (["--experiment", "empty"], "error: no dwlab trial runs in empty at {uri} (run 'dwlab sweep' first)"),
    ],
)
def test_cli_error_lines(store, tmp_path, args, message):
    res = CliRunner().invoke(app, ["report", *args, "--out", str(tmp_path), "--tracking-uri", store])
    assert res.exit_code == 2
    assert res.output.strip() == message.format(uri=store)


def test_cli_unreachable_store(tmp_path, monkeypatch):
    missing = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["report", "--tracking-uri", missing, "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: cannot reach the MLflow store {missing}: no such database file"
    assert not (tmp_path / "nowhere").exists()  # the report never creates a store
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    res = CliRunner().invoke(app, ["report", "--tracking-uri", "http://127.0.0.1:9", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.startswith("error: cannot reach the MLflow store http://127.0.0.1:9: ")
    assert len(res.output.strip().splitlines()) == 1


def test_fig5_is_drawn_from_the_best_runs_checkpoint(tmp_path, synth_root, report):
    """The best finished run's run directory holds a checkpoint: the report draws its Fig. 5;
    runs without one are listed under 'Not produced'."""
    from dwlab.config import validate
    from dwlab.runner import run_training
    from tests.conftest import tiny_config

    run_dir = tmp_path / "run"
    run_training(validate(tiny_config(synth_root, assigner={"name": "dw"}), "t"), run_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("table2", tags={"dwlab.table": "table2"})
    parent = client.create_run(exp_id, tags={"dwlab.kind": "sweep"}).info.run_id
    for seed, ap in ((0, 0.30), (1, 0.35)):
        _trial(client, exp_id, parent, "table2", "beta=5,mu=5", {}, seed, "FINISHED", (ap, 0.5, 0.3))
    best = client.search_runs([exp_id], "metrics.AP > 0.34")[0].info.run_id
    client.set_tag(best, "dwlab.run_dir", str(run_dir))
    rep = build_report(None, tmp_path / "out", tracking_uri=uri)
    with Image.open(tmp_path / "out" / "fig5_table2.png") as img:
        assert img.size[0] > 500 and img.size[1] > 500
    assert "fig5_table2.png" in (tmp_path / "out" / "README.md").read_text() and not rep.skipped
    assert any("Fig. 5 for table6: no checkpoint" in s for s in report.skipped)


def test_nothing_learnt_names_no_best_point_and_one_epoch_is_singular(tmp_path):
    """All AP 0 (a run too short to learn): no "best" point, no gaps called noise."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("table3", tags={"dwlab.table": "table3"})
    parent = client.create_run(exp_id, tags={"dwlab.kind": "sweep"}).info.run_id
    for point, overrides in (("gamma1=1,gamma2=1", {"assigner.dw.gamma1": 1.0, "assigner.dw.gamma2": 1.0}),
                             ("gamma1=2,gamma2=2", {})):  # fmt: skip
        for seed in (0, 1):
            _trial(client, exp_id, parent, "table3", point, overrides, seed, "FINISHED", (0.0, 0.0, 0.0), epochs=1)
    build_report(None, tmp_path / "out", tracking_uri=uri)
    md = (tmp_path / "out" / "table3.md").read_text()
    assert "- Best here: none (no finished run with AP above 0)." in md
    assert "best" not in _line(md, "gamma1=2, gamma2=2") and "(noise)" not in md
    assert "**schedule**: 1 epoch, batch" in md


def test_a_table_keeps_its_latest_training_revision_and_says_how_many_runs_it_left_out(tmp_path):
    """Table 3 has revision-1 runs (no tag) and revision-2 runs of the same points: the report
    pools the revision-2 runs only and notes the 2 left out; a table with revision-1 runs only
    keeps them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    for table in ("table3", "table5"):
        exp_id = client.create_experiment(table, tags={"dwlab.table": table})
        parent = client.create_run(exp_id, tags={"dwlab.kind": "sweep"}).info.run_id
        for seed in (0, 1):
            _trial(client, exp_id, parent, table, "a", {}, seed, "FINISHED", (0.30, 0.5, 0.3))
    exp_id = client.get_experiment_by_name("table3").experiment_id
    for seed in (0, 1):
        _trial(client, exp_id, parent, "table3", "a", {}, seed, "FINISHED", ((0.40, 0.41)[seed], 0.5, 0.3))
    latest = client.search_runs([exp_id], "attributes.start_time > 0", order_by=["attributes.start_time DESC"], max_results=2)
    for run in latest:
        client.set_tag(run.info.run_id, "dwlab.training_revision", "2")
    rows, left_out = load.latest_revision(load.read(uri, None)[2])
    assert left_out == {"table3": 2}
    assert sorted(rows.loc[rows["tags.dwlab.table"] == "table3", "metrics.AP"]) == [0.40, 0.41]
    assert len(rows[rows["tags.dwlab.table"] == "table5"]) == 2
    build_report(None, tmp_path / "out", tracking_uri=uri)
    md = (tmp_path / "out" / "table3.md").read_text()
    assert "**2 run(s) of an earlier training revision left out**" in md and "training revision 2 at commit" in md
    assert "training revision 1 at commit" in (tmp_path / "out" / "table5.md").read_text()

    table5 = client.get_experiment_by_name("table5").experiment_id
    _trial(client, table5, parent, "table5", "a", {}, 2, "RUNNING", (0.35, 0.5, 0.3))
    running = client.search_runs([table5], "attributes.status = 'RUNNING'")[0].info.run_id
    client.set_tag(running, "dwlab.training_revision", "2")  # a new revision's first run, still training
    rows, left_out = load.latest_revision(load.read(uri, None)[2])
    kept = rows[rows["tags.dwlab.table"] == "table5"]
    assert "table5" not in left_out and sorted(kept["status"]) == ["FINISHED", "FINISHED", "RUNNING"]


def test_claim_verdicts_follow_the_noise_rule():
    from dwlab.report.claims import FAILS, HOLDS, UNSURE, Stat, combine, compare

    best, close, far = Stat(40.0, 0.5, 2), Stat(39.5, 0.5, 2), Stat(38.0, 0.5, 2)  # threshold 1.0
    assert compare(best, close) == 0 and compare(best, far) == 1 and compare(far, best) == -1
    assert compare(best, Stat(30.0, math.nan, 1)) is None  # one seed: no noise estimate
    assert combine([1, 1], +1) == HOLDS and combine([1, 0], +1) == UNSURE and combine([1, -1], +1) == FAILS
    assert combine([None], +1) == UNSURE and combine([-1, -1], -1) == HOLDS


def test_reproduction_lists_every_claim_with_a_verdict(report):
    text = (report.out / "REPRODUCTION.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| Table") or line.startswith("| DW")}
    assert len(rows) == 14
    # (5, 5) at 32.0 ± 2.0 (n=3) against (5, 6) at 35.5 ± 0.7 (n=2): 3.5 below, threshold 3.0
    assert rows["Table 2: beta=5, mu=5 is best"][3] == "**does not hold**"
    assert rows["Table 5: the positive term alone is worst"][3] == "**cannot tell at this noise**"  # n=1
    assert rows["Table 4: DW is robust to the bag (all within 0.4 AP)"][3] == "**cannot tell at this noise**"
    # DW's row alone (the released recipe: 250 ms), not pooled with the paper-equation runs (100 ms)
    assert rows["DW costs no more per training step than FCOS"][2:] == [
        "DW 250 ms (n=1) vs FCOS 225 ± 35 ms (n=2) per step (x1.11), timed inside the trials", "**cannot tell at this noise**"]
    # DW (40.0) against the other methods of the FCOS detector: DW* (43.0, on the T-head) is not one
    assert rows["Table 6: DW is above every other method"][2] == "40.0 (n=1); next best SimOTA 35.0 (n=1)"
    assert "REPRODUCTION.md" in (report.out / "README.md").read_text()
    # DW 47.0 ± 1.4 against FCOS 40.5 ± 0.7 (DW + box refine has the aux. module: not compared)
    assert rows["Table 7: on ResNet-101, DW is above every method without an aux. module"][2:] == [
        "47.0 ± 1.4 (n=2); next best FCOS, ResNet-101 (ours: fcos) 40.5 ± 0.7 (n=2)", "**holds**"]
    # +4.0 beyond noise on ResNet-101, but the other backbones lack a refined point (or both)
    assert rows["Table 7: box refinement improves DW on every backbone"][1:] == [
        "+0.6, +0.2, +0.5", "ResNet-101: +4.0; ResNet-101-DCN: not run; ResNeXt-101-64x4d: not run", "**not run**"]
    # Table 7 has no TOOD point: Table 6's two T-head points instead, one seed each
    assert rows["Table 7: on TOOD's T-head, DW (DW*) is above TOOD"][1:] == [
        "49.8 vs 48.3: +1.5 (ResNeXt-101-64x4d)", "43.0 (n=1) vs 41.0 (n=1): +2.0 (Table 6's T-head points, resnet18)",
        "**cannot tell at this noise**"]  # fmt: skip


def test_table7_layout_six_metrics_per_backbone_block(report):
    """Table 7: a block per backbone in the paper's order (then ours), AP to APl each with the
    paper's number, aux. rows marked, the val / test-dev note and no "mixed" warning for the
    backbones the rows differ in."""
    md = (report.out / "table7.md").read_text()
    head = _line(md, "method, backbone (paper row)")
    assert head[1:4] == ["AP ours", "AP paper", "ΔAP"] and head[10:13] == ["APs ours", "APs paper", "ΔAPs"]
    assert head[16:] == ["APl ours", "APl paper", "ΔAPl", "gap to best here", "runs"]
    cells = _line(md, "DW, ResNet-101 (ours: dw)")
    assert cells[1:13] == ["47.0 ± 1.4 (n=2)", "46.2", "+0.8", "65.0 ± 1.4 (n=2)", "64.8", "+0.2",
                           "51.0 ± 1.4 (n=2)", "50.0", "+1.0", "23.5 ± 0.7 (n=2)", "27.1", "-3.6"]
    assert cells[13:16] == ["—", "49.4", ""]  # no APm logged
    assert _line(md, "DW + box refine, ResNet-101 [aux.] (ours: dw+box_refine)")[1:3] == ["51.0 ± 1.4 (n=2)", "46.8"]
    assert _line(md, "DW, ResNet-101-DCN (ours: dw)")[1:4] == ["50.0 (n=1)", "49.3", "+0.7"]
    assert _line(md, "GFLv2, ResNet-101 [aux.]")[1:3] == ["not run", "46.2"]
    assert _line(md, "DW, resnet101+dcn (ours: dw)")[1:3] == ["45.0 (n=1)", "—"]
    blocks = ["**ResNet-101**", "**ResNet-101-DCN**", "**ResNeXt-101-64x4d**", "**resnet101+dcn**"]
    assert [md.index(b) for b in blocks] == sorted(md.index(b) for b in blocks)
    assert "**paper**: COCO test-dev2017" in md and "Ours: COCO val2017; the paper's: test-dev2017." in md
    assert "Mixed settings" not in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln and "paper row" not in ln]
    assert len(rows) == len(paper.TABLE7) + 2  # the paper's rows, the backbone-only DCN point, DW* at R101
    assert _line(md, "DW*, ResNet-101 (ours: dw+thead)")[1:3] == ["55.5 ± 0.7 (n=2)", "—"]
    assert _line(md, "DW*, ResNeXt-101-64x4d [aux.] (ours: dw+thead)")[1:3] == ["not run", "49.8"]
    import pandas as pd

    frame = pd.read_csv(report.out / "table7.csv")
    row = frame[frame["label"] == "DW, ResNet-101 (ours: dw)"].iloc[0]
    assert (row["method"], row["backbone"], row["APs_paper"], row["APl_paper"]) == ("DW", "ResNet-101", 27.1, 58.5)



def test_tuned_columns_come_from_search_sweeps_final_runs_never_rows_the_latest_search_per_method(tmp_path):
    """Table 6 from a grid sweep plus two search sweeps' final runs (role-tagged): they fill the
    tuned columns of their method's row, are not pooled into its AP, and every search is listed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)

    def sweep(name, points):  # points: (point, overrides, extra tags, [(seed, AP)])
        exp_id = client.create_experiment(name, tags={"dwlab.table": "table6"})
        parent = client.create_run(exp_id, tags={"dwlab.kind": "sweep"}).info.run_id
        for point, overrides, tags, seeds in points:
            for seed, ap in seeds:
                _trial(client, exp_id, parent, "table6", point, overrides, seed, "FINISHED", (ap, ap, ap))
                run = client.search_runs([exp_id], f"tags.`dwlab.point` = '{point}' and tags.`dwlab.seed` = '{seed}'")[0]
                for k, v in tags.items():
                    client.set_tag(run.info.run_id, k, v)

    def role(role, search_run, chosen, desc):
        tags = {"dwlab.role": role, "dwlab.search": "fcos" if "fcos" in search_run else "dw", "dwlab.search_desc": desc}
        if role == "tuned":
            tags.update({"dwlab.search_run": search_run, "dwlab.chosen": json.dumps(chosen), "dwlab.tune_score": "0.33"})
        return tags

    fcos, dw = {"assigner.name": "fcos"}, {"assigner.name": "dw", "assigner.dw.variant": "official"}
    sweep("table6", [("fcos", fcos, {}, [(0, 0.30), (1, 0.31)]), ("dw", dw, {}, [(0, 0.40), (1, 0.42)])])
    early = {"assigner.fcos.center_radius": 2.0}
    sweep("tune-a", [("fcos.tuned", {**fcos, **early}, role("tuned", "fcosA", early, "tpe seed 0, 8 trials x 3 epochs"),
                      [(0, 0.34), (1, 0.36)])])  # fmt: skip
    late, beta = {"assigner.fcos.center_radius": 1.0}, {"assigner.dw.beta": 3.0}
    sweep("tune-b", [
        ("fcos.tuned", {**fcos, **late}, role("tuned", "fcosB", late, "random seed 1, 24 trial-epochs"), [(0, 0.31), (1, 0.31)]),
        ("dw.defaults", dw, role("defaults", "dwB", None, "tpe seed 0"), [(0, 0.40), (1, 0.41)]),
        ("dw.tuned", {**dw, **beta}, role("tuned", "dwB", beta, "tpe seed 0"), [(0, 0.41), (1, 0.42)]),
    ])  # fmt: skip
    build_report(None, tmp_path / "out", tracking_uri=uri)
    md = (tmp_path / "out" / "table6.md").read_text()
    assert "| tuned values | AP at defaults | AP tuned | tuned - defaults |" in md
    # fcos: the latest search (tune-b); no defaults runs there: the row's own AP (30.5 ± 0.7);
    # 31.0 - 30.5 = +0.5 < 2 * sqrt((0 + 0.5) / 2) = 1.0: noise
    cells = _line(md, "FCOS (ours: fcos)")
    assert cells[1] == "30.5 ± 0.7 (n=2)"  # its AP: the grid's runs only
    assert cells[-4:] == ["center_radius=1", "30.5 ± 0.7 (n=2)", "31.0 ± 0.0 (n=2)", "+0.5 (noise)"]
    # dw: its defaults runs (40.5 ± 0.7) against tuned 41.5 ± 0.7: +1.0 < 1.41, noise
    cells = _line(md, "DW (ours: dw)")
    assert cells[1] == "41.0 ± 1.4 (n=2)"
    assert cells[-4:] == ["beta=3", "40.5 ± 0.7 (n=2)", "41.5 ± 0.7 (n=2)", "+1.0 (noise)"]
    assert "fcos.tuned" not in md.split("**Tuned**")[0] and "dw.defaults" not in md.split("**Tuned**")[0]
    listed = [ln for ln in md.splitlines() if ln.startswith("- fcos in sweep") or ln.startswith("- dw in sweep")]
    assert listed == [
        "- fcos in sweep tune-a: tpe seed 0, 8 trials x 3 epochs; chose assigner.fcos.center_radius=2 (AP 33.0 on "
        "the tune split); on val tuned 35.0 ± 1.4 (n=2), at defaults the table's own runs.",
        "- fcos in sweep tune-b: random seed 1, 24 trial-epochs; chose assigner.fcos.center_radius=1 (AP 33.0 on the "
        "tune split); on val tuned 31.0 ± 0.0 (n=2), at defaults the table's own runs.",
        "- dw in sweep tune-b: tpe seed 0; chose assigner.dw.beta=3 (AP 33.0 on the tune split); on val tuned "
        "41.5 ± 0.7 (n=2), at defaults 40.5 ± 0.7 (n=2).",
    ]
    header = (tmp_path / "out" / "table6.csv").read_text().splitlines()[0]
    assert header.endswith("tuned_values,AP_defaults_mean,AP_defaults_std,AP_defaults_n,AP_tuned_mean,AP_tuned_std,"
                           "AP_tuned_n,tuned_gap,tuned_significant,tuned_search")  # fmt: skip
    assert "2 method(s) tuned by a search" in (tmp_path / "out" / "README.md").read_text()


def test_curves_of_up_to_30_points_never_share_a_style():
    from dwlab.report.figures import line_style

    styles = [tuple(sorted((k, str(v)) for k, v in line_style(i).items())) for i in range(30)]
    assert len(set(styles)) == 30
    assert line_style(0)["linestyle"] == "-" and line_style(10)["color"] == line_style(0)["color"]
