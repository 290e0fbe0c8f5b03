"""`deltagate serve --ray`: join (or start) a Ray cluster and serve the gateway with a RayPool.

The gateway is the same app as `deltagate serve` (every route, limit and metric), run by uvicorn
in this process; only its engines differ: Ray Serve replicas on the cluster's nodes
(server/cluster/pool.py). Ray runs no HTTP proxy: requests reach the engines from this process.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.errors import BadRequestError
from server.settings import GatewaySettings, StartupTerm

log = logging.getLogger("deltagate.cluster")


def portable(settings: GatewaySettings) -> GatewaySettings:
    """The settings with every path absolute: Ray workers do not share the caller's working dir."""
    for base in settings.bases:
        if not (Path(base.path) / "config.json").is_file():
            raise BadRequestError(f"base {base.name!r}: {base.path} is not a checkpoint dir")
        if base.engine_url:
            raise BadRequestError("--ray manages its engines (replicas); drop --engine-url")

    def absolute(term: StartupTerm) -> StartupTerm:
        path = Path(term.ref).expanduser()
        return term.model_copy(update={"ref": str(path.resolve())}) if path.exists() else term

    bases = [b.model_copy(update={"path": str(Path(b.path).resolve())}) for b in settings.bases]
    variants = [v.model_copy(update={"terms": [absolute(t) for t in v.terms]}) for v in settings.variants]
    return settings.model_copy(
        update={"state_dir": settings.state_dir.resolve(), "bases": bases, "variants": variants}
    )


def serve_on_ray(settings: GatewaySettings, host: str, port: int, *, access_log: bool = False) -> None:
    """Run until SIGINT/SIGTERM: Ray (local unless --ray-address), the gateway on host:port, engine
    replicas per base as the settings' scaling says."""
    import ray
    from ray import serve

    from server.app import serve_app
    from server.cluster.pool import RayPool, Scaling

    settings = portable(settings)
    scaling, address = Scaling.of(settings), settings.ray_address
    if address:
        ray.init(address=address, namespace="deltagate")
    else:  # a local instance: no dashboard (it costs memory and CPU on small machines)
        ray.init(include_dashboard=False, namespace="deltagate")
    pool: RayPool | None = None
    try:
        serve.start(proxy_location="Disabled")  # no Ray HTTP proxy: the gateway talks to engines itself
        pool = RayPool(settings, scaling)
        log.info("deltagate on Ray (%s); the gateway listens on %s:%d", scaling, host, port)
        serve_app(settings, host, port, access_log, pool)
    finally:
        if not address:  # our own Ray: stop it; on a shared cluster the pool deleted its applications
            serve.shutdown()
        ray.shutdown()
        # A replica torn down before its __init__ finished (e.g. a replacement still starting its
        # engine) never ran __del__: its engine may still run. This node's pid files (this gateway's
        # applications only: other gateways may share the cluster) say which.
        from loaders.engine import kill_stale_engine
        from server.cluster.pool import node_dir

        for pid_file in node_dir().glob(f"{pool.prefix}*/engine.pgid") if pool else ():
            if killed := kill_stale_engine(pid_file):
                log.info("stopped %d leftover engine process(es) of %s", killed, pid_file.parent.name)
