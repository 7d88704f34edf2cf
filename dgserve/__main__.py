import sys

from dgserve.cli import main

sys.exit(main())
