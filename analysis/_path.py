"""Make ``fedmpi`` importable when a script runs from a checkout that is not installed."""

import os
import sys

try:
    import fedmpi  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
