"""Wan2.1 (text-to-video and image-to-video, 1.3B and 14B), Wan2.2 A14B (two experts) and Wan2.2 TI2V-5B: the
family's specs and steps."""

from .. import register
from .spec import HINT, SPECS, WAN21_I2V, WAN21_T2V
from .ti2v import HINT as TI2V_HINT
from .ti2v import WAN22_TI2V
from .wan22 import HINT as WAN22_HINT
from .wan22 import SPECS as WAN22_SPECS
from .wan22 import WAN22_A14B_I2V, WAN22_A14B_T2V

for _spec in SPECS:
    register(_spec, HINT)
for _spec in WAN22_SPECS:  # after Wan2.1: a folder with a second expert is read by these
    register(_spec, WAN22_HINT)
register(WAN22_TI2V, TI2V_HINT)  # a WanPipeline folder with expand_timesteps and one DiT

__all__ = ["WAN21_I2V", "WAN21_T2V", "WAN22_A14B_I2V", "WAN22_A14B_T2V", "WAN22_TI2V"]
