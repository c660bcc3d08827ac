"""Starting or joining Ray, in one place.

Local runs start an embedded single-node Ray with every process bound to 127.0.0.1 and token
auth on (a fresh random token per run, known only to this process and its children), so
neither the network nor another user of the machine can submit work to it. `address` joins a
running cluster instead, after checking within seconds that something answers there. The
environment defaults below keep local runs quiet and offline.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys

LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps the node on 127.0.0.1 instead of eth0
    "RAY_AUTH_MODE": "token",  # with a random token per local run (see init_ray)
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "DS_ACCELERATOR": "cpu",  # local runs here have no GPU; clusters set their own
    "OMP_NUM_THREADS": "1",  # workers set their torch threads from scaling.cpus_per_worker
    "GLOO_SOCKET_IFNAME": "lo",  # gloo's pair sockets on loopback, not the machine's address
}
CLUSTER_OWN = ("DS_ACCELERATOR", "RAY_AUTH_MODE", "GLOO_SOCKET_IFNAME")  # a cluster sets its own
PASS_THROUGH = ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "WANDB_MODE", "WANDB_API_KEY")


class RayAddressError(ConnectionError):
    """Nothing answers at the Ray address given; the message names it."""


class NodesLost(RuntimeError):
    """Work on a cluster stopped because nodes died and did not come back in time; str() names
    them and what a re-run does."""


def set_environment(address: str | None = None) -> None:
    """The environment a local run (address None) or a cluster client needs, set before Ray is
    imported where possible: Ray reads some of it once, at import."""
    if address is None and "ray" in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        # Ray has already read the auth mode (disabled); a token now would lock this driver out
        # of its own cluster. Processes still bind to loopback (below); callers that import ray
        # themselves get token auth by setting RAY_AUTH_MODE=token before that import.
        os.environ["RAY_AUTH_MODE"] = "disabled"
    for k, v in LOCAL_ENV.items():
        if address is None or k not in CLUSTER_OWN:
            os.environ.setdefault(k, v)
    if address is None and os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this run's own: nobody else can connect
    if address is None and "ray" in sys.modules:
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when first imported (e.g. by
        # `from ray import serve`); read too early it binds gcs, raylet and agents to every
        # interface. Keep the constant in step with the environment.
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Join `address` (a running cluster; inside a Ray job, RAY_ADDRESS) or start a local Ray on
    127.0.0.1. Idempotent."""
    address = address or os.environ.get("RAY_ADDRESS")
    set_environment(address)
    import ray

    if ray.is_initialized():
        return ray
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
            object_store_memory=256 * 1024**2, configure_logging=False, log_to_driver=True,
            runtime_env={"env_vars": {k: os.environ[k] for k in (*LOCAL_ENV, *PASS_THROUGH) if k in os.environ},
                         "worker_process_setup_hook": "ms_ray.ray_env.setup_local_worker"},
        )
    import logging

    import ray.data

    # after the import, which configures Ray Data's loggers: no per-dataset INFO lines, and no
    # warning that the progress bars are off (they are, on purpose: RAY_DATA_DISABLE_PROGRESS_BARS)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    return ray


def alive_nodes() -> dict[str, str]:
    """{node id: address} of the nodes the joined cluster lists alive."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


ADDRESS_FIX = "start the cluster (`ray start --head`) or correct the address (address=, --address or RAY_ADDRESS)"


def check_reachable(address: str, timeout_s: float = 5.0, fix: str = ADDRESS_FIX, named: str | None = None) -> None:
    """Fail within `timeout_s` when nothing listens at a GCS address (`host:port`), naming it
    (as `named`, where the caller knows it by another name) and `fix`: Ray's own connect retries
    for minutes and ignores Ctrl-C meanwhile. The one bounded TCP probe of an address (ms-ray
    submit/jobs use it too). 'auto' and ray:// are Ray's."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"Ray address {address!r}: expected HOST:PORT of the head's GCS (e.g. 10.0.0.1:6379), "
                              "or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise RayAddressError(f"no Ray cluster answers at {named or address} ({reason} after at most "
                              f"{timeout_s:.0f} s): {fix}") from None


def interface_addresses() -> dict[str, str]:
    """{interface name: its IPv4 address} of this machine (Linux; {} elsewhere)."""
    import fcntl
    import socket
    import struct

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                found[name] = socket.inet_ntoa(packed[20:24])
            except OSError:  # no IPv4 address on it
                continue
    return found


def collective_interface(node_ip: str) -> tuple[str | None, str]:
    """(interface gloo should use on this node, how it was chosen or why none works):
    GLOO_SOCKET_IFNAME when set (and present here), else the interface holding `node_ip`."""
    interfaces = interface_addresses()
    chosen = os.environ.get("GLOO_SOCKET_IFNAME")
    if chosen:
        missing = [n for n in chosen.split(",") if n not in interfaces]
        if missing:
            return None, (f"GLOO_SOCKET_IFNAME={chosen} but this node has no interface {missing} "
                          f"(it has {interfaces}): unset it (ms-ray then uses the interface of the node's "
                          f"address) or set it to one of these")
        return chosen, f"GLOO_SOCKET_IFNAME={chosen} (set by the cluster)"
    holding = [n for n, ip in interfaces.items() if ip == node_ip]
    if not holding:
        return None, (f"no interface holds the node's address {node_ip} (interfaces: {interfaces}): "
                      "set GLOO_SOCKET_IFNAME on every node to the interface the nodes reach each other by")
    return holding[0], f"{holding[0]} holds the node's address {node_ip}"


def setup_local_worker() -> None:
    """Runs in every worker of a local Ray (`worker_process_setup_hook`).

    Local runs start no dashboard, so Ray Train's placement-group cleaner cannot reach the State
    API and would warn every second of a run (it has nothing to clean up here: the whole local
    Ray stops with the driver). And Ray Serve replicas open their inter-deployment gRPC server
    on every interface ('[::]:0', hard-coded in Ray 2.60): on a local Ray it binds to loopback."""
    import logging
    import threading
    import warnings

    import ray._common.tls_utils as tls_utils

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # With another local Ray on the machine the cleaner's thread dies on "Found multiple active
    # Ray instances" (a 26-line traceback); a local run has nothing for it to clean up.
    default_hook = threading.excepthook
    threading.excepthook = lambda args: (
        None if args.thread is not None and args.thread.name == "PlacementGroupCleanerMonitor" else default_hook(args))
    # Ray Train's DatasetManager sets a Ray Data option Ray itself deprecated: nothing to act on here
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated",
                            category=DeprecationWarning)
    add_port = tls_utils.add_port_to_grpc_server

    def add_port_on_loopback(server, address: str):
        return add_port(server, "127.0.0.1:" + address[len("[::]:"):] if address.startswith("[::]:") else address)

    tls_utils.add_port_to_grpc_server = add_port_on_loopback  # before ray.serve imports it into the replica
