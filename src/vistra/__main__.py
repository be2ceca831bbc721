import sys

from vistra.cli import main

sys.exit(main())
