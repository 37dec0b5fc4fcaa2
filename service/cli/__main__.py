import sys

from tally.service.cli import main

sys.exit(main())
