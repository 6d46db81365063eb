"""Front processes and an engine: with ``TESSERA_WORKERS`` > 0, ``python -m app serve`` runs
one engine process (the registry, its batchers and the models: app/engine/core.py) and that
many front processes (HTTP, the service's rules, the answers' shapes: the app with an
EngineClient, app/engine/client.py, where the registry was), joined by ZeroMQ
(app/engine/wire.py) and started, watched and stopped by app/engine/supervisor.py."""
