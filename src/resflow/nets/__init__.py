"""Networks used inside flow layers.

* contractive residual branches ``g`` for residual blocks (:mod:`resflow.nets.residual`);
* conditioners of coupling and autoregressive layers (MLPs, conv nets, MADE,
  :mod:`resflow.nets.conditioners`, :mod:`resflow.nets.made`);
* the families' own nets (RealNVP's ResNet, Glow's net, Flow++'s gated attention net,
  DenseFlow's densely connected nets, TarFlow's causal transformer).

A family imports the nets it builds from their modules.
"""

from __future__ import annotations

from resflow.nets.residual import residual_cnn, residual_mlp

__all__ = ["residual_cnn", "residual_mlp"]
