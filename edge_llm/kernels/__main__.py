"""``python -m edge_llm.kernels [--force] [--strict]``: build the CPU kernels now (``make`` runs it)."""

import sys

from .build import main

sys.exit(main())
