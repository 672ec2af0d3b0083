"""``ppgen report``: table values against the JSON they come from, self-contained HTML, the
Markdown twin, figure helpers with known answers, and a headless-Chromium check of the page."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ppgen.cli import main
from ppgen.data import DataConfig
from ppgen.infer.svi import SVIConfig
from ppgen.models.vae import VAEConfig
from ppgen.report import ReportConfig, write_report
from ppgen.report_figures import curve_series, lerp_rows, steps_per_epoch
from ppgen.train import VAERunConfig, load_vae, train_vae


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A 2-D-latent VAE with evidence.json and metrics.json, a GAN, and a toy score run, all tiny."""
    from ppgen.gan import GANConfig, LoopConfig, train_gan
    from ppgen.infer.evidence_report import EvidenceConfig, evidence_report
    from ppgen.metrics import run_metrics
    from ppgen.score import ScoreConfig, train_score

    root = tmp_path_factory.mktemp("report-runs")
    vae_cfg = VAERunConfig(DataConfig("digits"), VAEConfig(latent_dim=2, hidden=(32,)),
                           SVIConfig(epochs=1, batch_size=128, seed=0))
    done = train_vae(vae_cfg, root / "vae", progress=False, download=False)
    ev_config = EvidenceConfig(samples=50, ais_steps=5, ais_chains=2, ais_limit=10, seed=0)
    evidence_report(done.vae.model, done.vae.guide, done.data.test, ev_config, root / "vae")
    m = run_metrics(root / "vae", n=300, n_val=100, cache_dir=root / "classifier", download=False)
    (root / "vae" / "metrics.json").write_text(json.dumps(m))
    train_gan(GANConfig(DataConfig("digits", "none"), latent_dim=4, hidden=(32,), loop=LoopConfig(epochs=2, batch_size=128)),
              root / "gan", progress=False, download=False)
    train_score(ScoreConfig(data="8gaussians", toy_n=512, hidden=(16, 16), n_sigmas=3, sigma_max=2.0, sigma_min=0.1,
                            epochs=2, batch_size=100, langevin_steps=5), root / "score", progress=False)
    page = write_report([root / "vae", root / "gan", root / "score"],
                        ReportConfig(out=str(root / "report"), khat_samples=30, khat_limit=40, interpolation_steps=5))
    rows = json.loads((root / "report" / "report.json").read_text())["rows"]
    return {"root": root, "page": page, "rows": {r["run"]: r for r in rows}}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_table_values_are_the_json_values(runs):
    root, rows = runs["root"], runs["rows"]
    ev = json.loads((root / "vae" / "evidence.json").read_text())
    m = json.loads((root / "vae" / "metrics.json").read_text())
    v = rows["vae"]
    assert (v["elbo"], v["is_log_px"], v["is_log_px_se"], v["khat_share"]) == (
        ev["elbo"], ev["log_px"], ev["log_px_stderr"], ev["khat_share_untrusted"])
    assert (v["frechet_distance"], v["parzen_log_likelihood"]) == (m["frechet_distance"], m["parzen_log_likelihood"])
    assert (v["ais_log_px"], v["ais_n"]) == (ev["ais"]["log_px"], 10)
    for name in ("vae", "gan", "score"):
        seconds = sum(r["seconds"] for r in _jsonl(root / name / "metrics.jsonl") if "seconds" in r)
        assert rows[name]["train_seconds"] == pytest.approx(seconds, rel=1e-12)
    assert v["estimator"] == "reparam" and rows["gan"]["estimator"] == "ns loss" and rows["score"]["family"] == "score"
    assert rows["gan"]["elbo"] is None and "is_log_px" not in rows["gan"]  # numbers a GAN does not have


def test_reported_evidence_sits_between_independent_estimates(runs):
    """The table's IS log p(x) (K = 50) against estimates from independent draws on the same test
    points: not above a K = 200 IS estimate (IS is biased low, less so with more samples) and not
    below the ELBO, within 4 Monte Carlo standard errors. (IS >= ELBO on the *same* samples is
    Jensen's inequality and would hold for any numbers.)"""
    from ppgen.infer.evidence import log_evidence

    root, v = runs["root"], runs["rows"]["vae"]
    vae, config, _ = load_vae(root / "vae")
    test = config.data.load(False).test
    big = log_evidence(vae.model, vae.guide, test, 200, seed=12345).summary()
    assert big["n"] == json.loads((root / "vae" / "evidence.json").read_text())["n"]
    se = (v["is_log_px_se"] ** 2 + big["log_px_stderr"] ** 2) ** 0.5
    assert v["is_log_px"] < big["log_px"] + 4 * se + 1e-3
    assert big["elbo"] < v["is_log_px"] + 4 * se + 0.05


