"""Data-parallel GAN and score loops: ``ppgen train gan|score`` under two gloo processes gives the
single process's weights on the same global batches, and only rank 0 writes the run."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ppgen.cli import main
from ppgen.runs import Run, seed_everything

SCRIPT = textwrap.dedent(
    """
    import sys
    from ppgen.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)

# Learning rates high enough that training moves the weights far beyond the tolerance. (At lr 0.01
# the GAN's two players amplify float rounding to 2e-4 in two epochs, in one process or two.)
FLAGS = {
    "gan": ["--data", "digits", "--binarize", "dynamic", "--no-download", "--hidden", "16", "--latent-dim", "4",
            "--batch-size", "64", "--lr", "0.002"],
    "score": ["--data", "8gaussians", "--toy-n", "512", "--hidden", "16", "--batch-size", "64", "--lr", "0.01",
              "--sigma-max", "2", "--sigma-min", "0.1", "--n-sigmas", "3", "--langevin-steps", "2"],
}
NETS = {"gan": ("generator", "discriminator"), "score": ("net",)}


def _torchrun(tmp_path, argv: list) -> str:
    script = tmp_path / "ppgen_main.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *argv], capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _initial_weights(family: str, path) -> dict:
    """The networks as the run built them before training (the same seed)."""
    if family == "gan":
        from ppgen.gan import load_gan

        config = load_gan(path)[1]
        seed_everything(config.loop.seed)
        nets = config.build(64, (1, 8, 8))
    else:
        from ppgen.score import load_score

        config = load_score(path)[1]
        seed_everything(config.seed)
        nets = (config.build(),)
    return dict(zip(NETS[family], (net.state_dict() for net in nets)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gan", "score"])
def test_two_gloo_processes_match_one_process_and_resume(tmp_path, family, one_thread):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", family, *FLAGS[family], "--epochs", "2", "--no-progress", "--out", str(one)]) == 0
    stdout = _torchrun(tmp_path, ["train", family, *FLAGS[family], "--epochs", "1", "--no-progress", "--out", str(two)])
    assert stdout.count("run written to") == 1  # rank 1 reports nothing
    assert len(Run(two, resume=True).metrics()) == 1  # ... and logs nothing
    # Rank 1 also reads the checkpoint to resume: 1 + 1 epochs over two processes == 2 epochs over one.
    _torchrun(tmp_path, ["train", family, *FLAGS[family], "--epochs", "2", "--no-progress", "--out", str(two),
                         "--resume"])
    a, b = Run(one, resume=True), Run(two, resume=True)
    assert [r["epoch"] for r in b.metrics()] == [1, 2]
    for ra, rb in zip(a.metrics(), b.metrics()):
        for key in ra.keys() - {"seconds"}:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key
    ca, cb = a.load_checkpoint(), b.load_checkpoint()
    start = _initial_weights(family, one)
    for name in NETS[family]:
        assert ca[name].keys() == cb[name].keys()
        for k in ca[name]:
            assert torch.allclose(ca[name][k], cb[name][k], atol=1e-5), (name, k)
        moved = max((ca[name][k] - start[name][k]).abs().max().item() for k in ca[name])
        assert moved > 1e-2, name  # training moved the weights far beyond the tolerance
