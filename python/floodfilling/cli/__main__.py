"""``python -m floodfilling.cli``: the ``ffn`` command."""

from . import main

raise SystemExit(main())
