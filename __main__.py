"""``python -m video_offload``: see ``offload/pipeline/cli.py``."""

import sys

from .offload.pipeline.cli import main

sys.exit(main())
