import sys

from zeroptim_cli.cli import main

sys.exit(main())
