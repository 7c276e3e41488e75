import sys

from batchseg.cli import main

sys.exit(main())
