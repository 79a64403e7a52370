"""Allow `python -m proxy` as an alias of the `pgveil` command."""

import sys

from proxy.cli import main

sys.exit(main())
