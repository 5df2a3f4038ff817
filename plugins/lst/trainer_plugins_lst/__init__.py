"""Ladder Side-Tuning for the Hugging Face Trainer (trainer-plugins plugin ``lst``)."""

from .side import LadderSide, attach, detach, side_of
from .plugin import load

__all__ = ["LadderSide", "attach", "detach", "side_of", "load"]
