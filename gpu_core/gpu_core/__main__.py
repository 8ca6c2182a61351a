import sys

from gpu_core.cli import main

sys.exit(main())
