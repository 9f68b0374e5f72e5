"""``python -m rerule_lightning``: the ``rerule`` command (:func:`rerule_lightning.cli.commands.main`)."""

from __future__ import annotations

import sys

from rerule_lightning.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
