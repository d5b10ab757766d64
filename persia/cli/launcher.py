"""``persia-launcher``: PERSIA's launcher subcommands, each role against the job's Ray cluster
(see docs/cluster.md, "PERSIA's separate processes").

PERSIA's Procfile runs unchanged once its ``nats_server: nats-server`` line is replaced by
``ray_head: persia-launcher ray-head``::

    ray_head: persia-launcher ray-head
    embedding_server: persia-launcher embedding-parameter-server \\
        --embedding-config config/embedding_config.yml --global-config config/global_config.yml
    embedding_worker: persia-launcher embedding-worker \\
        --embedding-config config/embedding_config.yml --global-config config/global_config.yml
    nn_worker: persia-launcher nn-worker train.py
    data_loader: persia-launcher data-loader data_loader.py --replica-index 0 --replica-size 1

The roles join ``RAY_ADDRESS`` when it is set, else the head ``ray-head`` started on this machine
(its address file in ``PERSIA_RAY_TEMP_DIR``), waiting for it up to ``PERSIA_RAY_TIMEOUT_S``.
The NN worker needs no configuration files: it takes them from the job's parameter servers.

Every role of one job shares ``PERSIA_JOB_NAME`` (default ``persia``; ``--job-name``) and the Ray
namespace ``PERSIA_RAY_NAMESPACE`` (default ``persia``). The embedding worker runs inside each NN
worker in persia (routing, de-duplication and pooling next to the lookups), so the
``embedding-worker`` line only checks its configuration files and waits to be stopped, keeping
the Procfile's shape.

Exit status: 0 on success (a server stopped by SIGTERM / SIGINT included), 2 for bad arguments
or configuration, 1 when a role fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from persia import _settings
from persia.backends.ray.naming import DEFAULT_NAMESPACE

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--job-name",
        default=None,
        help="name shared by the roles of one job (default $PERSIA_JOB_NAME, else 'persia')",
    )
    p.add_argument(
        "--embedding-config",
        default=None,
        metavar="FILE",
        help="embedding_config.yml (sets $PERSIA_EMBEDDING_CONFIG)",
    )
    p.add_argument(
        "--global-config",
        default=None,
        metavar="FILE",
        help="global_config.yml (sets $PERSIA_GLOBAL_CONFIG)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The launcher's argument parser."""
    parser = argparse.ArgumentParser(
        prog="persia-launcher",
        description="Start one PERSIA role against the job's Ray cluster: $RAY_ADDRESS, else "
        "the head that `persia-launcher ray-head` started on this machine.",
    )
    sub = parser.add_subparsers(dest="role", required=True)
    head = sub.add_parser(
        "ray-head",
        help="start the job's Ray head (or join one with --address); replaces PERSIA's "
        "nats_server line",
    )
    head.add_argument("--port", type=int, default=6379, help="the head's port (default 6379)")
    head.add_argument("--host", default=None, help="address of this node (default: Ray's choice)")
    head.add_argument("--num-cpus", type=int, default=None, help="default: Ray's count")
    head.add_argument(
        "--address", default=None, help="join this head as a node (default $RAY_ADDRESS)"
    )
    nn = sub.add_parser("nn-worker", help="run FILE as N NN-worker processes (one DDP group)")
    nn.add_argument(
        "file", metavar="FILE", nargs="?", default=None, help="default $PERSIA_NN_WORKER_ENTRY"
    )
    nn.add_argument("--nproc-per-node", type=int, default=1, metavar="N")
    nn.add_argument("--nnodes", type=int, default=1, metavar="M")
    nn.add_argument("--node-rank", type=int, default=0, metavar="R")
    nn.add_argument(
        "--master-addr", default="127.0.0.1", help="address of node 0 for the DDP rendezvous"
    )
    nn.add_argument("--master-port", type=int, default=None, help="default: a free port")
    _common(nn)
    dl = sub.add_parser("data-loader", help="run FILE as one data loader (DataCtx)")
    dl.add_argument(
        "file", metavar="FILE", nargs="?", default=None, help="default $PERSIA_DATALOADER_ENTRY"
    )
    dl.add_argument("--replica-index", type=int, default=0)
    dl.add_argument("--replica-size", type=int, default=1)
    _common(dl)
    ew = sub.add_parser("embedding-worker", help="(runs inside each NN worker; see --help)")
    ew.add_argument("--replica-index", type=int, default=0)
    ew.add_argument("--replica-size", type=int, default=1)
    ew.add_argument(
        "--port", type=int, default=None, help="PERSIA's listen port; nothing listens here"
    )
    _common(ew)
    ps = sub.add_parser("embedding-parameter-server", help="start one parameter-server shard")
    ps.add_argument("--replica-index", type=int, default=0)
    ps.add_argument("--replica-size", type=int, default=1)
    ps.add_argument("--num-cpus", type=float, default=0.25, help="Ray CPUs of the actor")
    ps.add_argument(
        "--port",
        type=int,
        default=None,
        help="port of the data channel (default: a free one, so servers can share a host)",
    )
    ps.add_argument(
        "--bind-host",
        default=None,
        help="address of the data channel (default: the node's Ray address)",
    )
    _common(ps)
    return parser


