import json

import pyro
import pytest
import torch

from ppgen.data import DataConfig
from ppgen.infer.svi import SVIConfig, evaluate_elbo
from ppgen.models.vae import VAEConfig
from ppgen.runs import CheckpointError, Run, RunExistsError, config_from_dict, config_to_dict, load_checkpoint
from ppgen.train import VAERunConfig, load_vae, train_vae


def _config(epochs, **svi):
    return VAERunConfig(
        data=DataConfig("digits"),
        model=VAEConfig(latent_dim=4, hidden=(32,)),
        svi=SVIConfig(epochs=epochs, batch_size=128, **svi),
    )


def test_checkpoint_round_trip_reproduces_validation_elbo(tmp_path):
    done = train_vae(_config(2), tmp_path / "run", progress=False)
    logged = done.result.history[-1]["val_elbo"]
    vae, config, shape = load_vae(tmp_path / "run")
    assert config == done.config and shape == (1, 8, 8)
    assert evaluate_elbo(vae.model, vae.guide, done.data.val) == pytest.approx(logged, abs=1e-4)
    for name in ("samples.png", "reconstructions.png"):
        assert (tmp_path / "run" / "figures" / name).stat().st_size > 1000


def test_resume_continues_metrics_and_matches_an_uninterrupted_run(tmp_path):
    whole = train_vae(_config(4), tmp_path / "whole", progress=False)
    train_vae(_config(2), tmp_path / "split", progress=False)
    resumed = train_vae(_config(4), tmp_path / "split", resume=True, progress=False)
    epochs = [r["epoch"] for r in resumed.run.metrics() if "val_elbo" in r]
    assert epochs == [1, 2, 3, 4]
    for a, b in zip(whole.result.history, resumed.result.history):
        # parameters, Adam state and RNG streams are restored: the same numbers (measured: bitwise)
        assert a["val_elbo"] == pytest.approx(b["val_elbo"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


def test_run_directory_guards(tmp_path):
    train_vae(_config(1), tmp_path / "r", progress=False)
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        train_vae(_config(1), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match=r"model.latent_dim: 4 -> 5"):
        cfg = VAERunConfig(DataConfig("digits"), VAEConfig(5, (32,)), SVIConfig(epochs=2))
        train_vae(cfg, tmp_path / "r", resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        Run(tmp_path / "empty", resume=True)
    again = train_vae(_config(1, seed=3), tmp_path / "r", overwrite=True, progress=False)
    assert len([r for r in again.run.metrics() if "val_elbo" in r]) == 1


def test_corrupt_checkpoint_is_detected_and_the_last_good_one_named(tmp_path):
    train_vae(_config(2), tmp_path / "r", progress=False)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a crash mid-copy, a full disk
    with pytest.raises(CheckpointError, match=r"SHA-256.*last good checkpoint is .*checkpoint.prev.pt"):
        load_vae(tmp_path / "r")
    assert load_checkpoint(tmp_path / "r" / "checkpoint.prev.pt")["epoch"] == 1


def test_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"params": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_config_json_is_type_checked(tmp_path):
    stored = json.loads(json.dumps(config_to_dict(_config(3))))  # as config.json holds it
    assert config_from_dict(VAERunConfig, stored) == _config(3)
    with pytest.raises(TypeError, match=r"svi.epochs must be int"):
        config_from_dict(VAERunConfig, {"svi": {"epochs": "10"}})
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict(VAERunConfig, {"svi": {"epoch": 10}})
    with pytest.raises(TypeError, match="model.hidden must be a list"):
        config_from_dict(VAERunConfig, {"model": {"hidden": 400}})


def test_sigint_mid_epoch_checkpoints_and_resume_is_exact(tmp_path, monkeypatch):
    import ppgen.train as train_mod
    from conftest import sigint_on_call
    from ppgen.runs import Interrupted

    whole = train_vae(_config(3), tmp_path / "whole", progress=False)
    # Interrupt during epoch 2 (9 batches per epoch; the first call registers parameters).
    monkeypatch.setattr(train_mod, "binarize", sigint_on_call(train_mod.binarize, 1 + 9 + 4))
    with pytest.raises(Interrupted, match=r"SIGINT: stopped at epoch 2, step 13.*--resume"):
        train_vae(_config(3), tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = train_vae(_config(3), tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(whole.result.history, resumed.result.history, strict=True):
        assert a["val_elbo"] == pytest.approx(b["val_elbo"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


def test_second_signal_stops_at_once():
    import os
    import signal

    from ppgen.runs import StopSignal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN in a background job
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


def test_nonfinite_loss_can_skip_the_update():
    from ppgen.data import load_dataset
    from ppgen.infer.svi import train_svi
    from ppgen.models.vae import VAE

    data = load_dataset("digits", "static")
    vae = VAE(data.dim, 4, (32,))
    state = {"batch": 0}

    def count_batches(x):
        state["batch"] += 1
        return x

    def model(x):  # a model whose log density is -inf on every third training batch
        vae.model(x)
        if state["batch"] % 3 == 0:
            pyro.factor("poison", torch.tensor(float("-inf")))

    res = train_svi(model, vae.guide, data.train, None, SVIConfig(epochs=1, batch_size=128, on_nonfinite="skip"),
                    transform=count_batches, progress=False)
    assert res.history[-1]["skipped_steps"] == 3 and res.history[-1]["step"] == 6
    assert all(torch.isfinite(p).all() for p in vae.parameters())  # no NaN reached the weights


def test_kept_epoch_checkpoints_reproduce_their_epochs(tmp_path):
    from ppgen.infer.svi import load_params
    from ppgen.infer.variance_runs import list_checkpoints

    done = train_vae(_config(3, keep_checkpoints=True), tmp_path / "r", progress=False)
    points = list_checkpoints(tmp_path / "r", "all")
    assert [p.epoch for p in points] == [0, 1, 2, 3]
    load_params(load_checkpoint(points[2].path)["params"])  # epoch 2's weights into the live VAE
    logged = done.result.history[1]["val_elbo"]
    assert evaluate_elbo(done.vae.model, done.vae.guide, done.data.val) == pytest.approx(logged, abs=1e-4)


def test_rng_state_keeps_the_cached_gaussians_through_a_checkpoint(tmp_path):
    """Python's ``random`` and NumPy keep the second normal of a Box-Muller pair; a restored state
    must continue with it (before the fix: random.gauss gave -0.680 instead of -1.397)."""
    import random

    import numpy as np

    from ppgen.runs import rng_state, seed_everything, set_rng_state

    seed_everything(0)
    random.gauss(0, 1), np.random.normal()  # both generators now hold a cached normal
    run = Run(tmp_path / "r")
    run.save_checkpoint({"rng": rng_state()})
    expected = (random.gauss(0, 1), np.random.normal(), random.random(), np.random.random(), torch.rand(()).item())
    random.gauss(0, 1), np.random.normal(), np.random.normal(), torch.rand(3)  # move every stream on
    set_rng_state(run.load_checkpoint()["rng"])  # through torch.load(weights_only=True)
    restored = (random.gauss(0, 1), np.random.normal(), random.random(), np.random.random(), torch.rand(()).item())
    assert restored == expected
    assert expected[0] == pytest.approx(-1.3965781047011498, abs=1e-12)


def test_skipped_steps_are_per_epoch_and_left_out_of_train_loss(monkeypatch):
    """Under on_nonfinite="skip", train_loss is the mean over the applied updates and
    skipped_steps counts that epoch's skips (before the fix: loss summed over 6 applied steps but
    divided by all 9 batches, and epoch 2 reported 6 skipped steps)."""
    import math

    import ppgen.infer.svi as svi_mod
    from ppgen.data import load_dataset
    from ppgen.infer.svi import train_svi
    from ppgen.models.vae import VAE

    data = load_dataset("digits", "static")
    vae = VAE(data.dim, 4, (32,))
    state = {"batch": 0}
    losses = []
    real_make = svi_mod.make_svi_step

    def recording_make(*args, **kwargs):
        step, optimizer = real_make(*args, **kwargs)

        def recorded(x):
            losses.append(step(x))
            return losses[-1]

        recorded.guide = step.guide
        return recorded, optimizer

    def count_batches(x):
        state["batch"] += 1
        return x

    def model(x):  # -inf on every third training batch (the first call registers parameters)
        vae.model(x)
        if state["batch"] % 3 == 0:
            pyro.factor("poison", torch.tensor(float("-inf")))

    monkeypatch.setattr(svi_mod, "make_svi_step", recording_make)
    res = train_svi(model, vae.guide, data.train, None, SVIConfig(epochs=2, batch_size=128, on_nonfinite="skip"),
                    transform=count_batches, progress=False)
    n, batches = len(data.train), len(data.train) // 128
    assert len(losses) == 2 * batches == 18
    for epoch, record in enumerate(res.history):
        mine = losses[epoch * batches : (epoch + 1) * batches]
        finite = [v for v in mine if math.isfinite(v)]
        assert record["skipped_steps"] == len(mine) - len(finite) == 3
        assert record["train_loss"] == pytest.approx(sum(v / n for v in finite) / len(finite), rel=1e-12)
    assert [r["step"] for r in res.history] == [6, 12]


def test_enum_run_interrupted_and_resumed_equals_the_uninterrupted_one_bitwise(tmp_path, monkeypatch):
    """TraceEnum_ELBO guesses its plate nesting by running model and guide on the training RNG at
    its first step; a resumed run did that again and drew other numbers (before the fix: the
    epoch-2 losses differed). The nesting is now computed off the RNG for every estimator."""
    import ppgen.train as train_mod
    from conftest import sigint_on_call
    from ppgen.runs import Interrupted

    whole = train_vae(_config(2, estimator="enum"), tmp_path / "whole", progress=False)
    monkeypatch.setattr(train_mod, "binarize", sigint_on_call(train_mod.binarize, 1 + 9 + 4))
    with pytest.raises(Interrupted, match=r"stopped at epoch 2, step 13"):
        train_vae(_config(2, estimator="enum"), tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = train_vae(_config(2, estimator="enum"), tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(whole.result.history, resumed.result.history, strict=True):
        assert (a["train_loss"], a["val_elbo"]) == (b["train_loss"], b["val_elbo"])  # bit for bit
    for name, value in whole.vae.state_dict().items():
        assert torch.equal(value, resumed.vae.state_dict()[name]), name
