"""Property tests: no input makes config parsing, data validation or the CLI's argument
handling fail with anything but a clear ValueError/TypeError (or argparse's exit 2)."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppgen.cli import build_parser, vae_run_config
from ppgen.data import check_binary
from ppgen.runs import config_from_dict
from ppgen.train import VAERunConfig

FIELDS = ["data", "model", "svi", "family", "name", "binarization", "data_dir", "split_seed", "latent_dim",
          "hidden", "arch", "estimator", "particles", "epochs", "batch_size", "lr", "seed", "device",
          "on_nonfinite", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["digits", "mnist", "reparam", "score", "mlp", "cpu"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)), max_leaves=12)
configs = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _keys(value) -> list[str]:
    """Every dict key at any depth of a parsed-JSON value."""
    if isinstance(value, dict):
        return [k for key, inner in value.items() for k in (key, *_keys(inner))]
    if isinstance(value, list):
        return [k for inner in value for k in _keys(inner)]
    return []


@SETTINGS
@given(configs)
def test_config_parsing_accepts_or_explains(data):
    try:
        cfg = config_from_dict(VAERunConfig, data)
    except (ValueError, TypeError) as err:
        # the message names the field it rejects (one of the keys given), not just "invalid"
        assert any(key in str(err) for key in _keys(data)), (str(err), data)
        return
    # anything accepted round-trips through JSON unchanged
    from ppgen.runs import config_to_dict

    assert config_from_dict(VAERunConfig, json.loads(json.dumps(config_to_dict(cfg)))) == cfg


@SETTINGS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=20))
def test_binary_check_is_exact(values):
    x = torch.tensor(values)
    ok = all(v in (0.0, 1.0) for v in values)
    if ok:
        check_binary(x)
    else:
        with pytest.raises(ValueError):
            check_binary(x)


TOKENS = ["train", "vae", "sample", "demo", "--data", "digits", "mnist", "--epochs", "--batch-size", "--lr",
          "--latent-dim", "--hidden", "--estimator", "reparam", "score", "--particles", "--device", "cpu",
          "cuda", "--out", "runs/x", "--resume", "--overwrite", "--binarize", "static", "--seed", "--arch",
          "conv", "0", "-1", "3", "1e-3", "nan", "inf", "400,20", "x", "", "--on-nonfinite", "skip"]


FLAG_VALUES = {"--data": ["digits", "mnist", "x"], "--epochs": ["0", "-1", "3", "nan"], "--batch-size": ["0", "3", "1e-3"],
               "--lr": ["0", "-1", "1e-3", "nan", "inf"], "--latent-dim": ["0", "3", "x"], "--hidden": ["400,20", "0", "", "x"],
               "--estimator": ["reparam", "score", "x", ""], "--particles": ["0", "3", "-1"], "--device": ["cpu", "x"],
               "--binarize": ["static", "x"], "--arch": ["conv", "mlp", "x"], "--on-nonfinite": ["skip", "x"],
               "--kl-warmup": ["-1", "3"], "--free-bits": ["-1", "nan", "0.5"], "--posterior": ["iaf", "fullcov"],
               "--gaussian-scale": ["0", "-1", "nan", "1e-3"], "--likelihood": ["gaussian", "cb"]}
train_flags = st.lists(st.sampled_from(sorted(FLAG_VALUES)).flatmap(
    lambda flag: st.tuples(st.just(flag), st.sampled_from(FLAG_VALUES[flag]))), max_size=5)


@SETTINGS
@given(train_flags)
def test_vae_training_flags_parse_or_name_the_flag(pairs):
    """`ppgen train vae --out ... FLAG VALUE ...`: argparse exits 2, or the config is built, or the
    ValueError/TypeError names the flag (or its config field) that it rejects."""
    argv = ["train", "vae", "--out", "runs/x", *(t for pair in pairs for t in pair)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 2
        return
    try:
        vae_run_config(args)
    except (ValueError, TypeError) as err:
        names = [f[2:] for f, _ in pairs] + [f[2:].replace("-", "_") for f, _ in pairs]
        assert any(name in str(err) for name in names), (str(err), argv)


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS), max_size=10))
def test_cli_arguments_parse_or_exit_2(argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code in (0, 2)
        return
    if getattr(args, "func", None) is not None and args.command == "train" and args.family == "vae":
        try:
            vae_run_config(args)
        except (ValueError, TypeError) as err:
            # the message names the flag (or its config field) it rejects
            flags = [t[2:] for t in argv if t.startswith("--")]
            assert any(name in str(err) for f in flags for name in (f, f.replace("-", "_"))), (str(err), argv)
