"""Wan2.1 (text-to-video and image-to-video, 1.3B and 14B) and Wan2.2 TI2V-5B: the family's specs and steps."""

from .. import register
from .spec import HINT, SPECS, WAN21_I2V, WAN21_T2V
from .ti2v import HINT as TI2V_HINT, WAN22_TI2V

for _spec in SPECS:
    register(_spec, HINT)
register(WAN22_TI2V, TI2V_HINT)

__all__ = ["WAN21_I2V", "WAN21_T2V", "WAN22_TI2V"]
