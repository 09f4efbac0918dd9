"""Wan2.1 (text-to-video and image-to-video, 1.3B and 14B): the family's spec and steps."""

from .. import register
from .spec import HINT, SPECS, WAN21_I2V, WAN21_T2V

for _spec in SPECS:
    register(_spec, HINT)

__all__ = ["WAN21_I2V", "WAN21_T2V"]
