"""ppgen compare-families: equal budgets, the table's statistics and its refusals."""

import json
import math
import statistics

import pytest

from ppgen.compare_families import FAMILIES, METRICS, CompareConfig, summarize, table_lines

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_runs():
    """Two families, three seeds, two checkpoints: the table must come from the last ones."""
    runs = {}
    for f, family in enumerate(("vae", "gan")):
        runs[family] = [{"seed": s, "parameters": 100 + f, "checkpoints": [
            {"steps": 1, "train_seconds": 0.5, "wall_seconds": 0.6, "frechet_distance": 99.0, "precision": 0.0,
             "recall": 0.0, "label_tv": 1.0},
            {"steps": 10 * (s + 1), "train_seconds": 1.0 + 0.1 * s, "wall_seconds": 1.5, "frechet_distance": 3.0 + s + f,
             "precision": 0.5 + 0.1 * s, "recall": 0.25 * s, "label_tv": 0.1, **({"log_px": -20.0 - s} if f == 0 else {})},
        ]} for s in range(3)]
    return runs


def test_summary_is_the_mean_and_sd_of_the_seeds_last_values():
    table = summarize(_fake_runs())
    vae = table["vae"]
    assert vae["parameters"] == 100
    assert vae["steps"] == {"mean": 20.0, "sd": 10.0, "values": [10.0, 20.0, 30.0]}
    assert vae["precision"]["mean"] == pytest.approx(0.6) and vae["precision"]["sd"] == pytest.approx(0.1)
    assert vae["recall"]["values"] == [0.0, 0.25, 0.5] and vae["recall"]["sd"] == pytest.approx(0.25)
    assert vae["label_tv"] == {"mean": pytest.approx(0.1), "sd": 0.0, "values": [0.1, 0.1, 0.1]}
    assert vae["log_px"]["mean"] == -21.0 and vae["log_px"]["sd"] == 1.0
    assert "log_px" not in table["gan"] and table["gan"]["frechet_distance"]["mean"] == 5.0
    lines = table_lines({"table": table, "yardstick": {"frechet_distance": 1.0, "precision": 0.9, "recall": 0.8,
                                                       "label_tv": 0.05}})
    assert lines[0].count("|") == 4 + len(METRICS) + 1 and len(lines) == 2 + 2 + 1
    assert "| vae | 100 | 20 +- 10 | 1.1 +- 0.1 | 4.00 +- 1.00 | 0.600 +- 0.100 | 0.250 +- 0.250 | 0.100 +- 0.000 | " \
        "-21.00 +- 1.00 |" == lines[2]
    assert lines[3].endswith("| - |")  # the GAN has no log p(x)
    one = summarize({"vae": _fake_runs()["vae"][:1]})  # one seed: no sd, and the table says so
    assert math.isnan(one["vae"]["recall"]["sd"])
    assert "| 0.000 |" in table_lines({"table": one, "yardstick": {}})[2]


def test_config_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="seconds must be a positive finite budget"):
        CompareConfig(data="digits", seconds=0.0)
    with pytest.raises(ValueError, match="families must name some of vae, gan, score"):
        CompareConfig(data="digits", families=("vae", "flow"))
    with pytest.raises(ValueError, match="families must name"):
        CompareConfig(data="digits", families=("vae", "vae"))
    with pytest.raises(ValueError, match="data must be an image dataset"):
        CompareConfig(data="8gaussians")
    with pytest.raises(ValueError, match=r"k \(5\) must be below n_samples"):
        CompareConfig(data="digits", k=5, n_samples=5)
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        CompareConfig(data="digits", seeds=0)


