import sys

from relattn.cli import main

sys.exit(main())
