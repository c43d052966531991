"""`python -m weights ...`: see weights/cli.py."""
from .cli import main

raise SystemExit(main())
