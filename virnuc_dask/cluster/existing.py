"""The cluster a run uses: an existing scheduler (address or file), or a local one.

:func:`connect` yields a client: of ``dask scheduler`` with ``dask cuda worker`` or ``dask
worker`` (nothing is started or stopped), or of a local cluster it starts
(:mod:`~virnuc_dask.cluster.local`) and closes.

Decisions:

- Reaching an existing scheduler is bounded in time: the address and the scheduler file are
  checked first, then a probe asks the scheduler who it is with a deadline. Distributed's own
  connect waits without limit for the handshake of a peer that accepted the connection (a
  frozen scheduler, a port that is not Dask's), so the probe runs before any ``Client``.
- A scheduler without workers is waited for with a message at intervals, not in silence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distributed import Client

from virnuc_dask.cluster.hardware import ClusterInfo, local_plan
from virnuc_dask.cluster.local import attach, start_local_cluster
from virnuc_dask.errors import VirnucError, option

if TYPE_CHECKING:
    from virnuc_dask.cluster.plugin import EngineSettings
logger = logging.getLogger(__name__)


#: Seconds to reach an existing scheduler before giving up.
CONNECT_TIMEOUT = 20.0


#: Seconds to wait for the first worker of an existing scheduler.
WORKER_TIMEOUT = 120.0


# Seconds between the messages that say no worker has connected yet.
_WAIT_MESSAGE_INTERVAL = 10.0


@contextlib.contextmanager
def connect(
    *,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike | None = None,
    workers: int | None = None,
    host: str = "127.0.0.1",
    dashboard_port: int = 8787,
    local_directory: str | os.PathLike | None = None,
    timeout: float = CONNECT_TIMEOUT,
    worker_timeout: float = WORKER_TIMEOUT,
    engine: EngineSettings | None = None,
) -> Iterator[tuple[Client, ClusterInfo]]:
    """Yield a client and what is known of its cluster; close what this call started.

    Parameters
    ----------
    scheduler
        Address of an existing scheduler (``tcp://host:8786``).
    scheduler_file
        Scheduler file written by ``dask scheduler --scheduler-file``.
    workers
        Workers of a local cluster (see :func:`local_plan`).
    host
        Interface a local cluster and its dashboard listen on.
    dashboard_port
        Port of a local cluster's dashboard (another is taken if it is busy).
    local_directory
        Scratch space of a local cluster's workers; default: Dask's ``temporary-directory``.
    timeout
        Seconds to reach an existing scheduler and hear it answer.
    worker_timeout
        Seconds to wait for an existing scheduler's first worker; a message says so every
        10 s.
    engine
        The run's engine settings: a local cluster's workers start loading this model as
        they start (:func:`~virnuc_dask.cluster.plugin.early_load_preload`). Ignored for an existing
        scheduler, whose workers may serve other runs.

    Raises
    ------
    VirnucError
        Both or a bad ``scheduler``/``scheduler_file``, a scheduler that cannot be reached or
        does not answer within ``timeout``, or one without workers after ``worker_timeout``;
        the message names the address or file and the fix.
    """
    if scheduler and scheduler_file:
        raise VirnucError(
            f"give {option('scheduler', 'ADDRESS')} or {option('scheduler_file', 'FILE')}, not both"
        )
    if scheduler or scheduler_file:
        with _existing(scheduler, scheduler_file, timeout, worker_timeout) as client:
            count = len(client.scheduler_info(n_workers=-1)["workers"])
            yield client, ClusterInfo(count, 0, None, client.dashboard_link)
        return
    plan = local_plan(workers)
    cluster = start_local_cluster(
        plan,
        host=host,
        dashboard_port=dashboard_port,
        local_directory=local_directory,
        engine=engine,
    )
    with attach(cluster, plan) as started:
        yield started


@contextlib.contextmanager
def _existing(
    scheduler: str | None,
    scheduler_file: str | os.PathLike | None,
    timeout: float,
    worker_timeout: float,
) -> Iterator[Client]:
    if scheduler_file:
        address = _address_from_file(os.fspath(scheduler_file))
        where = f"{address} (from scheduler file {os.fspath(scheduler_file)})"
    else:
        address, where = scheduler, scheduler
    _check_address(address, where)
    _probe(address, where, timeout)
    try:
        client = Client(address=address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise VirnucError(
            f"cannot connect to the Dask scheduler at {where}: {error}; check that "
            "`dask scheduler` is running there"
        ) from None
    with client:
        _wait_for_workers(client, address, worker_timeout)
        yield client


def _address_from_file(path: str) -> str:
    fix = f"give the file that `dask scheduler --scheduler-file {path}` writes"
    if not os.path.isfile(path):
        raise VirnucError(f"scheduler file {path} does not exist; {fix}, once it is running")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise VirnucError(
            f"scheduler file {path} is not a Dask scheduler file ({error}); {fix}"
        ) from None
    address = data.get("address") if isinstance(data, dict) else None
    if not isinstance(address, str) or not address:
        raise VirnucError(f"scheduler file {path} holds no scheduler address; {fix}")
    return address


def _check_address(address: str, where: str) -> None:
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme in ("tcp", "tls", "ws", "wss", "ucx"):
            host, port = parse_host_port(location)
            if not host or not 0 < port < 65536:
                raise ValueError("no host, or a port out of range")
    except (ValueError, TypeError) as error:
        raise VirnucError(
            f"scheduler address {where!r} is not a Dask address ({error}); give it as "
            f"tcp://HOST:PORT, e.g. {option('scheduler', 'tcp://10.0.0.5:8786')}"
        ) from None


def _probe(address: str, where: str, timeout: float) -> None:
    """Ask the scheduler who it is, within ``timeout`` seconds, or raise a user error."""

    async def identity() -> dict:
        from distributed.comm import connect as comm_connect

        comm = await comm_connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True, "n_workers": 0})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> dict:
        # Distributed's connect() deliberately has no timeout on the handshake that follows
        # the TCP connection; this deadline covers connection, handshake and answer.
        return await asyncio.wait_for(identity(), timeout)

    # Distributed retries a refused connection until its timeout: nothing listening is
    # certain at once, so say so at once.
    if _refused(address):
        raise VirnucError(
            f"cannot reach the Dask scheduler at {where}: connection refused: nothing listens "
            "on that port; check the address, and that `dask scheduler` runs there"
        )
    # A private event loop in a thread: the caller may be inside one (Jupyter), and the
    # client's own loop must not inherit a half-open connection.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            reply = pool.submit(asyncio.run, bounded()).result()
        except (OSError, ValueError) as error:  # timeouts are OSErrors
            reason = _why_unreachable(address, timeout) or str(error)
            raise VirnucError(
                f"cannot reach the Dask scheduler at {where}: {reason}; check the address, "
                "and that `dask scheduler` runs there and is not stopped or overloaded"
            ) from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        raise VirnucError(
            f"{where} answers, but as {kind or 'something else'}, not a Dask scheduler; give "
            "the scheduler's address (`dask scheduler` prints it)"
        )


def _refused(address: str) -> bool:
    """Whether a TCP address refuses connections (nothing listens there)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return False
    try:
        with socket.create_connection(parse_host_port(location), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _why_unreachable(address: str, timeout: float) -> str | None:
    """After a failed probe, a plain TCP connection tells which way the address failed.

    Only then: a connection closed without a handshake is logged by the scheduler.
    """
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return None
    try:
        with socket.create_connection(parse_host_port(location), timeout=min(timeout, 5)):
            return (
                f"it accepts connections but did not answer within {timeout:g} s (a stopped "
                "or overloaded scheduler, or a port that is not a Dask scheduler's)"
            )
    except ConnectionRefusedError:
        return "connection refused: nothing listens on that port"
    except TimeoutError:
        return f"no connection within {min(timeout, 5):g} s (a host down or a firewall)"
    except OSError as error:
        return str(error)


def _wait_for_workers(client: Client, address: str, timeout: float) -> None:
    started = time.monotonic()
    # A first short wait: workers usually join within a second, and a message then would
    # only be noise.
    step = min(1.0, timeout)
    while True:
        try:
            client.wait_for_workers(1, timeout=step)
            return
        except TimeoutError:
            waited = time.monotonic() - started
        if waited >= timeout:
            raise VirnucError(
                f"the Dask scheduler at {address} has no workers after {timeout:g} s; start "
                f"some with `dask worker {address}` or `dask cuda worker {address}`"
            ) from None
        logger.warning(
            "waiting for workers at %s: none connected (%.0f s of %g s)", address, waited, timeout
        )
        step = min(_WAIT_MESSAGE_INTERVAL, timeout - waited)
