"""`python3 -m sseserver`: run the daemon. Everything lives in cli.main()."""

import sys

from .cli import main

sys.exit(main())