@pytest.mark.slow
def test_tiny_digits_comparison_structure_budgets_and_relations(tmp_path, capsys):
    from ppgen.cli import main
    from ppgen.runs import Run

    out, seconds, checkpoints = tmp_path / "cmp", 2.0, 2
    args = ["compare-families", "--data", "digits", "--seconds", str(seconds), "--seeds", "2", "--checkpoints",
            str(checkpoints), "--n-samples", "150", "--evidence-samples", "10", "--evidence-limit", "50",
            "--cache-dir", str(tmp_path), "--out", str(out), "--no-download"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 families x 2 seeds x 2 s = 12 s of training" in printed.splitlines()[0]  # said up front
    result = json.loads((out / "compare.json").read_text())
    assert result["n_compared"] == 150 and set(result["table"]) == set(FAMILIES)
    for family, per_seed in result["runs"].items():
        assert [r["seed"] for r in per_seed] == [0, 1]
        row = result["table"][family]
        for key in ("steps", "train_seconds", "frechet_distance", "precision", "recall", "label_tv"):
            # every statistic is the mean / sd of the stored per-seed values, which are the last checkpoints'
            values = [r["checkpoints"][-1][key] for r in per_seed]
            assert row[key]["values"] == values
            assert row[key]["mean"] == pytest.approx(statistics.fmean(values))
            assert row[key]["sd"] == pytest.approx(statistics.stdev(values))
        assert ("log_px" in row) == (family == "vae")
        for run in per_seed:
            cps = run["checkpoints"]
            cfg = Run(run["path"], resume=True).load_config()
            batch = cfg["svi"]["batch_size"] if family == "vae" else cfg["loop"]["batch_size"] if family == "gan" \
                else cfg["batch_size"]
            for j, cp in enumerate(cps):
                # the loops drop the last partial batch: steps = epochs * (1257 // batch) on digits' train split
                assert cp["steps"] == cp["epochs"] * (1257 // batch) > 0
                assert 0 <= cp["precision"] <= 1 and 0 <= cp["recall"] <= 1 and 0 <= cp["label_tv"] <= 1
                assert cp["frechet_distance"] >= 0 and sum(cp["label_hist_samples"]) == pytest.approx(1)
            # budgets, by the schedule's rules whatever the machine's load: one epoch first, then a
            # segment only while over half an epoch is left, planned for at most the time left (half
            # of it while 3+ epochs are left) plus half an epoch of rounding
            assert all(a["train_seconds"] < b["train_seconds"] for a, b in zip(cps, cps[1:]))
            segs = run["segments"]
            assert segs[0]["epochs"] == 1 and segs[0]["spent_before"] == 0
            assert sum(g["epochs"] for g in segs) == cps[-1]["epochs"]
            for g in segs[1:]:
                left, est = g["target"] - g["spent_before"], g["per_epoch_estimate"]
                assert left > 0.5 * est
                assert g["epochs"] * est <= (left if left < 3 * est else 0.5 * left) + 0.5 * est + 1e-9
            # the end: never short by more than half an epoch; over by what a load change allows
            assert seconds - cps[-1]["train_seconds"] <= 0.5 * cps[-1]["epoch_seconds_max"]
            assert cps[-1]["train_seconds"] - seconds <= 0.5 * seconds + cps[-1]["epoch_seconds_max"]
            assert cps[-1]["wall_seconds"] >= cps[-1]["train_seconds"]
    # the validation split is the yardstick: real digits lie on the test split's manifold and cover
    # it (a 2-s score model can already come close to its Frechet distance, so that is no bound)
    assert result["yardstick"]["precision"] > 0.8 and result["yardstick"]["recall"] > 0.8
    assert result["yardstick"]["frechet_distance"] < max(r["frechet_distance"]["mean"] for r in result["table"].values())
    md = (out / "compare.md").read_text()
    assert md.startswith("## Comparing the three families") and "| validation vs test (yardstick) |" in md
    for png in ("curves", "label_balance", "samples-vae", "samples-gan", "samples-score"):
        assert (out / "figures" / f"{png}.png").stat().st_size > 1000
    # a second run into the same folder is refused unless asked for
    assert main(args) == 2
    assert "already holds a comparison" in capsys.readouterr().err

    # ppgen metrics on one of the runs: precision, recall and label TV in metrics.json, with the chart
    vae = result["runs"]["vae"][0]["path"]
    assert main(["metrics", vae, "--n", "270", "--n-val", "100", "--cache-dir", str(tmp_path), "--no-download"]) == 0
    m = json.loads((out / "runs" / "vae-seed0" / "metrics.json").read_text())
    hist_tv = 0.5 * sum(abs(a - b) for a, b in zip(m["label_hist_samples"], m["label_hist_data"]))
    assert m["label_tv"] == pytest.approx(hist_tv) and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["pr_k"] == 3 and m["precision_val_vs_test"] > 0.8  # real digits lie on the real manifold
    assert (out / "runs" / "vae-seed0" / "figures" / "label_balance.png").stat().st_size > 1000
    # ppgen report --compare: the comparison's table and figures become a section of the report
    assert main(["report", vae, "--compare", str(out), "--out", str(tmp_path / "report"), "--khat-samples", "0"]) == 0
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert "\n".join(table_lines(result)) in report_md
    assert f"| {m['precision']:.3f} | {m['recall']:.3f} | {m['label_tv']:.3f} |" in report_md  # the run's row
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<td>validation vs test (yardstick)</td>" in page and "figures/compare-" not in page  # figures embedded
    assert (tmp_path / "report" / "figures" / "compare-curves.png").exists()
