import json

import matplotlib.image as mpimg
import pytest

from ppgen.cli import build_parser, main


def _train(tmp_path, *extra):
    return main(["train", "vae", "--data", "digits", "--epochs", "1", "--latent-dim", "3", "--hidden", "16",
                 "--out", str(tmp_path / "run"), "--no-progress", *extra])


def test_train_then_sample_writes_a_png_grid(tmp_path, capsys):
    assert _train(tmp_path) == 0
    assert "validation ELBO" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: config["model"][k] for k in ("latent_dim", "hidden", "arch")} == {
        "latent_dim": 3, "hidden": [16], "arch": "mlp"}
    assert main(["sample", str(tmp_path / "run"), "--n", "16", "--out", str(tmp_path / "s.png")]) == 0
    img = mpimg.imread(tmp_path / "s.png")
    # 4x4 grid of 8x8 digits drawn at 6 px per pixel, 1 px (x6) borders: (4*9+1)*6 = 222
    assert img.shape[:2] == (222, 222)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--estimator", "magic"], "unknown estimator 'magic'; known estimators: reparam"),
        (["--batch-size", "5000"], "larger than the training set"),
        (["--device", "tpu"], "use 'cpu' or 'cuda'"),
    ],
)
def test_bad_training_input_gets_one_clear_line(tmp_path, capsys, args, message):
    assert _train(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppgen: error:") and message in err and "Traceback" not in err


def test_existing_run_and_missing_data(tmp_path, capsys):
    assert _train(tmp_path) == 0
    assert _train(tmp_path) == 2
    assert "--resume" in capsys.readouterr().err
    assert _train(tmp_path, "--resume", "--epochs", "2") == 0
    code = main(["train", "vae", "--data", "mnist", "--data-dir", str(tmp_path / "none"), "--no-download",
                 "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ppgen: data not found:") and "--data-dir" in err
    assert main(["sample", str(tmp_path / "nothing")]) == 2


def test_argument_errors_exit_with_usage(capsys):
    for argv in (["train", "vae", "--out", "x", "--epochs", "0"], ["train", "vae"], ["frobnicate"],
                 ["train", "vae", "--out", "x", "--hidden", "a,b"], ["train", "vae", "--out", "x", "--lr", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "usage: ppgen" in capsys.readouterr().err
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "sample", "demo"} <= set(sub)
