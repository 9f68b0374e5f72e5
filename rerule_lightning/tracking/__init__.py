"""Layer 4, tracking: the resilient MLflow logger and the config-saving callback (:mod:`.logger`), the rows and
plots of ``rerule report`` (:mod:`.report_rows`, :mod:`.plots`) and paired statistics over seeds (:mod:`.paired`).

Nothing below imports it; the command layer does."""

from __future__ import annotations

from rerule_lightning import forwarded_names

# the names of the module this package was before the layout in folders, forwarded lazily
__getattr__ = forwarded_names(__name__, __file__, "rerule_lightning.tracking.logger")
