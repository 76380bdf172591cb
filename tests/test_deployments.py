"""prefect.yaml and the local server targets (mk/server.mk, scripts/prefect-local.sh).

The static test reads prefect.yaml as Prefect's deploy command does. The server test starts a real Prefect
server on a free loopback port with a temporary PREFECT_HOME through `make -f mk/server.mk server`,
deploys every deployment, reads the schedules, limits and triggers back from the API, runs the
`watch-data` sensor flow against it twice, and stops the server by its PID file (in a finally).
`LocalPrefect` is shared with test_e2e_trigger.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PREFECT_YAML = REPO / "prefect.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPrefect:
    """A Prefect server (+ worker) for one test, driven through the project's make targets."""

    def __init__(self, home: Path, prefect_file: Path = PREFECT_YAML, pool: str = "finetune"):
        self.home, self.port, self.pool, self.prefect_file = home, free_port(), pool, prefect_file
        self.api = f"http://127.0.0.1:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=self.api,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        return env

    def make(self, *targets: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [
            "make",
            "--no-print-directory",
            "-f",
            "mk/server.mk",
            *targets,
            f"BIN={Path(sys.executable).parent}",
            f"PREFECT_PORT={self.port}",
            f"PREFECT_SERVER_HOME={self.home}",
            f"WORK_POOL={self.pool}",
            f"PREFECT_FILE={self.prefect_file}",
        ]
        res = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(
                f"{' '.join(targets)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
            )
        return res

    def pid(self, name: str) -> int | None:
        f = self.home / f"{name}.pid"
        return int(f.read_text()) if f.exists() else None

    def stop(self) -> None:
        """Stop the worker and the server through their PID files (what `make worker-stop server-stop` does)."""
        pids = [p for p in (self.pid("worker"), self.pid("server")) if p]
        self.make("worker-stop", "server-stop", check=False, timeout=120)
        for pid in pids:  # the make targets must have ended them; never leave one running
            if _alive(pid):
                os.killpg(pid, 9)

    def post(self, path: str, body: dict | None = None) -> list | dict:
        import httpx

        r = httpx.post(self.api + path, json=body or {}, timeout=30)
        r.raise_for_status()
        return r.json()

    def get(self, path: str):
        import httpx

        r = httpx.get(self.api + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def events(self, name: str, resource_id: str | None = None) -> list[dict]:
        flt: dict = {"event": {"name": [name]}}
        if resource_id:
            flt["resource"] = {"id": [resource_id]}
        return self.post("/events/filter", {"filter": flt, "limit": 50})["events"]

    def deployments(self) -> dict[str, dict]:
        return {d["name"]: d for d in self.post("/deployments/filter")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def wait_for(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---- static: prefect.yaml as Prefect reads it --------------------------------------------------------


def test_prefect_yaml_is_valid_and_complete():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    from tasks.config_loading import validate_config

    raw = yaml.safe_load(PREFECT_YAML.read_text())
    model = PrefectYamlModel.model_validate(raw)
    deps = {d.name: d for d in model.deployments}
    assert set(deps) == {"scheduled-retrain", "retrain-on-new-data", "drop-folder-sensor"}
    for d in deps.values():
        assert d.work_pool.name == "finetune"
        assert d.concurrency_limit.limit == 1 and d.concurrency_limit.collision_strategy == "ENQUEUE"
    for name in ("scheduled-retrain", "retrain-on-new-data"):
        assert deps[name].entrypoint == "flows/finetune.py:finetune"
        validate_config(deps[name].parameters["config"], source=f"prefect.yaml {name}")
    cron = deps["scheduled-retrain"].schedules[0]
    assert cron.cron == "0 3 * * 1" and cron.timezone == "UTC"
    (trigger,) = _initialize_deployment_triggers(
        "retrain-on-new-data", [dict(t) for t in deps["retrain-on-new-data"].triggers]
    )
    assert trigger.expect == {"dataset.updated"}
    assert trigger.parameters == {
        "data_source": "{{ event.payload.path }}",
        "data_sha256": "{{ event.payload.sha256 }}",
    }
    assert deps["drop-folder-sensor"].entrypoint == "flows/watch.py:watch_data"
    assert deps["drop-folder-sensor"].schedules[0].interval.total_seconds() == 300
    # the event-driven deployment listens to the dataset the watcher names from its config
    from tasks.data.watching import resource_id

    cfg = validate_config(deps["retrain-on-new-data"].parameters["config"])
    assert trigger.match.root["prefect.resource.id"] == resource_id(cfg.retrain.dataset_name or cfg.registry.name)


def test_make_targets_and_script_are_wired():
    text = (REPO / "mk" / "server.mk").read_text()
    for target in ("server", "server-stop", "pool", "deploy", "worker", "worker-stop", "watch"):
        assert f"\n{target}:" in text, target
    res = subprocess.run(["bash", "scripts/prefect-local.sh", "nonsense"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


# ---- a real server ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_deploy_reads_back_schedule_limits_trigger_and_sensor(tmp_path):
    srv = LocalPrefect(tmp_path / "prefect-server")
    try:
        out = srv.make("server", timeout=180).stdout
        assert f"Dashboard: http://127.0.0.1:{srv.port}" in out
        server_pid = srv.pid("server")
        assert (srv.home / "prefect.db").is_file() and server_pid and _alive(server_pid)
        import httpx

        ui = httpx.get(f"http://127.0.0.1:{srv.port}/ui-settings", timeout=10).json()
        assert ui["api_url"] == srv.api  # the dashboard talks to this port, not 4200
        srv.make("pool")
        assert srv.get(f"/work_pools/{srv.pool}")["type"] == "process"
        deploy = srv.make("deploy", timeout=300)
        assert deploy.stdout.count("successfully created") == 3, deploy.stdout[-3000:]

        raw = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
        deps = srv.deployments()
        assert set(deps) == set(raw)
        (sched,) = deps["scheduled-retrain"]["schedules"]
        assert sched["schedule"]["cron"] == raw["scheduled-retrain"]["schedules"][0]["cron"] == "0 3 * * 1"
        assert sched["schedule"]["timezone"] == "UTC" and sched["active"] is True
        assert deps["drop-folder-sensor"]["schedules"][0]["schedule"]["interval"] == 300
        for name, d in deps.items():
            assert d["global_concurrency_limit"]["limit"] == 1, name
            assert d["concurrency_options"]["collision_strategy"] == "ENQUEUE", name
            assert d["work_pool_name"] == srv.pool
            assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert deps["retrain-on-new-data"]["parameters"]["config"]["registry"]["name"] == "demo"

        autos = srv.post("/automations/filter")
        (auto,) = [a for a in autos if a["name"] == "retrain-demo-on-dataset-updated"]
        assert auto["trigger"]["expect"] == ["dataset.updated"]
        assert auto["trigger"]["match"] == {"prefect.resource.id": "finetune.dataset.demo"}
        (action,) = auto["actions"]
        assert action["type"] == "run-deployment" and action["deployment_id"] == deps["retrain-on-new-data"]["id"]
        assert action["parameters"] == {
            "data_source": "{{ event.payload.path }}",
            "data_sha256": "{{ event.payload.sha256 }}",
        }

        # the sensor flow, run twice against the server: one real event, then none
        drop = tmp_path / "drop"
        drop.mkdir()
        (drop / "rows.csv").write_text("text,label\ngood,pos\nbad,neg\n")
        code = (
            "import json, sys; from flows.watch import watch_data; "
            "print(json.dumps(watch_data(location=sys.argv[1], dataset='sensor-test', workspace=sys.argv[2], "
            "stable_seconds=0.5)))"
        )
        runs = []
        for _ in range(2):
            res = subprocess.run(
                [sys.executable, "-c", code, str(drop), str(tmp_path / "ws")],
                cwd=REPO,
                env=srv.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert res.returncode == 0, res.stderr[-3000:]
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        assert len(runs[0]["announced"]) == 1 and runs[1]["announced"] == []
        sha = runs[0]["announced"][0]["sha256"]
        events = wait_for(
            lambda: srv.events("dataset.updated", "finetune.dataset.sensor-test"), 30, "the sensor's event"
        )
        time.sleep(2)
        events = srv.events("dataset.updated", "finetune.dataset.sensor-test")
        assert len(events) == 1
        assert events[0]["payload"]["sha256"] == sha and events[0]["payload"]["path"] == str(drop / "rows.csv")
        # other datasets do not start the demo retraining
        demo_runs = lambda: [
            r
            for r in srv.post("/flow_runs/filter")  # noqa: E731
            if r["deployment_id"] == deps["retrain-on-new-data"]["id"]
        ]
        assert not demo_runs()

        # the two documented ways to announce data from outside Python (docs/deployments.md) start runs
        # with the event's path and hash as parameters (no worker here: the runs stay scheduled)
        cli = subprocess.run(
            [
                str(Path(sys.executable).parent / "prefect"),
                "event",
                "emit",
                "dataset.updated",
                "--resource-id",
                "finetune.dataset.demo",
                "--payload",
                json.dumps({"path": "/data/drop/cli.csv", "sha256": "a" * 64}),
            ],
            cwd=REPO,
            env=srv.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr[-2000:]
        import uuid
        from datetime import datetime

        http = httpx.post(
            srv.api + "/events",
            json=[
                {
                    "id": str(uuid.uuid4()),
                    "occurred": datetime.now(UTC).isoformat(),
                    "event": "dataset.updated",
                    "resource": {"prefect.resource.id": "finetune.dataset.demo"},
                    "payload": {"path": "/data/drop/http.csv", "sha256": "b" * 64},
                }
            ],
            timeout=30,
        )
        assert http.status_code == 204, http.text
        runs = wait_for(lambda: len(demo_runs()) >= 2 and demo_runs(), 60, "two event-triggered flow runs")
        assert sorted((r["parameters"]["data_source"], r["parameters"]["data_sha256"]) for r in runs) == [
            ("/data/drop/cli.csv", "a" * 64),
            ("/data/drop/http.csv", "b" * 64),
        ]
        assert all(r["parameters"]["config"]["registry"]["name"] == "demo" for r in runs)
    finally:
        srv.stop()
    assert not (srv.home / "server.pid").exists() and not _alive(server_pid)
