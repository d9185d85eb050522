"""Differentially Private Diffusion Models: a reference pipeline.

Reproduces Dockhorn, Cao, Vahdat, Kreis, "Differentially Private Diffusion Models",
TMLR 2023 (arXiv 2210.09929). One concept per module; see ../README.md.
"""

__version__ = "0.1.0"
