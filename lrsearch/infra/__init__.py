"""Infrastructure: starting or joining Ray (``ray_runtime``), MLflow tracking (``tracking``), the
cluster files (``cluster``), job submission to a Ray cluster (``jobs``) and remote storage
(``storage``)."""
