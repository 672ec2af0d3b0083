"""Pyro model/guide pairs. Each model is one module; :data:`MODELS` maps a name to its class."""

from ppgen.models.linear_gaussian import LinearGaussian
from ppgen.models.vae import VAE

#: name -> model class; a new model is a new module plus one entry here.
MODELS = {"vae": VAE}

from ppgen.models.cvae import CVAE  # noqa: E402
from ppgen.models.m2 import M2  # noqa: E402

MODELS["cvae"] = CVAE
MODELS["m2"] = M2
MODELS["linear-gaussian"] = LinearGaussian

__all__ = ["MODELS", "VAE", "LinearGaussian", "CVAE", "M2"]
