"""ppgen: deep generative models on Pyro."""
