"""``python -m minference_flex``: the same as the ``minference-flex`` command."""
import sys

from minference_flex.tools.cli import main

sys.exit(main())
