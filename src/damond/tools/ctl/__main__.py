import sys

from damond.tools.ctl import main

sys.exit(main())