def _role_env(args: argparse.Namespace, ray: bool = True) -> dict[str, str]:
    """The environment of a role: the job's names, the config files, and (``ray``) the Ray
    cluster to join (``RAY_ADDRESS``, else the head of ``persia-launcher ray-head``)."""
    env = _settings.environment()
    if ray:
        from persia.backends.ray.launch import role_ray_env

        env.update(role_ray_env(_settings.ray_timeout_s()))
    env[_settings.PERSIA_JOB_NAME] = args.job_name or env.get(_settings.PERSIA_JOB_NAME) or "persia"
    env.setdefault(_settings.PERSIA_RAY_NAMESPACE, DEFAULT_NAMESPACE)
    env[_settings.PERSIA_BACKEND] = "ray"
    if args.embedding_config:
        env[_settings.PERSIA_EMBEDDING_CONFIG] = os.path.abspath(args.embedding_config)
    if args.global_config:
        env[_settings.PERSIA_GLOBAL_CONFIG] = os.path.abspath(args.global_config)
    return env


def _entry(args: argparse.Namespace, variable: str) -> str:
    """FILE, else the script named by ``variable`` (PERSIA's fallback)."""
    from persia.errors import ConfigError

    if args.file:
        return str(args.file)
    path = _settings.env_path(variable)
    if path is None:
        raise ConfigError(f"FILE: give the script to run, or set {variable}")
    return str(path)


def _check_replica(args: argparse.Namespace) -> None:
    from persia.errors import ConfigError

    if args.replica_size < 1 or not 0 <= args.replica_index < args.replica_size:
        raise ConfigError(
            f"--replica-index must be in [0, --replica-size), got {args.replica_index} of "
            f"{args.replica_size}"
        )


