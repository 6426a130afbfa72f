"""The hyper tests share the helpers of tests/optim (``_hyperste_helpers``, ``_optim_db``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
