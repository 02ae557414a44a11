"""Evaluation: the paper's NME (:mod:`.nme`)."""

from .nme import NMEResult, posed_mean_face, reconstruction_nme, surface_distances

__all__ = ["NMEResult", "posed_mean_face", "reconstruction_nme", "surface_distances"]
