"""``python -m fedkd.cli``: the same as the ``fedkd`` command."""

import sys

from fedkd.cli.main import main

sys.exit(main())
