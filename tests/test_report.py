"""The report: run directories -> tables, sections and figures; deterministic; clear errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cifarlab.cli import main
from cifarlab.errors import CifarlabError
from cifarlab.report.build import (Run, build_report, find_runs, fmt_count, fmt_duration, group_caption,
                                   group_table, load_run, markdown_table, slug)
from cifarlab.report.curves import plot_run_curves, read_metrics
from cifarlab.report.section_modifications import families


def make_run(path: Path, model="resnet18", epochs=4, done=4, finished=True, diverged=False,
             params=11173962, flops=1112000000, test_error=4.89, val_accs=None, wall=123.0, **cfg):
    """A run directory in the Trainer's format (DESIGN.md), written by hand."""
    path.mkdir(parents=True)
    config = {"model": model, "dataset": "fashion", "epochs": epochs, "activation": None,
              "loss": "ce", "optimizer": "sgd", "lr": 0.1, **cfg}
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    val_accs = val_accs or [0.5 + 0.1 * i for i in range(done)]
    lines = ["epoch,lr,train_loss,train_acc,val_loss,val_acc,epoch_time_s,images_per_s"]
    for i in range(done):
        lines.append(f"{i + 1},0.1,{2.0 / (i + 1):.6g},{0.4 + 0.1 * i:.6g},{1.9 / (i + 1):.6g},{val_accs[i]:.6g},10,500")
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    (path / "log.txt").write_text(f"# {model}\n")
    if finished:
        best = max(range(done), key=lambda i: val_accs[i]) + 1
        summary = {"model": model, "dataset": "fashion", "params": params, "flops": flops,
                   "epochs": epochs, "epochs_completed": done, "best_epoch": best,
                   "best_val_acc": val_accs[best - 1], "test_acc": 1 - test_error / 100,
                   "test_error": test_error, "wall_time_s": wall, "diverged": diverged,
                   "finished": True, "device": "cpu", "train_images": 5000}
        (path / "summary.json").write_text(json.dumps(summary))
    plot_run_curves(path)  # as the Trainer does every few epochs
    return path


@pytest.fixture()
def logs(tmp_path):
    root = tmp_path / "log"
    make_run(root / "all-200ep" / "resnet18", val_accs=[0.5, 0.8, 0.7, 0.6])
    make_run(root / "all-200ep" / "dla", model="dla", params=16291386, test_error=5.02, wall=3725.0)
    make_run(root / "all-200ep" / "dpn26", model="dpn26", epochs=50, done=3, finished=False)
    make_run(root / "all-200ep" / "wrn28_10", model="wrn28_10", done=2, diverged=True, test_error=90.0)
    (root / "all-200ep" / "resnet18" / "checkpoints").mkdir()  # a run's sub-folders are not runs
    (root / "all-200ep" / "resnet18" / "checkpoints" / "config.yaml").write_text("model: x\n")
    return root


