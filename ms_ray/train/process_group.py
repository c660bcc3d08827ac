"""Local runs keep torch.distributed on loopback too.

Rank 0 of a process group hosts a TCPStore, and torch binds that server to every interface
('::') whatever address the ranks are told to use. On a local run (one node, 127.0.0.1) the
store is instead handed a socket already bound to that address (TCPStore's
`master_listen_fd`), so training opens no port beyond loopback. Ray Train sets the group up
before our worker function runs, hence a backend that patches each worker first.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

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


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        worker_group.execute(bind_store_to_its_address)
        super().on_start(worker_group, backend_config)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig for one-node local runs: the process group's store on the node's address."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
