"""The compose stack without a Docker engine: docker-compose.yml against the compose-spec
JSON schema, then the rules it must keep (loopback ports, health-gated start-up, secrets
only from .env, named volumes, the GPU reservation, Postgres behind both servers), the
Dockerfile, .env.example and prefect.yaml. Offline and fast.

The helpers here (``interpolate``, ``compose``) are also what tests/server_stack.py uses to
run the same server commands natively."""

from __future__ import annotations

import configparser
import copy
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
# check-jsonschema 0.39.0's vendor/sha256/compose-spec.sha256 (see compose-spec.NOTICE.md).
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(KeyError):
    pass


def _substitute(text: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if (value is None if op == "-" else unset_or_empty) else value
        if op in ("?", ":?"):
            if value is None if op == "?" else unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(one, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation over a loaded YAML tree (strings only, as Compose)."""
    if isinstance(node, str):
        return _substitute(node, env)
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def variables_used(text: str) -> set[str]:
    return {m.group(2) or m.group(5) for m in _VAR.finditer(text) if not m.group(1)}


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as Compose sees it with ``env`` (default: .env.example)."""
    return interpolate(raw_compose(), read_env_file(ENV_EXAMPLE) if env is None else env)


def argv(command: Any) -> list[str]:
    """A service's command as an argument list (Compose splits string commands like a shell)."""
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return compose()


@pytest.fixture(scope="module")
def services(stack) -> dict[str, Any]:
    return stack["services"]


# ---------------------------------------------------------------- the compose-spec schema

def test_schema_is_the_vendored_compose_spec():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"


def _schema_errors(document: Any) -> list[str]:
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def test_compose_file_is_valid_compose_spec(stack):
    assert _schema_errors(stack) == []


@pytest.mark.parametrize("profiles", ["gpu", "cpu"])
def test_compose_file_is_valid_with_either_profile_and_auth(profiles):
    env = {**read_env_file(ENV_EXAMPLE), "COMPOSE_PROFILES": profiles,
           "MLFLOW_AUTH_ARGS": "--app-name basic-auth"}
    assert _schema_errors(compose(env)) == []


def test_the_schema_catches_mistakes(stack):
    """The validation is not vacuous: misspelt keys and wrong types are errors."""
    broken = copy.deepcopy(stack)
    broken["services"]["mlflow"]["healthchek"] = broken["services"]["mlflow"].pop("healthcheck")
    broken["services"]["postgres"]["ports"] = "5432:5432"
    broken["volumes"]["mnist"] = ["not", "a", "mapping"]
    errors = _schema_errors(broken)
    assert any("healthchek" in e for e in errors)
    assert any(e.startswith("services/postgres/ports") for e in errors)
    assert any(e.startswith("volumes/mnist") for e in errors)


# ---------------------------------------------------------------- rules of the stack

def test_ports_are_bound_to_loopback(services):
    published = []
    for name, svc in services.items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
            published.append(name)
    assert set(published) == {"prefect-server", "mlflow"}


def test_port_bindings_are_literal_loopback_before_interpolation():
    """Not ``${BIND:-127.0.0.1}``: an .env must not be able to open a port to the network."""
    for name, svc in raw_compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def _is_one_shot(svc: dict) -> bool:
    return svc.get("restart") == "no"


def test_long_running_services_have_healthchecks(services):
    for name, svc in services.items():
        if _is_one_shot(svc):
            continue
        check = svc.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_depends_on_waits_for_health(services):
    edges = 0
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: use the long depends_on syntax with conditions"
        for dep, spec in deps.items():
            edges += 1
            target = services[dep]
            if "healthcheck" in target:
                assert spec["condition"] == "service_healthy", (name, dep)
            else:
                assert _is_one_shot(target), (name, dep)
                assert spec["condition"] == "service_completed_successfully", (name, dep)
    assert edges >= 6


def test_start_order(services):
    def deps(name):
        return set(services[name].get("depends_on", {}))

    assert deps("prefect-server") == {"postgres"} and deps("mlflow") == {"postgres"}
    assert deps("deployments") == {"prefect-server"}
    for worker in ("worker", "worker-gpu"):
        assert deps(worker) == {"prefect-server", "mlflow", "deployments"}


def _walk_strings(node: Any, path: str = ""):
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_strings(v, f"{path}[{i}]")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_strings(v, f"{path}/{k}")


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY", re.I)
REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}$")


def test_no_literal_secrets():
    raw = raw_compose()
    checked = 0
    for name, svc in raw["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for key, value in env.items():
            if SECRET_NAME.search(key):
                assert REFERENCE.match(str(value)), f"{name}: {key} must be a ${{VAR}}"
                checked += 1
    for path, text in _walk_strings(raw):
        masked = _VAR.sub(lambda m: "$" if m.group(1) else f"<{m.group(2) or m.group(5)}>", text)
        for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s,'\"]+", masked):
            authority = url.split("://", 1)[1].split("/", 1)[0]
            if "@" in authority:
                password = authority.rsplit("@", 1)[0].partition(":")[2]
                assert re.fullmatch(r"<\w+>", password), f"{path}: literal password in {url}"
                checked += 1
    assert checked >= 6  # 4 password variables, 2 database URLs
    # Secrets are required (${VAR:?...}), never defaulted to something guessable.
    for m in _VAR.finditer(COMPOSE.read_text()):
        if not m.group(1) and SECRET_NAME.search(m.group(2) or m.group(5)):
            assert m.group(3) == ":?", m.group(0)


def test_secrets_must_be_set():
    env = read_env_file(ENV_EXAMPLE)
    for secret in ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"):
        with pytest.raises(MissingVariable, match=secret):
            compose({k: v for k, v in env.items() if k != secret})
        with pytest.raises(MissingVariable, match=secret):
            compose({**env, secret: ""})


def test_volumes_are_named_and_files_come_from_configs(stack):
    declared = set(stack["volumes"])
    used = set()
    for name, svc in stack["services"].items():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":", 1)[0]
            if isinstance(vol, dict):
                assert vol.get("type", "volume") == "volume", (name, vol)
            assert source in declared, f"{name}: {vol} is not a named volume"
            used.add(source)
        for cfg in svc.get("configs", []):
            assert cfg["source"] in stack["configs"], (name, cfg)
    assert used == declared
    for cfg in stack["configs"].values():
        assert (ROOT / cfg["file"]).is_file(), cfg


def test_worker_reserves_the_gpus_only_in_the_gpu_profile(services):
    gpu, cpu = services["worker-gpu"], services["worker"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in cpu
    for key in ("command", "environment", "volumes", "healthcheck", "depends_on"):
        assert gpu[key] == cpu[key], key
    args = argv(cpu["command"])
    assert args[:3] == ["prefect", "worker", "start"]
    assert option(args, "--pool") == "layerwise" and option(args, "--type") == "process"
    assert "--with-healthcheck" in args
    port = cpu["environment"]["PREFECT_WORKER_WEBSERVER_PORT"]
    assert f"127.0.0.1:{port}/health" in " ".join(cpu["healthcheck"]["test"])
    assert cpu["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert read_env_file(ENV_EXAMPLE)["COMPOSE_PROFILES"] in ("cpu", "gpu")


def dockerfile_env() -> dict[str, str]:
    """The image's ENV variables (one ``ENV`` instruction of ``KEY=VALUE`` items)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ENV ")]
    return dict(item.split("=", 1) for item in shlex.split(line[4:]))


def flow_run_env(services: dict[str, Any]) -> dict[str, str]:
    """prefect.yaml's job-variable ``env`` as the compose ``deployments`` service registers
    it: ``{{ $VAR }}`` filled in from the image's ENV and the service's environment."""
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = doc["deployments"]
    values = {**dockerfile_env(), **services["deployments"]["environment"]}
    return {k: re.sub(r"\{\{ \$(\w+) \}\}", lambda m: values.get(m[1], m[0]), v)
            for k, v in deployment["work_pool"]["job_variables"]["env"].items()}


def test_flow_runs_get_their_environment_from_the_deployment(services):
    """Whatever worker runs it, a flow run gets the stores, data and MLflow server from
    prefect.yaml's job variables; in the stack, the paths are the worker's volumes."""
    env, mounts = flow_run_env(services), services["worker"]["volumes"]
    assert not [v for v in env.values() if "{{" in v], env  # every variable is set
    targets = {v.split(":", 1)[1] for v in mounts}
    for key in ("LAYERWISE_HOME", "LAYERWISE_DATA_DIR"):
        assert env[key] in targets, key
    assert env["PREFECT_LOCAL_STORAGE_PATH"].startswith(env["LAYERWISE_HOME"] + "/")
    assert env["PYTHONPYCACHEPREFIX"].startswith(env["LAYERWISE_HOME"] + "/")  # not in /app
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["LAYERWISE_APP_DIR"] == "/app"
    # the worker itself sets none of them: one place, the same values for every worker
    assert not set(env) & set(services["worker"]["environment"])


def _url_parts(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port, parts.path.lstrip("/")


def test_mlflow_server_command(services):
    svc = services["mlflow"]
    args = argv(svc["command"])
    assert args[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in args and "--no-serve-artifacts" not in args
    destination = option(args, "--artifacts-destination")
    assert any(v.split(":", 1)[1] == destination for v in svc["volumes"])
    assert "--default-artifact-root" not in args  # new experiments use mlflow-artifacts:/
    # The driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2.
    assert _url_parts(option(args, "--backend-store-uri")) == ("postgresql+psycopg2",
                                                               "postgres", 5432, "mlflow")
    hosts = set(option(args, "--allowed-hosts").split(","))
    port = read_env_file(ENV_EXAMPLE)["MLFLOW_PORT"]
    assert {"mlflow", "mlflow:5000", "localhost", f"localhost:{port}", "127.0.0.1",
            f"127.0.0.1:{port}"} <= hosts
    assert "*" not in hosts
    assert option(args, "--port") == "5000" and "127.0.0.1:5000/health" in " ".join(
        svc["healthcheck"]["test"])
    assert "--app-name" not in args  # logins are opt-in


def test_mlflow_basic_auth_switch():
    env = {**read_env_file(ENV_EXAMPLE), "MLFLOW_AUTH_ARGS": "--app-name basic-auth"}
    svc = compose(env)["services"]["mlflow"]
    args = argv(svc["command"])
    assert option(args, "--app-name") == "basic-auth"
    ini_target = svc["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    cfg = next(c for c in svc["configs"] if c["target"] == ini_target)
    parser = configparser.ConfigParser()
    parser.read(ROOT / compose(env)["configs"][cfg["source"]]["file"])
    assert "admin_password" not in parser["mlflow"]  # it comes from .env
    db = parser["mlflow"]["database_uri"]
    assert db.startswith("sqlite:////")
    auth_dir = str(Path(db[len("sqlite:///"):]).parent)
    assert any(v.split(":", 1)[1] == auth_dir for v in svc["volumes"])
    assert svc["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    worker = compose(env)["services"]["worker"]["environment"]
    assert worker["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]


def test_prefect_server_uses_postgres(services):
    svc = services["prefect-server"]
    args = argv(svc["command"])
    assert args[:3] == ["prefect", "server", "start"]
    assert option(args, "--host") == "0.0.0.0" and option(args, "--port") == "4200"
    urls = [v for k, v in svc["environment"].items()
            if k in ("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                     "PREFECT_API_DATABASE_CONNECTION_URL")]
    assert len(urls) == 1
    assert _url_parts(urls[0]) == ("postgresql+asyncpg", "postgres", 5432, "prefect")
    port = read_env_file(ENV_EXAMPLE)["PREFECT_PORT"]
    assert svc["environment"]["PREFECT_SERVER_UI_API_URL"] == f"http://127.0.0.1:{port}/api"


def test_init_script_creates_the_databases_the_servers_use(stack):
    sql = (ROOT / stack["configs"]["postgres-databases"]["file"]).read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+);", sql))
    target = next(c["target"] for c in stack["services"]["postgres"]["configs"])
    assert target.startswith("/docker-entrypoint-initdb.d/") and target.endswith(".sql")
    used = {_url_parts(option(argv(stack["services"]["mlflow"]["command"]),
                              "--backend-store-uri"))[3],
            _url_parts(stack["services"]["prefect-server"]["environment"][
                "PREFECT_SERVER_DATABASE_CONNECTION_URL"])[3]}
    assert created == used == {"prefect", "mlflow"}
    check = " ".join(stack["services"]["postgres"]["healthcheck"]["test"])
    assert "-h 127.0.0.1" in check and all(f"-d {db}" in check for db in created)


def test_env_example_defines_every_variable_with_placeholders():
    used = variables_used(COMPOSE.read_text())
    env = read_env_file(ENV_EXAMPLE)
    assert used <= set(env), f"missing from .env.example: {sorted(used - set(env))}"
    assert used >= {"POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD"}
    for key, value in env.items():
        if SECRET_NAME.search(key):
            assert value.startswith("change-me"), f"{key} in .env.example must be a placeholder"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# ---------------------------------------------------------------- image and deployments

def test_dockerfile():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    assert "pip install -c constraints.txt ." in text
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert re.search(rf"useradd .*\b{users[-1]}\b", text)
    workdir = [ln.split()[1] for ln in lines if ln.startswith("WORKDIR ")][-1]
    assert re.search(rf"LAYERWISE_APP_DIR={re.escape(workdir)}\b", text)


def test_dockerignore_keeps_secrets_and_stores_out_but_the_code_in():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".env", ".git", ".venv", "mlruns", "data"} <= patterns
    for needed in ("flows", "tasks", "models", "pyproject.toml", "constraints.txt",
                   "README.md", "prefect.yaml"):
        assert needed not in patterns and f"{needed}/" not in patterns, needed


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_image_has_what_the_servers_need():
    """`pip install -c constraints.txt .` must bring the servers' extras: asyncpg (Prefect on
    Postgres), psycopg2 (MLflow on Postgres) and Flask-WTF (MLflow's basic-auth app, which
    the runs/search handler imports even without logins)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", d, 1)[0].lower() for d in deps}
    assert "psycopg2-binary" in names, "add psycopg2-binary to [project].dependencies"
    mlflow = next(d for d in deps if re.match(r"mlflow\b", d, re.I))
    assert "flask-wtf" in names or re.match(r"mlflow\[[^]]*\bauth\b", mlflow), \
        "depend on mlflow[auth]"
    assert {"asyncpg", "psycopg2-binary", "flask-wtf"} <= set(_pins())


def test_sqlalchemy_is_pinned_below_2_1():
    """Prefect 3.8.8's scheduler cannot insert scheduled runs with SQLAlchemy 2.1 (its
    hybrid properties in bulk INSERTs raise "Can't evaluate bulk DML statement"), so no
    schedule would ever fire on the server."""
    major, minor = (int(x) for x in _pins()["sqlalchemy"].split(".")[:2])
    assert (major, minor) < (2, 1)


@pytest.fixture(scope="module")
def nightly() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = doc["deployments"]
    return {"doc": doc, **deployment}


def test_prefect_yaml_targets_the_compose_work_pool(nightly, services):
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline"
    path, _, name = nightly["entrypoint"].partition(":")
    assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M)
    assert nightly["work_pool"]["name"] == option(argv(services["worker"]["command"]), "--pool")
    assert nightly["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]
    (step,) = nightly["doc"]["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory":
                    {"directory": "{{ $LAYERWISE_APP_DIR }}"}}
    deploy = argv(services["deployments"]["command"])
    assert "prefect --no-prompt deploy --all" in " ".join(deploy)
    assert "prefect work-pool create layerwise --type process" in " ".join(deploy)


def test_prefect_yaml_parameters_are_the_default_preset(nightly):
    params = nightly["parameters"]
    assert params == {"preset": "default", "overrides": [], "experiment": "layerwise",
                      "registered_model_name": "layerwise-classifier"}
    assert not any(t.startswith("preset:") for t in nightly["tags"])  # a run may use another
    import ast

    tree = ast.parse((ROOT / "flows" / "pipeline.py").read_text())
    flow = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "pipeline")
    assert set(params) <= {a.arg for a in flow.args.args + flow.args.kwonlyargs}


def test_flow_parameters_resolve_like_layerwise_run(tmp_path):
    """preset + overrides give exactly `layerwise run --preset P --set ...`'s config; a
    complete config records where it differs from the preset it names; a partial config,
    an unknown field or both forms at once are refused, naming the problem."""
    from config.overrides import resolve_config
    from config.parameters import complete, resolve_flow_config
    from config.stages import PipelineConfig
    from runtime.errors import ConfigError

    sets = ["data.n_train=1000", "model.hidden_sizes=[32,16]"]
    config, preset, recorded = resolve_flow_config(None, "quick", sets)
    assert config == resolve_config("quick", sets=sets) and preset == "quick"
    assert recorded == sets
    assert resolve_flow_config(None, None, [])[:2] == (resolve_config("default"), "default")

    full = json.loads(json.dumps(resolve_config("default").model_dump(mode="json")))
    del full["data"]["data_dir"]  # filled in where the flow runs
    config, preset, recorded = resolve_flow_config(PipelineConfig.model_validate(full),
                                                   "quick", [])
    assert config == resolve_config("default") and preset == "quick"
    assert "data.n_train=null" in recorded and "model.hidden_sizes=[1000, 1000, 1000]" in \
        recorded  # the run says it is not the quick preset
    assert resolve_flow_config(complete(resolve_config("quick")), "quick", [])[2] == []

    from cli.schedule import flow_parameters  # the model a deployment registers: as `run`'s
    for objective, model in (("classify", "layerwise-classifier"),
                             ("reconstruct", "layerwise-autoencoder")):
        cfg = resolve_config("quick", sets=[f"objective={objective}"])
        params = flow_parameters("pipeline", cfg, "quick", None, "e", "layerwise-classifier")
        assert params["registered_model_name"] == model
        assert flow_parameters("pipeline", cfg, "quick", None, "e",
                               "mine")["registered_model_name"] == "mine"

    partial = PipelineConfig.model_validate({"pretrain": {"epochs": 2}})
    with pytest.raises(ConfigError, match=r"lacks objective, data, model, pretrain\.batch_size, .* and "
                                          r"5 more.*layerwise config --format json"):
        resolve_flow_config(partial, "quick", [])
    with pytest.raises(ConfigError, match="pretrain.epochs = 0"):
        resolve_flow_config(None, "quick", ["pretrain.epochs=0"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve_flow_config(None, "nope", [])
    with pytest.raises(ConfigError, match="not both"):
        resolve_flow_config(complete(resolve_config("quick")), "quick", sets)


def test_config_prints_a_complete_json_config():
    """`layerwise config --format json` is a config the flow accepts as complete."""
    from typer.testing import CliRunner

    from cli.main import app
    from config.overrides import resolve_config
    from config.parameters import missing_fields, resolve_flow_config
    from config.stages import PipelineConfig

    out = CliRunner().invoke(app, ["config", "--preset", "quick", "--format", "json"])
    assert out.exit_code == 0, out.output
    config = PipelineConfig.model_validate(json.loads(out.stdout))
    assert missing_fields(config) == [] and config == resolve_config("quick")
    assert resolve_flow_config(config, "quick", [])[2] == []
    bad = CliRunner().invoke(app, ["config", "--format", "xml"])
    assert bad.exit_code == 2 and "choose yaml or json" in bad.output


def test_documents_the_stack_files_point_to_exist():
    """docker-compose.yml, prefect.yaml, the Dockerfile and the README name docs/*.md files
    that are in the repository."""
    named = set()
    for name in ("docker-compose.yml", "prefect.yaml", "Dockerfile", "README.md"):
        named |= set(re.findall(r"docs/[\w./-]+\.md", (ROOT / name).read_text()))
    assert "docs/service.md" in named
    assert [n for n in sorted(named) if not (ROOT / n).is_file()] == []


def test_make_deploy_runs_the_deployments_service_command(services):
    """`make deploy` from a checkout does what the compose `deployments` service does (and
    tests/test_servers.py runs against a fresh server): create the work pool only when it is
    missing, then register prefect.yaml."""
    recipe = (ROOT / "Makefile").read_text().split("\ndeploy: $(STAMP)", 1)[1]
    recipe = recipe.split("\n\n", 1)[0]
    lines = [ln.strip().replace("$(VENV)/bin/", "") for ln in recipe.splitlines()[1:]
             if not ln.strip().startswith("@test -n")]  # the checks of its environment
    (script,) = [a for a in argv(services["deployments"]["command"]) if "deploy --all" in a]
    steps = [s.strip().removeprefix("exec ") for s in script.split(";")]
    assert lines == [steps[0].replace("\n", " "), steps[1]]
