"""``python -m robustbench_lite``: the same command line as ``robustbench-lite``."""
import sys

from .cli import main

sys.exit(main())
