"""docker-compose.yml, run without Docker: each service becomes a local process.

There is no Docker engine here, so the test plays the engine's part: the Dockerfile's ENV and
ENTRYPOINT, then each service's `command` and `environment`, with service names mapped to
127.0.0.1, the ports each service uses remapped to free ones, and the named data volumes to
temporary directories. `depends_on: service_healthy` waits for the service's own healthcheck
command. The swarm must form (every node reports a peer through `rollshare status --json`)
and groups must flow (every node's groups_in > 0); SIGTERM, as `docker compose down` sends
it, must stop every node cleanly within its stop_grace_period.

The tiny-s test model (built once per session) and small rounds are passed as extra flags,
which win over the compose file's ROLLSHARE_* variables, so the run is quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rollshare.config import DEFAULT_GRPC_PORT, DEFAULT_P2P_PORT
from rollshare.swarm import free_ports, query_status

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 90.0  # bound on one wait: a node's start (torch import) under load, then a few rounds
FAST_FLAGS = ["--threads", "1", "--prompts-per-round", "2", "--group-size", "4", "--status", "line",
              "--reconcile-interval", "1"]
PORT_VARS = {"ROLLSHARE_P2P_PORT": ("--p2p-port", DEFAULT_P2P_PORT),
             "ROLLSHARE_GRPC_PORT": ("--grpc-port", DEFAULT_GRPC_PORT)}


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile() -> tuple[dict[str, str], list[str], str]:
    """The Dockerfile's ENV (as a dict), ENTRYPOINT (exec form) and the whole text."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    for line in joined.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
    return env, entrypoint, text


def env_dict(environment) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in (environment or {}).items()}


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


@dataclass
class Service:
    """One compose service as a local process."""

    name: str
    spec: dict
    ports: dict[int, int] = field(default_factory=dict)   # port inside the container -> local port
    grpc_port: int = 0                                     # its gRPC port inside the container
    mounts: dict[str, Path] = field(default_factory=dict)  # container path -> local directory
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def container_port(self, var: str, env: dict[str, str], argv: list[str]) -> int:
        flag, default = PORT_VARS[var]
        return int(flag_value(argv, flag) or env.get(var) or default)


