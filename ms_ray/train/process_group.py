"""How each training worker joins torch.distributed's process group, before our code runs.

Ray Train sets the group up before the worker function starts, hence backends that prepare each
worker first (`on_start`):

- Local runs keep it on loopback. Rank 0 of a process group hosts a TCPStore, and torch binds
  that server to every interface ('::') whatever address the ranks are told to use. On a local
  run (one node, 127.0.0.1) the store is instead handed a socket already bound to that address
  (TCPStore's `master_listen_fd`), so training opens no port beyond loopback.
- Cluster runs choose gloo's network interface. Unset, gloo advertises the address the host name
  resolves to, and where that is 127.0.0.1 (common) the ranks of other nodes cannot connect:
  set-up fails. Each worker sets GLOO_SOCKET_IFNAME to the interface that holds its Ray node's
  address, unless the cluster set it; a name set but missing on the node fails with that said.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from ..ray_env import collective_interface

_LISTENERS = []  # the bound sockets live as long as the worker's store


def bind_store_to_its_address() -> None:
    """Runs in each worker: rank 0's TCPStore listens only on the address it is given."""
    import importlib
    import socket

    from torch.distributed import TCPStore

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the attribute is a function

    create = rendezvous._create_c10d_store

    def create_bound(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0:
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        listener = socket.create_server((hostname, port), backlog=2048)
        _LISTENERS.append(listener)
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, master_listen_fd=listener.fileno(), use_libuv=use_libuv)

    rendezvous._create_c10d_store = create_bound


def use_node_interface() -> None:
    """Runs in each worker of a cluster run: gloo uses the interface of the Ray node's address."""
    import ray

    name, why = collective_interface(ray.util.get_node_ip_address())
    if name is None:
        raise RuntimeError(f"collective interface: {why}")
    os.environ["GLOO_SOCKET_IFNAME"] = name


class _PreparedTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        worker_group.execute(backend_config.prepare)
        super().on_start(worker_group, backend_config)


@dataclass
class PreparedTorchConfig(TorchConfig):
    """TorchConfig whose workers run `prepare` before the process group is set up:
    bind_store_to_its_address for a local run, use_node_interface on a cluster."""

    prepare: Callable[[], None] = bind_store_to_its_address

    @property
    def backend_cls(self):
        return _PreparedTorchBackend
