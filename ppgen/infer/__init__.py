"""Inference: gradient estimators, the SVI loop, evidence and estimator variance."""