def test_parameter_counts_match_the_built_networks(runs):
    from ppgen.gan import load_gan
    from ppgen.runs import Run

    root, rows = runs["root"], runs["rows"]
    vae, _, _ = load_vae(root / "vae")
    assert rows["vae"]["parameters"] == sum(p.numel() for p in vae.parameters())
    generator, config = load_gan(root / "gan")
    disc_state = Run(root / "gan", resume=True).load_checkpoint()["discriminator"]
    discriminator = sum(t.numel() for t in disc_state.values())
    assert rows["gan"]["parameters"] == sum(p.numel() for p in generator.parameters()) + discriminator
    # generator 4 -> 32 -> 64 (MLP decoder): weights and biases of its two layers
    g = (4 * 32 + 32) + (32 * 64 + 64)
    assert sum(p.numel() for p in generator.parameters()) == g


def test_html_is_self_contained_and_shows_the_table(runs):
    page = runs["page"]
    text = page.read_text()
    srcs = re.findall(r"src='([^']*)'", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in text and "<script" not in text
    figures = {p.read_bytes() for p in (page.parent / "figures").glob("*.png")}
    assert {base64.b64decode(s.split(",", 1)[1]) for s in srcs} == figures  # every figure, each once
    row = runs["rows"]["vae"]
    cells = re.search(r"<tr><td>vae</td>(.*?)</tr>", text).group(1)
    se = row["is_log_px_se"]
    se_text = f"{se:.2f}" if se >= 0.01 else f"{se:.1g}"
    assert f"{row['elbo']:.2f}" in cells and f"{row['is_log_px']:.2f} ± {se_text}" in cells
    assert f"{row['frechet_distance']:.2f}" in cells and f"{row['parameters']:,}" in cells
    names = {p.name for p in (page.parent / "figures").glob("*.png")}
    assert {"vae-latent.png", "vae-khat.png", "vae-interpolation.png", "gan-interpolation.png",
            "training-curves.png", "score-samples.png"} <= names


def test_markdown_twin_links_every_figure(runs):
    md = (runs["page"].parent / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    files = sorted(p.name for p in (runs["page"].parent / "figures").glob("*.png"))
    assert sorted(Path(link).name for link in links) == files
    assert md.count("\n| ") == 1 + 3  # header + one row per run


def test_curve_series_known_answer():
    records = [{"epoch": 1, "step": 10, "seconds": 1.5, "val_elbo": -100.0},
               {"epoch": 2, "step": 20, "seconds": 2.0, "val_elbo": -90.0}, {"epoch": 2, "test_elbo": -91.0}]
    assert curve_series("vae", records) == {"val_elbo": ([10, 20], [1.5, 3.5], [-100.0, -90.0])}
    gan = [{"epoch": 1, "loss_D": 1.0, "loss_G": 2.0, "g_steps": 7, "seconds": 1.0},
           {"epoch": 2, "loss_D": 0.5, "loss_G": 1.5, "g_steps": 7, "seconds": 1.0}]
    assert curve_series("gan", gan)["loss_G"] == ([7, 14], [1.0, 2.0], [2.0, 1.5])
    score = [{"epoch": 1, "val_loss": 3.0, "seconds": 0.5}, {"epoch": 2, "val_loss": 2.0, "seconds": 0.5}]
    assert curve_series("score", score, steps_per_epoch(1000, 128)) == {"val_loss": ([8, 16], [0.5, 1.0], [3.0, 2.0])}


def test_lerp_rows_endpoints_and_midpoint():
    a, b = torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([[4.0, -2.0], [1.0, 3.0]])
    z = lerp_rows(a, b, 5).reshape(2, 5, 2)
    assert torch.equal(z[:, 0], a) and torch.equal(z[:, -1], b)
    assert torch.allclose(z[:, 2], (a + b) / 2)
    with pytest.raises(ValueError, match="steps"):
        lerp_rows(a, b, 1)


def test_khat_plot_helper(tmp_path):
    from ppgen.infer.evidence import plot_khat_arviz

    path = plot_khat_arviz(torch.tensor([0.1, 0.6, 0.9, -float("inf")]), tmp_path / "k.png", num_samples=50)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="khat"):
        plot_khat_arviz(torch.tensor([float("nan")]), tmp_path / "nan.png", num_samples=50)


def test_cli_report_and_errors(runs, tmp_path, capsys):
    root = runs["root"]
    assert main(["report", str(root / "gan"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").exists() and "KiB" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="interpolation_steps"):
        ReportConfig(interpolation_steps=1)
    with pytest.raises(ValueError, match="distinct"):
        write_report([root / "gan", root / "gan"], ReportConfig(out=str(tmp_path / "r3")))


_CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => i.complete && i.naturalWidth);
  const rows = document.querySelectorAll('table#runs tbody tr').length;
  const pre = document.createElement('pre'); pre.id = 'check';
  pre.textContent = JSON.stringify({imgs, rows}); document.body.appendChild(pre);
});</script></body>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def test_page_renders_in_headless_chromium(runs, tmp_path):
    browser = _chromium()
    probe = tmp_path / "probe.html"
    probe.write_text(runs["page"].read_text().replace("</body>", _CHECK))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=60)
    found = re.search(r'<pre id="check">(.*?)</pre>', out.stdout)
    assert found, f"no check output; chromium said: {out.stderr[-500:]}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    n_figures = len(list((runs["page"].parent / "figures").glob("*.png")))
    assert len(result["imgs"]) == n_figures and all(w and w > 0 for w in result["imgs"])
    assert result["rows"] == 3
