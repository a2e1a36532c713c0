"""Adapters that run a search on training code you already have, each one a loop on the trial
protocol (:class:`lrsearch.Trial`):

- :mod:`lrsearch.integrations.transformers`: a Hugging Face ``Trainer``
  (``search(job, trainer_factory)``).
- :mod:`lrsearch.integrations.lightning`: a Lightning ``LightningModule`` and
  ``LightningDataModule`` (``search(job, module_factory, datamodule_factory)``).

Import the one you use (``from lrsearch.integrations import lightning as lrs_pl``); this package
imports neither framework.
"""
