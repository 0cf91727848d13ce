"""Training: the one engine (:mod:`~metarobust.training.engine`), its recipes
(:mod:`~metarobust.training.recipes`, one file each), the shared losses
(:mod:`~metarobust.training.objectives`), learning-rate schedules (:mod:`~metarobust.training.optim`)
and the data a run trains on (:mod:`~metarobust.training.data`). Import what you need from the
modules: this package imports nothing on its own."""
