"""Starting or joining Ray, in one place.

Local runs start an embedded single-node Ray bound to 127.0.0.1; `address` joins a running
cluster instead. The environment defaults below keep local runs quiet and offline.
"""

from __future__ import annotations

import os

LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps the node on 127.0.0.1 instead of eth0
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "DS_ACCELERATOR": "cpu",  # local runs here have no GPU; clusters set their own
    "OMP_NUM_THREADS": "1",  # workers set their torch threads from scaling.cpus_per_worker
}
PASS_THROUGH = ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "WANDB_MODE", "WANDB_API_KEY")


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Join `address` (a running cluster; inside a Ray job, RAY_ADDRESS) or start a local Ray on
    127.0.0.1. Idempotent."""
    address = address or os.environ.get("RAY_ADDRESS")
    for k, v in LOCAL_ENV.items():
        if address is None or k not in ("DS_ACCELERATOR", "RAY_AUTH_MODE"):  # a cluster sets its own
            os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
            object_store_memory=256 * 1024**2, configure_logging=False, log_to_driver=True,
            runtime_env={"env_vars": {k: os.environ[k] for k in (*LOCAL_ENV, *PASS_THROUGH) if k in os.environ},
                         "worker_process_setup_hook": "ms_ray.ray_env.quiet_local_workers"},
        )
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-dataset INFO lines
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    return ray


def quiet_local_workers() -> None:
    """Runs in every worker of a local Ray. Local runs start no dashboard, so Ray Train's
    placement-group cleaner cannot reach the State API and would warn every second of a run
    (it has nothing to clean up here: the whole local Ray stops with the driver)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
