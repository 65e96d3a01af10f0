import sys

from natten_mlx.cli import main

sys.exit(main())
