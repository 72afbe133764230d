"""Scale-out on Ray Serve: runtime/serve.py's FastAPI app behind `serve.ingress`, one MesaEngine per replica.

    python -m runtime.serve DIR --ray --replicas 2                      # a fixed number of replicas
    python -m runtime.serve DIR --ray --min-replicas 1 --max-replicas 4  # autoscaled on requests per replica

Ray's HTTP proxy (on --host/--port) spreads requests over the replicas; each replica answers exactly as a
single server does (its own batcher, queue limit, metrics: /metrics and /health describe the replica that
answered, named in the x-mesa-replica header). Needs the `serve-ray` extra; every machine of the cluster
needs this package installed and the engine directory at the same path.
"""

from __future__ import annotations

import signal
import threading


def application(engine_dir: str, engine_kw: dict, service_kw: dict, deployment_options: dict):
    """The bound Ray Serve application (pass it to serve.run)."""
    from ray import serve

    @serve.deployment(**deployment_options)
    @serve.ingress()  # late-bound: the app is built on the replica, around the engine it loaded
    class MesaReplica:
        def __init__(self, engine_dir: str, engine_kw: dict, service_kw: dict):
            from runtime.engine import MesaEngine
            from runtime.serve_service import Service

            self.service = Service(MesaEngine.load(engine_dir, **engine_kw), **service_kw)

        def __serve_build_asgi_app__(self):
            from runtime.serve import create_app

            return create_app(self.service)

        def __del__(self):
            self.service.engine.close()

    return MesaReplica.bind(engine_dir, engine_kw, service_kw)


def deployment_options(args) -> dict:
    """Replica count or autoscaling, and what Ray reserves per replica, from the command line."""
    options = {"name": "mesa", "graceful_shutdown_timeout_s": args.grace,
               "max_ongoing_requests": args.max_queue,  # beyond this Ray queues at the proxy, not in a replica
               "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus}}
    if args.min_replicas is not None or args.max_replicas is not None:
        low = args.min_replicas if args.min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": args.max_replicas if args.max_replicas is not None else max(low, 1),
            "target_ongoing_requests": args.target_ongoing_requests or args.slots}
    else:
        options["num_replicas"] = args.replicas
    return options


def start(args, ray_init: dict | None = None):
    """Connect to (or start) Ray, start Serve's proxy on --host/--port and deploy; returns the handle."""
    import ray
    from ray import serve

    from runtime.serve import engine_options

    if not ray.is_initialized():
        ray.init(**{"address": args.ray_address, **(ray_init or {})})
    serve.start(http_options={"host": args.host, "port": args.port})
    threads = max(1, round(args.replica_cpus))  # replicas sharing a machine must not each take every core
    app = application(args.engine, engine_options(args, threads),
                      {"max_queue": args.max_queue, "model_name": args.model_name}, deployment_options(args))
    return serve.run(app, name="mesa", route_prefix="/")


def run(args) -> int:
    """The --ray command: deploy, serve until SIGTERM/SIGINT, then shut Serve down (replicas get --grace)."""
    from ray import serve

    start(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs a SIGTERM handler that dies
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving on http://{args.host}:{args.port} (Ray Serve)", flush=True)
    stop.wait()
    serve.shutdown()
    return 0
