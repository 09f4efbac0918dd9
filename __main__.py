"""``python -m video_offload``: see ``offload/cli.py``."""

import sys

from .offload.cli import main

sys.exit(main())
