"""MEFT for the HF Trainer: reversible couplings around a pretrained model's layers (see README.md)."""

from .reversible import Coupling, run_couplings

__all__ = ["Coupling", "run_couplings"]
