"""`deltagate serve --ray`: start (or join) a Ray cluster and run the front + engine replicas on it."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from loaders.engine import kill_stale_engine
from server.errors import BadRequestError
from server.settings import GatewaySettings, StartupTerm

log = logging.getLogger("deltagate.cluster")


def portable(settings: GatewaySettings) -> GatewaySettings:
    """The settings with every path absolute: Ray workers do not share the caller's working dir."""
    if len(settings.bases) != 1:
        raise BadRequestError(
            "--ray serves one base (its replicas are engines of that base); give one --base"
        )
    if not (Path(settings.bases[0].path) / "config.json").is_file():
        raise BadRequestError(
            f"base {settings.bases[0].name!r}: {settings.bases[0].path} is not a checkpoint dir"
        )
    if settings.bases[0].engine_url:
        raise BadRequestError("--ray manages its engines (one per replica); drop --engine-url")

    def absolute(term: StartupTerm) -> StartupTerm:
        path = Path(term.ref).expanduser()
        return term.model_copy(update={"ref": str(path.resolve())}) if path.exists() else term

    bases = [b.model_copy(update={"path": str(Path(b.path).resolve())}) for b in settings.bases]
    variants = [v.model_copy(update={"terms": [absolute(t) for t in v.terms]}) for v in settings.variants]
    return settings.model_copy(
        update={"state_dir": settings.state_dir.resolve(), "bases": bases, "variants": variants}
    )


def serve_on_ray(settings: GatewaySettings, host: str, port: int, replicas: int, address: str | None) -> None:
    """Run until SIGINT/SIGTERM: Ray (local unless `address`), the front on host:port, `replicas` engines."""
    import ray
    from ray import serve

    from server.cluster.front import APP_NAME, Front
    from server.cluster.replica import EngineReplica

    settings_json = portable(settings).model_dump_json()
    if address:
        ray.init(address=address)
    else:  # a local instance: no dashboard (it costs memory and CPU on small machines)
        ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        engines = EngineReplica.options(num_replicas=replicas).bind(settings_json)
        log.info("starting %d engine replica(s) of %s; the front listens on %s:%d", replicas,
                 settings.bases[0].name, host, port)  # fmt: skip
        serve.run(Front.bind(engines, settings_json), name=APP_NAME, route_prefix="/")
        log.info("deltagate on Ray Serve is ready on http://%s:%d", host, port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        # A replica torn down before its __init__ finished (e.g. a replacement still starting its
        # engine) never ran __del__: its engine is still running. The pid files say which.
        for pid_file in settings.state_dir.resolve().glob("replica-*/logs/engine-*.pgid"):
            if killed := kill_stale_engine(pid_file):
                log.info("stopped %d leftover engine process(es) of %s", killed, pid_file.parent.parent.name)
