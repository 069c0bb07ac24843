import sys

from serialmuxd.cli import main

sys.exit(main())
