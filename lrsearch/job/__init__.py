"""The job schema: what a job file (or dict) says, checked before anything starts.

``config`` is the :class:`~lrsearch.job.config.JobConfig` and its sections, ``task_config`` the
task section's kinds, ``space`` the search space's schema and its schedule parameters, ``extras``
which optional packages a job needs (looked up, not imported)."""