def table_row(readme: str, run: str) -> list[str]:
    line = next(l for l in readme.splitlines() if l.startswith(f"| {run} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def header(readme: str) -> list[str]:
    line = next(l for l in readme.splitlines() if l.startswith("| run |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_formats_are_fixed():
    assert fmt_count(11173962) == "11.17M"
    assert fmt_count(285162) == "0.29M"
    assert fmt_count(5322) == "5.3K"
    assert fmt_count(1112000000) == "1.11G"
    assert fmt_count(None) == "—"
    assert fmt_duration(12.34) == "12.3s"
    assert fmt_duration(125) == "2m05s"
    assert fmt_duration(3725) == "1h02m"
    # every unit boundary, floats as well as ints, and the values that are not counts
    assert fmt_count(10**12) == "1.00T" and fmt_count(2.5e12) == "2.50T"
    assert fmt_count(10**9) == "1.00G" and fmt_count(2.5e9) == "2.50G"
    assert fmt_count(10**6) == "1.00M" and fmt_count(1.5e6) == "1.50M"
    assert fmt_count(100000) == "0.10M" and fmt_count(135000) == "0.14M"
    assert fmt_count(99999) == "100.0K" and fmt_count(45678) == "45.7K"
    assert fmt_count(1000) == "1.0K" and fmt_count(1050) == "1.1K"
    assert fmt_count(999) == "999" and fmt_count(0) == "0" and fmt_count(12.0) == "12"
    assert fmt_count(5322, "B") == "5.3KB"
    assert fmt_count(float("nan")) == "—" and fmt_count(float("inf")) == "—" and fmt_count("7") == "—"
    assert fmt_duration(59.4) == "59.4s"
    assert fmt_duration(60) == "1m00s"
    assert fmt_duration(3599) == "59m59s"
    assert fmt_duration(3600) == "1h00m"
    assert fmt_duration(None) == "—" and fmt_duration(float("nan")) == "—" and fmt_duration("5") == "—"


def test_slug_and_markdown_table_are_fixed():
    assert slug("all-200ep") == "all-200ep"
    assert slug("ResNet18_v1.2") == "ResNet18_v1.2"
    assert slug("Xception net X") == "Xception-net-X"
    assert slug("/a b//c/") == "a-b-c"
    assert slug("///") == "runs" and slug("") == "runs"
    df = pd.DataFrame({"a|b": ["x|y", "1\n2"], "c": [1, 2]}, index=[7, 8])
    assert markdown_table(df) == ("| a\\|b | c |\n"
                                  "| --- | --- |\n"
                                  "| x\\|y | 1 |\n"
                                  "| 1 2 | 2 |")


def test_find_runs_groups_and_skips_sub_folders(logs):
    runs = find_runs(logs)
    assert [(r.group, r.name) for r in runs] == [("all-200ep", "dla"), ("all-200ep", "dpn26"),
                                                 ("all-200ep", "resnet18"), ("all-200ep", "wrn28_10")]


def test_table_numbers_markers_and_links(logs, tmp_path):
    out = tmp_path / "report"
    readme = build_report(logs, out).read_text()
    cols = header(readme)
    row = dict(zip(cols, table_row(readme, "resnet18")))
    assert row["architecture"] == "resnet18"
    assert row["#params"] == "11.17M"
    assert row["FLOPs"] == "1.11G"
    assert row["error (%)"] == "4.89"
    assert row["best epoch"] == "2"  # val acc 0.8 at epoch 2
    assert row["best val acc (%)"] == "80.00"
    assert row["epochs"] == "4/4"
    assert row["wall time"] == "2m03s"
    assert row["status"] == "finished"
    # links are relative to README.md and point at the run's own files
    assert row["log"] == "[log](../log/all-200ep/resnet18/log.txt)"
    assert row["curves"] == "[img](../log/all-200ep/resnet18/curves.png)"
    for cell in (row["log"], row["curves"]):
        target = re.fullmatch(r"\[\w+\]\((.+)\)", cell).group(1)
        assert (out / target).is_file()

    dla = dict(zip(cols, table_row(readme, "dla")))
    assert dla["#params"] == "16.29M" and dla["error (%)"] == "5.02" and dla["wall time"] == "1h02m"

    unfinished = dict(zip(cols, table_row(readme, "dpn26")))
    assert unfinished["status"] == "unfinished (3/50 ep)"
    assert unfinished["epochs"] == "3/50"
    assert unfinished["error (%)"] == "—" and unfinished["#params"] == "—"
    assert unfinished["best epoch"] == "3"  # from metrics.csv: val acc rises every epoch
    assert unfinished["wall time"] == "30.0s"  # summed epoch times

    diverged = dict(zip(cols, table_row(readme, "wrn28_10")))
    assert diverged["status"].startswith("**diverged**")
    assert "dataset: fashion" in readme and "hardware: cpu" in readme
    assert "(img/runs-all-200ep.png)" in readme and (out / "img/runs-all-200ep.png").is_file()


def test_build_is_deterministic(logs, tmp_path):
    out = tmp_path / "report"
    first = build_report(logs, out).read_bytes()
    images = {p.name: p.read_bytes() for p in (out / "img").glob("*.png")}
    second = build_report(logs, out).read_bytes()
    assert first == second
    assert images and images == {p.name: p.read_bytes() for p in (out / "img").glob("*.png")}


def test_removed_run_disappears_and_missing_curves_are_plotted(logs, tmp_path):
    out = tmp_path / "report"
    assert "| dla |" in build_report(logs, out).read_text()
    import shutil

    shutil.rmtree(logs / "all-200ep" / "dla")
    (logs / "all-200ep" / "resnet18" / "curves.png").unlink(missing_ok=True)
    readme = build_report(logs, out).read_text()
    assert "| dla |" not in readme
    row = dict(zip(header(readme), table_row(readme, "resnet18")))
    assert row["curves"] == "[img](img/curves-all-200ep-resnet18.png)"  # plotted from metrics.csv
    assert (out / "img" / "curves-all-200ep-resnet18.png").is_file()
    assert not (logs / "all-200ep" / "resnet18" / "curves.png").exists()  # the report writes no logs


def test_no_runs_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "group").mkdir(parents=True)
    with pytest.raises(CifarlabError, match="no run directories under"):
        build_report(tmp_path / "empty", tmp_path / "out")
    assert main(["report", "--log", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run directories under")


def test_report_cli_writes_readme(logs, tmp_path, capsys):
    assert main(["report", "--log", str(logs), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "README.md").is_file()


def test_curves_plot_is_byte_stable(logs):
    run = logs / "all-200ep" / "resnet18"
    a = plot_run_curves(run).read_bytes()
    b = plot_run_curves(run).read_bytes()
    assert a == b and a[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_run_curves(logs / "nowhere") is None
    m = read_metrics(run / "metrics.csv")
    assert m["val_acc"] == [0.5, 0.8, 0.7, 0.6]


def test_modification_families_and_section(tmp_path):
    root = tmp_path / "log"
    g = root / "modification-50ep"
    make_run(g / "baseline")
    make_run(g / "act-gelu", activation="gelu")
    make_run(g / "loss-mse", loss="mse")
    make_run(g / "opt-adam", optimizer="adam", lr=0.001)
    make_run(g / "odd", activation="elu", optimizer="adam")  # changes two settings: no family
    runs = find_runs(root)
    fam = families(runs)
    assert [(label, r.name) for label, r in fam["activation"]] == [("relu", "baseline"), ("gelu", "act-gelu")]
    assert [(label, r.name) for label, r in fam["loss"]] == [("ce", "baseline"), ("mse", "loss-mse")]
    assert [(label, r.name) for label, r in fam["optimizer"]] == [("sgd (lr 0.1)", "baseline"),
                                                                  ("adam (lr 0.001)", "opt-adam")]
    readme = build_report(root, tmp_path / "report").read_text()
    assert "## Modifications: activation, loss, optimizer" in readme
    for name in ("activation", "loss", "optimizer"):
        assert f"(img/modification-50ep-{name}.png)" in readme
        assert (tmp_path / "report" / "img" / f"modification-50ep-{name}.png").is_file()
    assert "not plotted): odd" in readme


def test_report_does_not_import_training_code():
    import subprocess
    import sys

    code = ("import sys, cifarlab.report.build, cifarlab.report.section_modifications; "
            "print(any(m.startswith('cifarlab.train') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_interpretation_section_picks_up_cam_and_insight_figures(logs, tmp_path):
    run = logs / "all-200ep" / "resnet18"
    png = (logs / "all-200ep" / "dla" / "log.txt").parent / "curves.png"
    plot_run_curves(png.parent)  # any PNG will do as a stand-in figure
    (run / "gradcam.png").write_bytes(png.read_bytes())
    (run / "gradcam.json").write_text(json.dumps({"layer": "layer3", "n": 8, "seed": 0, "target": "label",
                                                  "checkpoint": "best", "road_combined": {"gradcam": 0.1234}}))
    (run / "insight").mkdir()
    (run / "insight" / "confusion.png").write_bytes(png.read_bytes())
    out = tmp_path / "report"
    readme = build_report(logs, out).read_text()
    assert "## Network interpretation: Grad-CAM and insight" in readme
    assert "(img/gradcam-all-200ep-resnet18.png)" in readme and "layer `layer3`" in readme
    assert "| Grad-CAM | +0.1234 |" in readme
    assert "(img/confusion-all-200ep-resnet18.png)" in readme
    assert (out / "img" / "gradcam-all-200ep-resnet18.png").read_bytes() == png.read_bytes()


def test_unfinished_run_best_epoch_is_the_first_of_equal_validation_peaks(tmp_path):
    # no summary.json yet: the table falls back to metrics.csv, and a tie keeps the first epoch,
    # as the Trainer's best-checkpoint rule (strictly better only) does
    root = tmp_path / "log"
    make_run(root / "grid" / "tied", done=4, finished=False, val_accs=[0.5, 0.7, 0.6, 0.7])
    (run,) = find_runs(root)
    epoch, acc = run.best_epoch_and_acc
    assert epoch == 2 and acc == pytest.approx(70.0)
    readme = build_report(root, tmp_path / "report").read_text()
    row = dict(zip(header(readme), table_row(readme, "tied")))
    assert row["best epoch"] == "2" and row["best val acc (%)"] == "70.00"


def test_readme_layout_header_group_notes_and_sections(tmp_path, monkeypatch):
    # the header names the exact rebuild command; a group's NOTES.md (the exact training command)
    # follows its caption; sections follow the groups; blocks are separated by one blank line
    import cifarlab.report.build as build

    extra = (0, "Extra", lambda log_root, img_dir: "  body text \n\n")
    monkeypatch.setattr(build, "sections", lambda: [extra])
    root = tmp_path / "log"
    make_run(root / "g" / "r")
    (root / "g" / "NOTES.md").write_text("  Command: `python -m cifarlab train --model resnet18`\n\n")
    readme = build_report(root, tmp_path / "site" / "report").read_text()
    blocks = readme.split("\n\n")
    assert blocks[0] == "# Results"
    assert blocks[1] == ("Generated from the run directories under `../log/` by "
                         "`python -m cifarlab report --log ../log --out report` — do not edit by hand. "
                         "Error is the test error of the best-validation checkpoint; unfinished runs show "
                         "epochs done / planned.")
    assert blocks[2] == "## Runs: g"
    assert blocks[3] == "dataset: fashion · epochs planned: 4 · training images: 5,000 · hardware: cpu"
    assert blocks[4] == "Command: `python -m cifarlab train --model resnet18`"
    table = blocks[5].split("\n")
    assert len(table) == 3 and table[0].startswith("| run | architecture |")
    assert table[2].startswith("| r | resnet18 | 11.17M |")
    assert table[2].endswith("| [log](../../log/g/r/log.txt) | [img](../../log/g/r/curves.png) |")
    assert blocks[6] == "![validation accuracy, g](img/runs-g.png)"
    assert blocks[7:] == ["## Extra", "body text\n"]


def test_build_report_defaults_are_log_and_report(tmp_path, monkeypatch):
    import cifarlab.report.build as build

    monkeypatch.setattr(build, "sections", lambda: [])
    make_run(tmp_path / "log" / "g" / "r", done=1, finished=False)
    monkeypatch.chdir(tmp_path)
    readme = build_report()
    assert readme == Path("report") / "README.md" and readme.is_file()
    assert "`python -m cifarlab report --log log --out report`" in readme.read_text()


def test_caption_values_are_numbers_in_numeric_order_then_text():
    from cifarlab.report.build import _distinct

    # "9,000" before "10,000" (text order would put "10,000" first); text after every number
    assert _distinct(["cuda", 200, "10,000", None, 50, "9,000", "", 50]) == "50, 200, 9,000, 10,000, cuda"


def test_group_caption_labels_dataset_epochs_images_and_hardware():
    a = Run(Path("a"), "g", "a", config={"dataset": "cifar10", "epochs": 200, "train_subset": 1000},
            summary={"train_images": 50000, "hardware": "NVIDIA H200", "device": "cuda"})
    b = Run(Path("b"), "g", "b", config={"dataset": "cifar10", "epochs": 50, "train_subset": 5000},
            summary={"device": ""})  # no summary train_images yet: the config's subset
    assert group_caption([a, b]) == ("dataset: cifar10 · epochs planned: 50, 200 · "  # numeric order
                                     "training images: 5,000, 50,000 · hardware: NVIDIA H200")
    c = Run(Path("c"), "g", "c", summary={"device": "cpu"})  # before summary.json had "hardware"
    assert group_caption([c]).endswith(" · hardware: cpu")
    assert group_caption([Run(Path("d"), "g", "d")]) == ("dataset: — · epochs planned: — · "
                                                         "training images: — · hardware: —")


def test_group_table_of_a_run_with_only_a_config(tmp_path):
    # no summary, no metrics, no epochs, no files, and no links passed: dashes and '?', no crash
    run = Run(tmp_path / "r", "g", "r", config={"model": "lenet"})
    (row,) = group_table([run], tmp_path).to_dict("records")
    assert row == {"run": "r", "architecture": "lenet", "#params": "—", "FLOPs": "—", "error (%)": "—",
                   "best val acc (%)": "—", "best epoch": "—", "epochs": "0/?", "wall time": "—",
                   "status": "unfinished (0/? ep)", "log": "—", "curves": "—"}


def test_group_table_names_each_runs_machine_when_a_group_mixes_them(tmp_path):
    amd, intel = "AMD EPYC (AVX512-BF16), 1 thread on 1 of 2 CPUs", "Intel Xeon (AVX512-BF16), 1 thread on 1 of 2 CPUs"
    a = Run(tmp_path / "a", "g", "a", config={"model": "resnet20"}, summary={"hardware": amd})
    b = Run(tmp_path / "b", "g", "b", config={"model": "resnet20"}, summary={"hardware": intel})
    c = Run(tmp_path / "c", "g", "c", config={"model": "resnet20"})  # unfinished: no summary yet
    table = group_table([a, b, c], tmp_path)
    assert list(table.columns).index("hardware") == list(table.columns).index("wall time") + 1
    assert table["hardware"].tolist() == [amd, intel, "—"]
    assert "hardware" not in group_table([a, c], tmp_path).columns  # one machine: the caption says it
    assert group_caption([b, a, c]).endswith(f"hardware: {amd}, {intel}")


def test_run_groups_are_relative_to_the_log_root(tmp_path):
    root = tmp_path / "log"
    run_dir = make_run(root / "a" / "b" / "r1", done=1, finished=False)
    assert [(r.group, r.name) for r in find_runs(root)] == [("a/b", "r1")]
    assert [r.name for r in find_runs(root, group="a/b")] == ["r1"] and find_runs(root, group="b") == []
    assert [(r.group, r.name) for r in find_runs(root / "a" / "b")] == [("b", "r1")]  # the root names it
    assert [(r.group, r.name) for r in find_runs(run_dir)] == [("b", "r1")]  # the root is the run
    assert (load_run(run_dir).group, load_run(run_dir).name) == ("b", "r1")  # no root: the parent
    assert find_runs(tmp_path / "nowhere") == []


def test_foreign_or_broken_run_files_are_read_as_empty(tmp_path):
    run_dir = tmp_path / "log" / "g" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("[1, 2]")
    (run_dir / "config.yaml").write_text("- a\n- b\n")
    (run_dir / "metrics.csv").write_bytes(b"\xff\xfeepoch,val_acc\n")  # not UTF-8
    (run,) = find_runs(tmp_path / "log")
    assert (run.summary, run.config, run.metrics) == ({}, {}, {})
    assert run.status == "unfinished (0/? ep)" and run.best_epoch_and_acc == (None, None)
    (run_dir / "summary.json").write_text('{"finished": tru')  # half-written
    (run_dir / "config.yaml").write_text("model: [lenet\n")
    (run,) = find_runs(tmp_path / "log")
    assert (run.summary, run.config) == ({}, {})
