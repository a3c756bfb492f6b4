import sys

from facemae_dist.cli import main

sys.exit(main())
