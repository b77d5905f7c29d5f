"""The deployment files say what the documentation says: docker-compose.yml (Redis
with AOF, vLLM serving Qwen3-8B on a GPU, two gateway replicas on the remote
engine, Prometheus scraping them and Grafana provisioned from deploy/) and a
Dockerfile that installs the way `make run` does.

No Docker is needed: the files are parsed, and the gateways' command lines and
environment are fed through Rapport's own configuration parser."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from rapport.cli import build_parser
from server.config import Settings, env_name, settings_from

ROOT = Path(__file__).resolve().parent.parent
MODEL = "Qwen/Qwen3-8B"
GATEWAYS = ("gateway-1", "gateway-2")
OBSERVABILITY = ("prometheus", "grafana")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def as_list(command: object) -> list[str]:
    if isinstance(command, str):
        return shlex.split(command)
    assert isinstance(command, list)
    return [str(c) for c in command]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def flag(args: list[str], name: str) -> list[str]:
    """Every value given to ``name`` (``--x v`` or ``--x=v``)."""
    out = []
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(name + "="):
            out.append(a.split("=", 1)[1])
    return out


def port_pairs(service: dict) -> set[tuple[str, str]]:
    pairs = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            pairs.add((str(p["published"]), str(p["target"])))
        else:
            host, _, container = str(p).rpartition(":")
            pairs.add((host.rsplit(":", 1)[-1], container.split("/")[0]))
    return pairs


def health_test(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def test_the_stack_has_exactly_the_documented_services(services):
    assert set(services) == {"redis", "vllm", *GATEWAYS, *OBSERVABILITY}


def test_redis_persists_with_aof_every_second(services, compose):
    redis = services["redis"]
    assert re.fullmatch(r"redis:7(\.[\w.-]+)?(-[\w.-]+)?", redis["image"]), redis["image"]
    cmd = as_list(redis["command"])
    assert cmd[0] == "redis-server"
    assert flag(cmd, "--appendonly") == ["yes"]
    assert flag(cmd, "--appendfsync") == ["everysec"]
    volumes = [str(v) if not isinstance(v, dict) else f"{v['source']}:{v['target']}"
               for v in redis["volumes"]]
    data = [v for v in volumes if v.split(":")[1] == "/data"]
    assert data, volumes
    assert data[0].split(":")[0] in (compose.get("volumes") or {})  # a named volume
    assert "redis-cli" in health_test(redis) and "ping" in health_test(redis)


def test_vllm_serves_qwen3_8b_on_a_gpu(services, compose):
    vllm = services["vllm"]
    assert vllm["image"].split(":")[0] == "vllm/vllm-openai"
    cmd = as_list(vllm["command"])
    assert flag(cmd, "--model") == [MODEL] or cmd[:1] == [MODEL]
    assert ("8001", "8000") in port_pairs(vllm)
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert re.fullmatch(r"\$\{HF_TOKEN(:?-[^}]*)?\}", env_of(vllm)["HF_TOKEN"]), env_of(vllm)
    cache = [str(v) for v in vllm["volumes"] if str(v).endswith(":/root/.cache/huggingface")]
    assert cache and cache[0].split(":")[0] in (compose.get("volumes") or {})
    assert "/health" in health_test(vllm) and ":8000" in health_test(vllm)
    # The context window the gateways plan with is the one vLLM serves.
    for name in GATEWAYS:
        assert flag(cmd, "--max-model-len") == [env_of(services[name])["RAPPORT_MAX_MODEL_LEN"]]


@pytest.mark.parametrize("name", GATEWAYS)
def test_gateway_replicas_use_the_remote_engine_redis_and_a_secret_from_the_environment(services, name):
    gw = services[name]
    build = gw["build"]
    if isinstance(build, str):
        assert build == "."
    else:
        assert build["context"] == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile"
    cmd = as_list(gw["command"])
    assert flag(cmd, "--engine") == ["remote"]
    assert flag(cmd, "--upstream") == ["http://vllm:8000"]
    assert flag(cmd, "--host") == ["0.0.0.0"]
    env = env_of(gw)
    assert env["RAPPORT_REDIS_URL"] == "redis://redis:6379/0"
    assert re.fullmatch(r"\$\{RAPPORT_JWT_SECRET:\?[^}]+\}", env["RAPPORT_JWT_SECRET"]), env
    assert env["RAPPORT_MODEL"] == MODEL
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gw["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "/readyz" in health_test(gw)

    # The command and environment are what `rapport serve` really accepts.
    known = {env_name(f) for f in Settings.__dataclass_fields__}
    assert set(env) <= known, set(env) - known
    args = build_parser().parse_args(["serve", *cmd])
    environ = {**env, "RAPPORT_JWT_SECRET": "x" * 32}
    settings = settings_from(args, environ=environ)
    assert (settings.engine, settings.upstream, settings.host) == ("remote", ["http://vllm:8000"], "0.0.0.0")
    assert settings.redis_url == "redis://redis:6379/0" and settings.model == MODEL
    assert settings.auth == "jwt"
    # The health check and the published port point at the port the server listens on.
    assert f":{settings.port}/readyz" in health_test(gw)
    assert {c for _, c in port_pairs(gw)} == {str(settings.port)}


def test_gateways_are_published_on_distinct_host_ports(services):
    hosts = [h for name in GATEWAYS for h, _ in port_pairs(services[name])]
    assert sorted(hosts) == ["8000", "8002"]
    assert ("8001", "8000") in port_pairs(services["vllm"])
    every = [h for service in services.values() for h, _ in port_pairs(service)]
    assert len(every) == len(set(every)), every



# ---------------------------------------------------------------- Prometheus and Grafana


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a named volume, or a host path as written) of every mount."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            source, target = str(v["source"]), str(v["target"])
        else:
            source, target = str(v).split(":")[:2]
        out[target] = source
    return out


def host_path(source: str) -> Path | None:
    """The file a bind mount reads, relative to the compose file; None for a named volume."""
    if not source.startswith((".", "/", "~")):
        return None
    return (ROOT / source).resolve()


def gateway_port(service: dict) -> int:
    """The port a gateway listens on, as `rapport serve` parses its command and environment."""
    args = build_parser().parse_args(["serve", *as_list(service["command"])])
    environ = {**env_of(service), "RAPPORT_JWT_SECRET": "x" * 32}
    return settings_from(args, environ=environ).port


@pytest.mark.parametrize("name", [*GATEWAYS, *OBSERVABILITY, "redis", "vllm"])
def test_every_mount_is_a_declared_volume_or_a_file_in_the_repository(services, compose, name):
    for target, source in mounts(services[name]).items():
        path = host_path(source)
        if path is None:
            assert source in (compose.get("volumes") or {}), (name, source)
        else:
            assert path.is_relative_to(ROOT) and path.exists(), (name, source, target)


def test_prometheus_scrapes_every_gateway_on_the_port_it_listens_on(services):
    prom = services["prometheus"]
    assert prom["image"].split(":")[0] == "prom/prometheus"
    assert ("9090", "9090") in port_pairs(prom)
    config_path = host_path(mounts(prom)["/etc/prometheus/prometheus.yml"])
    assert config_path is not None
    assert "/prometheus" in mounts(prom) and host_path(mounts(prom)["/prometheus"]) is None  # kept across restarts
    config = yaml.safe_load(config_path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    rapport = jobs["rapport"]
    assert rapport.get("metrics_path", "/metrics") == "/metrics"
    assert rapport.get("scheme", "http") == "http"
    targets = {t for group in rapport["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{gateway_port(services[name])}" for name in GATEWAYS}
    # Every other target is a service of the stack, on a port it serves.
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            for t in group["targets"]:
                assert t.split(":")[0] in services, t


def test_grafana_is_provisioned_with_the_stack_prometheus_and_the_shipped_dashboard(services):
    grafana = services["grafana"]
    assert grafana["image"].split(":")[0] == "grafana/grafana"
    assert ("3000", "3000") in port_pairs(grafana)
    assert "prometheus" in grafana.get("depends_on", [])
    volumes = mounts(grafana)
    provisioned: dict[str, Path] = {}
    for kind in ("datasources", "dashboards"):
        path = host_path(volumes[f"/etc/grafana/provisioning/{kind}"])
        assert path is not None and path.is_dir(), (kind, path)
        provisioned[kind] = path
    assert "/var/lib/grafana" in volumes and host_path(volumes["/var/lib/grafana"]) is None

    sources = [ds for f in sorted(provisioned["datasources"].glob("*.y*ml"))
               for ds in yaml.safe_load(f.read_text())["datasources"]]
    prom = [ds for ds in sources if ds["type"] == "prometheus"]
    assert len(prom) == 1, sources
    prom_port = next(c for h, c in port_pairs(services["prometheus"]) if h == "9090")
    assert prom[0]["url"] == f"http://prometheus:{prom_port}"
    assert prom[0].get("uid")

    providers = [p for f in sorted(provisioned["dashboards"].glob("*.y*ml"))
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert len(providers) == 1 and providers[0]["type"] == "file", providers
    # The provider reads the container path the dashboards directory is mounted at.
    dashboards = host_path(volumes[providers[0]["options"]["path"]])
    assert dashboards is not None and (dashboards / "rapport.json").is_file()
    shipped = json.loads((dashboards / "rapport.json").read_text())
    assert shipped["uid"] and shipped["title"]
    # The dashboard's queries go to the provisioned data source (tests/test_dashboard.py checks the rest).
    uids = {p["datasource"]["uid"] for p in shipped["panels"] if p.get("type") != "row"}
    assert uids == {prom[0]["uid"]}


# ---------------------------------------------------------------- Dockerfile and Makefile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        instr, _, rest = whole.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def make_rules() -> dict[str, list[str]]:
    """target -> prerequisites (order-only ones included) from the Makefile."""
    rules: dict[str, list[str]] = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith(("\t", "#", ".")) or not line.strip():
            continue
        m = re.match(r"^([^:=\s][^:=]*?)\s*:(?!=)\s*(.*)$", line)
        if m is None:
            continue
        prereqs = m.group(2).replace("|", " ").split()
        for target in m.group(1).split():
            rules.setdefault(target, []).extend(prereqs)
    return rules


def closure(rules: dict[str, list[str]], target: str) -> set[str]:
    seen: set[str] = set()
    todo = [target]
    while todo:
        t = todo.pop()
        for p in rules.get(t, []):
            if p not in seen:
                seen.add(p)
                todo.append(p)
    return seen


def make_invocations(run: str) -> list[list[str]]:
    """The ``make`` commands of a RUN line, each with its leading VAR=value words."""
    out = []
    for segment in re.split(r"&&|\|\||;|\|", run):
        words = shlex.split(segment)
        i = 0
        while i < len(words) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[i]):
            i += 1
        if i < len(words) and words[i] == "make":
            out.append(words)
    return out


def test_the_image_installs_the_way_make_run_does():
    rules = make_rules()
    run_steps = closure(rules, "run")
    assert "install" in run_steps
    # The vLLM steps on the way are skipped with RAPPORT_SKIP_VLLM=1.
    makefile = (ROOT / "Makefile").read_text()
    for target in ("vllm", "model"):
        recipe = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
        assert "RAPPORT_SKIP_VLLM" in recipe, target

    runs = [args for instr, args in dockerfile() if instr == "RUN"]
    invocations = [words for r in runs for words in make_invocations(r)]
    assert len(invocations) == 1, runs
    words = invocations[0]
    targets = [w for w in words[words.index("make") + 1:] if not w.startswith("-") and "=" not in w]
    assert targets, words
    for target in targets:
        # A step of `make run` (not the server itself) that performs the install.
        assert target in run_steps | {"install"} and target != "run", target
        assert target == "install" or "install" in closure(rules, target)
    assert "RAPPORT_SKIP_VLLM=1" in words
    # No install of its own beside the Makefile's.
    assert not any("pip install" in r or "uv pip" in r for r in runs), runs
    copied = " ".join(args for instr, args in dockerfile() if instr == "COPY")
    assert "Makefile" in copied and "pyproject.toml" in copied


def test_the_image_is_a_slim_python_311_running_rapport_serve_as_non_root():
    instrs = dockerfile()
    froms = [args for instr, args in instrs if instr == "FROM"]
    assert froms == ["python:3.11-slim"]
    users = [args for instr, args in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [args for instr, args in instrs if instr == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["rapport", "serve"]
    health = [args for instr, args in instrs if instr == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1]
    # The RUN that installs comes after the switch to the unprivileged user,
    # so the virtualenv belongs to it.
    order = [instr for instr, _ in instrs]
    make_at = next(i for i, (instr, args) in enumerate(instrs) if instr == "RUN" and make_invocations(args))
    assert "USER" in order[:make_at]


def test_the_image_copies_every_top_level_package_the_install_names():
    """A package missing from the image fails only at `docker build`, which CI cannot run."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {args.split()[-1].rstrip("/").removeprefix("./") for instr, args in dockerfile() if instr == "COPY"}
    assert {p.split(".")[0] for p in packages} <= copied