def _wait_for_stop() -> None:
    """Blocks until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_children(cmds: list[tuple[list[str], dict[str, str]]]) -> int:
    """Runs the commands; the first failure stops the others. Returns the exit status."""
    procs = [subprocess.Popen(cmd, env=env) for cmd, env in cmds]
    status = EXIT_OK
    try:
        pending = list(procs)
        while pending:
            for p in list(pending):
                try:
                    rc = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(p)
                if rc != 0:
                    status = EXIT_FAILED
                    for q in pending:
                        q.terminate()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return status


def nn_worker(args: argparse.Namespace) -> int:
    """``nn-worker FILE --nproc-per-node N``: N processes of FILE, ranks node_rank*N + i."""
    from persia.errors import ConfigError

    n, nodes = args.nproc_per_node, args.nnodes
    if n < 1 or nodes < 1 or not 0 <= args.node_rank < nodes:
        raise ConfigError(
            f"--nproc-per-node and --nnodes must be >= 1 and --node-rank in [0, --nnodes), got "
            f"{n}, {nodes}, {args.node_rank}"
        )
    script = _entry(args, _settings.PERSIA_NN_WORKER_ENTRY)
    world = n * nodes
    port = args.master_port or _free_port()
    cmds = []
    for i in range(n):
        env = _role_env(args)
        env.update(
            {
                _settings.RANK: str(args.node_rank * n + i),
                _settings.WORLD_SIZE: str(world),
                _settings.LOCAL_RANK: str(i),
                "MASTER_ADDR": args.master_addr,
                "MASTER_PORT": str(port),
            }
        )
        cmds.append(([sys.executable, script], env))
    return _run_children(cmds)


def data_loader(args: argparse.Namespace) -> int:
    """``data-loader FILE --replica-index i --replica-size n``: FILE with REPLICA_* set."""
    _check_replica(args)
    script = _entry(args, _settings.PERSIA_DATALOADER_ENTRY)
    env = _role_env(args)
    env[_settings.REPLICA_INDEX] = str(args.replica_index)
    env[_settings.REPLICA_SIZE] = str(args.replica_size)
    return _run_children([([sys.executable, script], env)])


def embedding_worker(args: argparse.Namespace) -> int:
    """Checks the configuration files, then waits: persia's embedding worker runs inside each
    NN worker, so this Procfile line holds no work of its own."""
    from persia.embedding.config import load_embedding_config, load_global_config

    _check_replica(args)
    env = _role_env(args, ray=False)
    load_embedding_config(env.get(_settings.PERSIA_EMBEDDING_CONFIG))
    load_global_config(env.get(_settings.PERSIA_GLOBAL_CONFIG))
    print(
        "persia-launcher embedding-worker: the embedding worker runs inside each NN worker; "
        "waiting to be stopped",
        flush=True,
    )
    _wait_for_stop()
    return EXIT_OK


def embedding_parameter_server(args: argparse.Namespace) -> int:
    """Starts parameter server ``--replica-index`` of the job and holds it until stopped. Under
    ``job_type: Infer`` (``global_config.yml``) it is an inference-mode server, as PERSIA's: its
    rows of ``infer_config.embedding_checkpoint``, read-only, following ``incremental_dir``
    when ``enable_incremental_update`` is on (:mod:`persia.backends.ray.serving`)."""
    from persia.backends.ray.launch import (
        connect,
        start_parameter_server,
        stop_parameter_server,
    )
    from persia.embedding.config import load_embedding_config, load_global_config, load_spec
    from persia.store.build import shard_options

    _check_replica(args)
    if args.port is not None and not 1 <= args.port <= 65535:
        from persia.errors import ConfigError

        raise ConfigError(f"--port must be in [1, 65535], got {args.port}")
    # the files first: a bad one fails at once, before waiting for the cluster
    env = _role_env(args, ray=False)
    emb = load_embedding_config(env.get(_settings.PERSIA_EMBEDDING_CONFIG))
    glob = load_global_config(env.get(_settings.PERSIA_GLOBAL_CONFIG))
    env = _role_env(args)
    names = (
        _settings.PERSIA_JOB_NAME,
        _settings.PERSIA_RAY_NAMESPACE,
        _settings.RAY_ADDRESS,
        _settings.RAY_AUTH_TOKEN_PATH,
        _settings.RAY_AUTH_MODE,
    )
    # a write: this process's own Ray calls read them (via persia._settings)
    os.environ.update({k: env[k] for k in names if k in env})
    spec = load_spec(emb, glob)
    # no optimizer yet: an SGD placeholder, replaced by the first NN worker's (configure)
    shard_kwargs = shard_options(spec, args.replica_size)
    serving = None
    if glob.common_config.job_type == "infer":  # PERSIA's inference mode: read-only, from
        from persia.backends.ray.serving import serving_options  # infer_config's checkpoint

        serving = serving_options(glob, spec)
    connect(env[_settings.RAY_ADDRESS])
    if serving is not None:
        from persia.backends.ray.serving import start_serving_parameter_server

        actor, name, endpoint = start_serving_parameter_server(
            args.replica_index,
            args.replica_size,
            serving,
            args.bind_host or "node",
            args.num_cpus,
            configs=(emb, glob),
            port=args.port,
        )
    else:
        actor, name, endpoint = start_parameter_server(
            args.replica_index,
            args.replica_size,
            shard_kwargs,
            args.bind_host or "node",
            args.num_cpus,
            configs=(emb, glob),
            port=args.port,
        )
    mode = " in inference mode" if serving is not None else ""
    print(f"persia-launcher: parameter server {name}{mode} serving on {endpoint}", flush=True)
    try:
        _wait_for_stop()
    finally:
        stop_parameter_server(actor)
    return EXIT_OK


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        # a port left in TIME_WAIT by a head that just stopped is free for Ray's own bind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def ray_head(args: argparse.Namespace) -> int:
    """Starts the job's Ray head (``ray start --head --block``) on ``--port`` and writes its
    address where the other roles look (:func:`persia.backends.ray.launch.head_address_file`);
    with ``--address`` (or ``RAY_ADDRESS``) joins that head as one more node instead. Holds it
    until SIGTERM / SIGINT, then stops it (and removes the address file)."""
    from persia.backends.ray.launch import (
        head_address_file,
        ray_head_command,
        started_head_address,
    )
    from persia.errors import BackendError, ConfigError

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [1, 65535], got {args.port}")
    if args.num_cpus is not None and args.num_cpus < 0:
        raise ConfigError(f"--num-cpus must be >= 0, got {args.num_cpus}")
    join = args.address or _settings.ray_address()
    if not join and _port_taken(args.port):
        raise BackendError(
            f"port {args.port} is in use: another Ray head? Join it with --address HOST:"
            f"{args.port}, or choose --port"
        )
    address_file = head_address_file()
    if not join:  # Ray's note of a head started before in this folder is stale now
        (address_file.parent / "ray_current_cluster").unlink(missing_ok=True)
    ray_exe = str(Path(sys.executable).with_name("ray"))
    cmd, env = ray_head_command(ray_exe, args.port, args.host, args.num_cpus, join)
    proc = subprocess.Popen(cmd, env=env)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    written = False
    timeout_s = _settings.ray_timeout_s()
    deadline = time.monotonic() + timeout_s
    try:
        while not stop.is_set():
            if proc.poll() is not None:
                if stop.is_set():
                    break
                raise BackendError(f"`{' '.join(cmd)}` exited with status {proc.returncode}")
            if not join and not written:
                found = started_head_address()
                if found:
                    address_file.parent.mkdir(parents=True, exist_ok=True)
                    address_file.write_text(found + "\n")
                    written = True
                    print(f"persia-launcher ray-head: Ray head at {found}", flush=True)
                elif time.monotonic() > deadline:
                    raise BackendError(f"the Ray head did not answer in {timeout_s:g} s")
            stop.wait(0.25)
    finally:
        if written:
            address_file.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return EXIT_OK


ROLES = {
    "ray-head": ray_head,
    "nn-worker": nn_worker,
    "data-loader": data_loader,
    "embedding-worker": embedding_worker,
    "embedding-parameter-server": embedding_parameter_server,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``persia-launcher``."""
    from persia.errors import ConfigError, PersiaError

    args = build_parser().parse_args(argv)
    try:
        return ROLES[args.role](args)
    except ConfigError as exc:
        print(f"persia-launcher {args.role}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PersiaError as exc:
        print(f"persia-launcher {args.role}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
