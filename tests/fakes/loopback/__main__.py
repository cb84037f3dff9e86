"""``python -m tests.fakes.loopback`` (from the repository root): see :mod:`tests.fakes.loopback`."""

import sys

from tests.fakes.loopback import main

sys.exit(main())
