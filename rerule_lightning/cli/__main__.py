"""``python -m rerule_lightning.cli``: the ``rerule`` command, as before the layout in folders."""

from __future__ import annotations

import sys

from rerule_lightning.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
