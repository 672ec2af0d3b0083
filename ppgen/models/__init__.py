"""Pyro model/guide pairs. Each model is one module; :data:`MODELS` maps a name to its class."""

from ppgen.models.vae import VAE

#: name -> model class; a new model is a new module plus one entry here.
MODELS = {"vae": VAE}

__all__ = ["MODELS", "VAE"]
