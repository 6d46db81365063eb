"""The baseline a server is measured against: the one-line pipeline example behind FastAPI.

    classifier = pipeline("text-classification", model=...)
    @app.post("/classify")
    def classify(body): return classifier(body.inputs)

A plain ``def`` route, as FastAPI's docs advise for blocking code: requests run on
the thread pool, each calling the shared pipeline on its one text. Run with
``BENCH_NAIVE_MODEL=<model dir> python bench/naive_server.py --port N``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

classifier = pipeline("text-classification", model=os.environ["BENCH_NAIVE_MODEL"])
app = FastAPI()
worker_torch_threads: list[int] = []  # as seen on the thread-pool thread that ran the pipeline


class Body(BaseModel):
    inputs: str


@app.post("/classify")
def classify(body: Body) -> Any:
    worker_torch_threads[:] = [torch.get_num_threads()]
    return classifier(body.inputs)


@app.get("/health")
def health() -> dict[str, Any]:
    return {
        "status": "ok",
        "torch_threads": torch.get_num_threads(),
        "worker_torch_threads": worker_torch_threads[0] if worker_torch_threads else None,
        "cpu_s": time.process_time(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False)
