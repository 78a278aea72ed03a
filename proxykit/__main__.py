import sys

from proxykit.cli import main

sys.exit(main())
