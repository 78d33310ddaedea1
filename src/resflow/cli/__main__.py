"""``python -m resflow.cli``: the ``resflow`` command."""

import sys

from resflow.cli import main

sys.exit(main())
