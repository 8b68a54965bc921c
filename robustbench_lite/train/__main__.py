"""``python -m robustbench_lite.train`` (the same as ``robustbench-lite train``)."""
import sys

from .command import main

sys.exit(main())
