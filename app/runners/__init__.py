"""Runners, one module per task family, the ground floor: torch, transformers and the payload
types (app/payloads.py). app/tasks.py names the one each catalog entry gets; the registry
builds it (app/registry/registry.py)."""
