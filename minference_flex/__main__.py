"""``python -m minference_flex``: the same as the ``minference-flex`` command."""
import sys

from .cli import main

sys.exit(main())
