"""The engine: one implementation of a request's lifecycle (app/engine/core.py) under every
process layout, and its clients. In one process (and a Ray replica) the app drives the core
in-process (app/engine/client.py: InprocClient); with ``TESSERA_WORKERS`` > 0, ``python -m app
serve`` runs the core in an engine process (app/engine/server.py) and the app in front
processes that reach it over ZeroMQ (app/engine/zmq_client.py, app/engine/wire.py), started,
watched and stopped by the supervisor in app/engine/processes.py."""