class ComposeEmulator:
    """Maps a compose project onto 127.0.0.1 and runs its services as processes."""

    def __init__(self, compose: dict, tmp: Path, extra_flags: list[str]):
        self.image_env, self.entrypoint, _ = dockerfile()
        self.services = {name: Service(name, spec) for name, spec in compose["services"].items()}
        self.extra_flags = extra_flags
        self.tmp = tmp
        for svc in self.services.values():
            env = {**self.image_env, **env_dict(svc.spec.get("environment"))}
            command = list(svc.spec.get("command") or [])
            inner = {svc.container_port(var, env, command) for var in PORT_VARS}
            svc.ports = dict(zip(sorted(inner), free_ports(len(inner))))
            svc.grpc_port = svc.container_port("ROLLSHARE_GRPC_PORT", env, command)
            for vol in svc.spec.get("volumes", []):
                source, target = vol.split(":")[:2]
                svc.mounts[target] = tmp / "volumes" / source
                svc.mounts[target].mkdir(parents=True, exist_ok=True)
            svc.log = tmp / f"{svc.name}.log"

    def remap(self, svc: Service, value: str) -> str:
        """A value as the service would see it inside compose, made local."""
        for target, local in svc.mounts.items():
            if value == target or value.startswith(target + "/"):
                return str(local) + value[len(target):]
        if value in self.services:  # a service name as a host (advertise host)
            return "127.0.0.1"
        if value == "0.0.0.0":  # listen on loopback only
            return "127.0.0.1"

        def host_port(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            owner = svc if host in ("127.0.0.1", "localhost") else self.services.get(host)
            if owner is None or port not in owner.ports:
                return m.group(0)
            return f"127.0.0.1:{owner.ports[port]}"

        return re.sub(r"([A-Za-z0-9.-]+):(\d+)", host_port, value)

    def argv_env(self, svc: Service) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLSHARE_")}
        for k, v in {**self.image_env, **env_dict(svc.spec.get("environment"))}.items():
            env[k] = str(svc.ports[int(v)]) if k in PORT_VARS else self.remap(svc, v)
        command = list(svc.spec.get("command") or [])
        out, port_flags = [], {flag for flag, _ in PORT_VARS.values()}
        for i, a in enumerate(command):
            out.append(str(svc.ports[int(a)]) if i and command[i - 1] in port_flags else self.remap(svc, a))
        return [*self.executable(), *out, *self.extra_flags], env

    def executable(self) -> list[str]:
        assert self.entrypoint == ["rollshare"], f"unexpected ENTRYPOINT {self.entrypoint}"
        script = Path(sys.executable).parent / "rollshare"
        return [str(script)] if script.exists() else [sys.executable, "-m", "rollshare.cli"]

    def start(self, svc: Service) -> None:
        argv, env = self.argv_env(svc)
        with open(svc.log, "ab") as log:
            svc.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def healthcheck(self, svc: Service) -> list[str]:
        test = svc.spec["healthcheck"]["test"]
        assert test[0] == "CMD", "healthcheck in exec form: [CMD, ...]"
        assert test[1] == "rollshare", test
        return [*self.executable(), *(self.remap(svc, a) for a in test[2:])]

    def healthy(self, svc: Service) -> bool:
        """Its healthcheck command passes (run once Status answers: spawning it in a loop would slow the start)."""
        if self.answers(svc) is None:
            return False
        return subprocess.run(self.healthcheck(svc), capture_output=True, timeout=30).returncode == 0

    def answers(self, svc: Service) -> dict | None:
        """Status straight over gRPC (cheap to poll)."""
        return asyncio.run(query_status(f"127.0.0.1:{svc.ports[svc.grpc_port]}", timeout=1.0))

    def status_json(self, svc: Service) -> dict:
        """`rollshare status --json`, exactly as a person (or the healthcheck) would run it."""
        cmd = self.healthcheck(svc)
        if "--json" not in cmd:
            cmd.append("--json")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}:\n" + "\n".join(s.log.read_text(errors="replace").replace("\r", "\n")
                                                           .splitlines()[-8:])
                         for s in self.services.values() if s.log.exists())

    def wait_until(self, cond, what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            dead = {s.name: s.proc.returncode for s in self.services.values() if s.proc and s.proc.poll() is not None}
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited ({dead})" if dead else f"timed out after {timeout:g} s"
                raise AssertionError(f"{why} waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def stop(self, grace_s: float) -> dict[str, int | None]:
        """SIGTERM to every service (as `docker compose down`), then SIGKILL after grace_s."""
        running = [s for s in self.services.values() if s.proc and s.proc.poll() is None]
        for s in running:
            s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes = {}
        for s in running:
            try:
                codes[s.name] = s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(10)
                codes[s.name] = None
        return codes


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", str(value))
    assert m, f"unexpected duration {value!r}"
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


# ------------------------------------------------------------------------------- the files


def test_compose_describes_a_bootstrap_and_three_nodes_that_join_it_by_name_with_their_own_volumes():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"bootstrap", "node1", "node2", "node3"}
    volumes = set(compose.get("volumes") or {})
    image_env, entrypoint, _ = dockerfile()
    used = []
    for name, spec in services.items():
        assert spec["command"][0] == "run"
        assert "build" in spec
        env = {**image_env, **env_dict(spec.get("environment"))}
        data_dir = flag_value(spec["command"], "--data-dir") or env["ROLLSHARE_DATA_DIR"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in spec["volumes"]}
        assert mounts.get(data_dir) in volumes, f"{name}: its data dir {data_dir} must be a named volume"
        used.append(mounts[data_dir])
        assert spec["healthcheck"]["test"][1:3] == ["rollshare", "status"]
        if name != "bootstrap":
            bootstrap = flag_value(spec["command"], "--bootstrap") or env.get("ROLLSHARE_BOOTSTRAP", "")
            grpc_port = env_dict(services["bootstrap"].get("environment")).get("ROLLSHARE_GRPC_PORT",
                                                                                DEFAULT_GRPC_PORT)
            assert bootstrap == f"bootstrap:{grpc_port}"
            assert spec["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    assert len(set(used)) == len(services), "every service needs a volume of its own"


def test_dockerfile_installs_the_cpu_torch_wheel_and_runs_rollshare():
    image_env, entrypoint, text = dockerfile()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "libgmp-dev" in text and "gcc" in text
    assert re.search(r"pip install .*torch==[\d.]+ --index-url https://download.pytorch.org/whl/cpu", text)
    assert re.search(r"^EXPOSE 4101 4102$", text, re.M)
    assert entrypoint == ["rollshare"]
    assert re.search(rf"^VOLUME {image_env['ROLLSHARE_DATA_DIR']}$", text, re.M)


# ------------------------------------------------------------------------------- the run


def test_compose_services_run_as_local_processes_form_a_swarm_and_share_groups(tmp_path, tiny_policy_dir):
    compose = load_compose()
    emu = ComposeEmulator(compose, tmp_path, ["--model", str(tiny_policy_dir), *FAST_FLAGS])
    order = sorted(emu.services, key=lambda n: bool(emu.services[n].spec.get("depends_on")))
    try:
        for name in order:
            svc = emu.services[name]
            for dep, cond in (svc.spec.get("depends_on") or {}).items():
                if cond.get("condition") == "service_healthy":
                    emu.wait_until(lambda: emu.healthy(emu.services[dep]), f"{dep} to be healthy")
            emu.start(svc)

        def formed_and_flowing(st: dict | None) -> bool:
            return st is not None and st["peers"] >= 1 and st["groups_in"] > 0

        emu.wait_until(lambda: all(formed_and_flowing(emu.answers(s)) for s in emu.services.values()),
                       "every node to have a peer and to receive groups")
        statuses = {name: emu.status_json(s) for name, s in emu.services.items()}
        assert all(formed_and_flowing(st) for st in statuses.values()), statuses
        assert len({st["peer_id"] for st in statuses.values()}) == 4
        assert all(emu.healthy(s) for s in emu.services.values())
        # each node keeps its state in its own volume
        for svc in emu.services.values():
            data = svc.mounts[emu.image_env["ROLLSHARE_DATA_DIR"]]
            assert (data / "identity.key").is_file() and (data / "rollouts.db").is_file()
    finally:
        grace = max(seconds(s.spec.get("stop_grace_period", "10s")) for s in emu.services.values())
        codes = emu.stop(min(grace, 60.0))
    assert codes == {name: 0 for name in emu.services}, f"not every service stopped cleanly: {codes}\n{emu.logs()}"
