import sys

from efddpm.app.cli import main

sys.exit(main())
