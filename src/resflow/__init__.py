"""resflow: Residual Flows and friends for exact-likelihood density modelling."""

__version__ = "0.1.0"
