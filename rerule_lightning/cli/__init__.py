"""Layer 5, the command line: ``rerule`` (:mod:`.commands`), the LightningCLI builder (:mod:`.lightning_cli`),
the preflight checks that run before any work (:mod:`.validation`, :mod:`.knobs`, :mod:`.paths`), one-line
config errors (:mod:`.errors`), signal endings (:mod:`.interrupts`) and the commands that assemble whole jobs
(:mod:`.prepare`, :mod:`.pipeline`, :mod:`.report`): the only part of the core that imports ``datamodules`` and
``callbacks``.

``from rerule_lightning.cli import main`` (the name before the layout in folders) still works: names of
:mod:`.commands` are forwarded lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from rerule_lightning import forwarded_names

# the names of the module this package was before the layout in folders, forwarded lazily
__getattr__ = forwarded_names(__name__, __file__, "rerule_lightning.cli.commands")
