"""``python -m comfy_mm_interleaved``: the command line (see ``cli.py``)."""

from .cli import main

raise SystemExit(main())
