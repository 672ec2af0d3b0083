"""Pyro model/guide pairs. Each model is one module; :data:`MODELS` maps a name to its class."""

from ppgen.models.linear_gaussian import LinearGaussian
from ppgen.models.vae import VAE

#: name -> model class; a new model is a new module plus one entry here.
MODELS = {"vae": VAE}
MODELS["linear-gaussian"] = LinearGaussian

__all__ = ["MODELS", "VAE", "LinearGaussian"]
