"""Static checks of infra/deploy: the files parse and validate against their tools' schemas, and
they agree with the code they deploy (topic catalogue, Settings, CLI roles, metric names).

Nothing here starts a container; ``docker-compose config`` needs no Docker engine.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from infra.cli import build_parser
from infra.settings import Settings
from infra.vectors.retry import GIVE_UPS, RECOVERIES, RETRIES
from schemas.topics import ALL_TOPICS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "infra" / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "recstream.json"
CPU_DOCKERFILE = DEPLOY / "Dockerfile"
GPU_DOCKERFILE = DEPLOY / "Dockerfile.gpu"

ENV_PREFIX = str(Settings.model_config["env_prefix"])
ENV_DELIMITER = str(Settings.model_config["env_nested_delimiter"])
#: What compose takes from the operator's environment, with stand-ins for these tests.
COMPOSE_SECRETS = {"QDRANT_API_KEY": "test-qdrant-key", "GRAFANA_ADMIN_PASSWORD": "test-admin"}
#: The Secret keys the k8s Deployments reference, with stand-ins for these tests.
K8S_SECRETS = {"kafka-sasl-password": "test-sasl-password", "qdrant-api-key": "test-qdrant-key"}
#: The metric names the workers publish (counters, gauges, histograms), and retry.py's own.
METRICS = {
    "recstream_events_total",
    "recstream_consumer_lag",
    "recstream_event_to_recommendation_seconds",
    "recstream_dead_letters_total",
    "recstream_encoder_batch_size",
    "recstream_encoder_texts_total",
    "recstream_vector_store_seconds",
    "recstream_model_info",
    RETRIES,
    RECOVERIES,
    GIVE_UPS,
}
HISTOGRAMS = {
    "recstream_event_to_recommendation_seconds",
    "recstream_encoder_batch_size",
    "recstream_vector_store_seconds",
}
ROLES = ("ingest", "recommend", "encoder")


# -- readers ----------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def _compose() -> dict[str, Any]:
    """compose.yaml as written (anchors and merge keys resolved, ``${...}`` not interpolated)."""
    return dict(yaml.safe_load(COMPOSE.read_text()))


def _services() -> dict[str, dict[str, Any]]:
    return dict(_compose()["services"])


def _workers() -> dict[str, dict[str, Any]]:
    """The compose services built from our Dockerfiles, by role."""
    workers = {}
    for name, service in _services().items():
        if "build" in service:
            assert name.startswith("recstream-"), name
            workers[name.removeprefix("recstream-")] = service
    return workers


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${X}``, ``${X:-default}``, ``${X:?error}``, ``$$``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        raise KeyError(f"{name} is unset: {arg}")

    value = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", one, value)
    return value.replace("$$", "$")


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _base_images(instructions: list[tuple[str, str]]) -> list[str]:
    """Each stage's base image, with the global ARG defaults substituted."""
    args: dict[str, str] = {}
    images: list[str] = []
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest and not images:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def _image_env(path: Path) -> dict[str, str]:
    """The ENV of the final stage (``KEY=VALUE`` pairs)."""
    env = {}
    for keyword, rest in _final_stage(_dockerfile(path)):
        if keyword == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    found = [rest for kw, rest in instructions if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return list(json.loads(found[0]))


def _pip_installs(path: Path) -> list[str]:
    return [
        rest for keyword, rest in _dockerfile(path) if keyword == "RUN" and "pip install" in rest
    ]


def _torch_pin() -> str:
    """The torch version pyproject.toml's worker extra pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    worker = project["optional-dependencies"]["worker"]
    pins = [dep.split("==")[1] for dep in worker if dep.startswith("torch==")]
    assert len(pins) == 1
    return str(pins[0])


def _k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in _yaml_docs(path):
                yield path, doc


def _k8s(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _k8s_docs() if doc["kind"] == kind}


def _configmap() -> dict[str, str]:
    return dict(_k8s("ConfigMap")["recstream-settings"]["data"])


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _pod_env(deployment: dict[str, Any]) -> dict[str, str]:
    """What a pod's worker sees: the ConfigMap, then the container's env with secret stand-ins."""
    container = _container(deployment)
    assert container["envFrom"] == [{"configMapRef": {"name": "recstream-settings"}}]
    env = _configmap()
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:  # the downward API: the pod's own IP, say
            env[var["name"]] = "10.0.0.7"
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "recstream-credentials"
            env[var["name"]] = K8S_SECRETS[ref["key"]]
    return env


def _field(name: str) -> FieldInfo:
    """The Settings field an environment variable sets, walked through the nested models."""
    assert name.startswith(ENV_PREFIX), name
    parts = name.removeprefix(ENV_PREFIX).lower().split(ENV_DELIMITER)
    model: type[BaseModel] = Settings
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        assert field is not None, f"{name}: {part!r} is not a field of {model.__name__}"
        nested = field.annotation
        is_model = isinstance(nested, type) and issubclass(nested, BaseModel)
        if depth == len(parts) - 1:
            assert not is_model, f"{name} names the section {part!r}, not one setting"
            return field
        assert is_model, f"{name}: {part!r} is a setting, not a section"
        model = typing.cast(type[BaseModel], nested)
    raise AssertionError(name)


def _is_secret(field: FieldInfo) -> bool:
    return SecretStr in (field.annotation, *typing.get_args(field.annotation))


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings built the way a worker builds them, from exactly ``env``."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    return Settings()


def _compose_worker_env(role: str) -> dict[str, str]:
    """A compose worker's environment: its image's ENV, then the service's, interpolated."""
    service = _workers()[role]
    env = _image_env(DEPLOY / service["build"]["dockerfile"].removeprefix("infra/deploy/"))
    env.update(
        {k: _interpolate(str(v), COMPOSE_SECRETS) for k, v in service["environment"].items()}
    )
    return env


def _docker_compose(
    *args: str, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """docker-compose on compose.yaml with exactly ``env`` as substitution source."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (make deploy-tools installs it)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    return subprocess.run(
        [binary, "--env-file", str(empty), "-f", str(COMPOSE), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# -- every file parses and validates -----------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    """Every YAML file under infra/deploy parses into mappings, and the dashboard JSON parses."""
    found = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")}
    assert found == {
        "compose.yaml",
        "prometheus/prometheus.yml",
        "grafana/provisioning/datasources/prometheus.yaml",
        "grafana/provisioning/dashboards/recstream.yaml",
        "k8s/kustomization.yaml",
        "k8s/namespace.yaml",
        "k8s/serviceaccount.yaml",
        "k8s/configmap.yaml",
        "k8s/ingest.yaml",
        "k8s/recommend.yaml",
        "k8s/encoder.yaml",
    }
    for name in found:
        docs = _yaml_docs(DEPLOY / name)
        assert docs, name
        assert all(isinstance(doc, dict) for doc in docs), name
    assert json.loads(DASHBOARD.read_text())["uid"] == "recstream-overview"


def test_docker_compose_config_accepts_the_stack(tmp_path: Path) -> None:
    """`docker-compose config` validates compose.yaml and keeps every service, the workers'
    builds and the encoder's GPU reservation through its normalisation."""
    result = _docker_compose("config", env=COMPOSE_SECRETS, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {
        *(f"kafka-{n}" for n in (1, 2, 3)),
        "kafka-topics",
        *(f"qdrant-{n}" for n in (1, 2, 3)),
        *(f"recstream-{role}" for role in ROLES),
        "prometheus",
        "grafana",
    }
    encoder = config["services"]["recstream-encoder"]
    assert encoder["build"]["dockerfile"] == "infra/deploy/Dockerfile.gpu"
    assert Path(encoder["build"]["context"]) == ROOT
    devices = encoder["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "count": 1, "driver": "nvidia"}]
    for role in ("ingest", "recommend"):
        assert config["services"][f"recstream-{role}"]["build"]["dockerfile"] == (
            "infra/deploy/Dockerfile"
        )
    api_key = config["services"]["recstream-recommend"]["environment"]["RECSTREAM_VECTORS__API_KEY"]
    assert api_key == COMPOSE_SECRETS["QDRANT_API_KEY"]


def test_docker_compose_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    """No credential has a default: without QDRANT_API_KEY, then without GRAFANA_ADMIN_PASSWORD,
    `docker-compose config` fails and names the missing variable."""
    no_qdrant = {"GRAFANA_ADMIN_PASSWORD": "x"}
    result = _docker_compose("config", "-q", env=no_qdrant, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "set QDRANT_API_KEY" in result.stderr
    no_grafana = {"QDRANT_API_KEY": "x"}
    result = _docker_compose("config", "-q", env=no_grafana, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "set GRAFANA_ADMIN_PASSWORD" in result.stderr


@pytest.mark.parametrize("version", ["1.29", kubernetes_validate.utils.latest_version()])
def test_kubernetes_manifests_validate_against_the_openapi_schemas(version: str) -> None:
    """Every manifest validates, strictly (no unknown fields), against the Kubernetes OpenAPI
    schemas shipped by kubernetes-validate, for 1.29 and the newest release it knows."""
    kinds = []
    for path, doc in _k8s_docs():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc}")
        kinds.append((doc["kind"], doc["metadata"]["name"]))
    workers = [f"recstream-{role}" for role in ROLES]
    assert sorted(kinds) == sorted(
        [("Namespace", "recstream"), ("ServiceAccount", "recstream")]
        + [("ConfigMap", "recstream-settings")]
        + [
            (kind, name)
            for kind in ("Deployment", "Service", "PodDisruptionBudget")
            for name in workers
        ]
        + [("HorizontalPodAutoscaler", "recstream-recommend")]
    )


def test_kustomization_lists_every_manifest_in_one_namespace() -> None:
    """kustomization.yaml includes every manifest file, and every namespaced object sits in the
    namespace it declares."""
    kustomization = _yaml_docs(K8S / "kustomization.yaml")[0]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    namespace = kustomization["namespace"]
    assert _k8s("Namespace").keys() == {namespace}
    for _, doc in _k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


# -- parity with the code -----------------------------------------------------------------------


def test_compose_creates_exactly_the_catalogue_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kafka-topics job creates each topic of schemas/topics.py, and no other, with its
    cleanup policy, the workers' partition count and their replication factor."""
    script = _services()["kafka-topics"]["command"][0]
    created = {
        m.group(1): (int(m.group(2)), m.group(3))
        for m in re.finditer(
            r"^create --topic (\S+) --partitions (\d+) --config cleanup\.policy=(\w+)$",
            script,
            re.MULTILINE,
        )
    }
    assert len(re.findall(r"^create ", script, re.MULTILINE)) == len(created)
    kafka = _settings_from(_compose_worker_env("recommend"), monkeypatch).kafka
    assert kafka.partitions == 12
    assert created == {spec.name: (kafka.partitions, spec.cleanup) for spec in ALL_TOPICS}
    replication = re.findall(r"--replication-factor (\d+)", script)
    assert replication == [str(kafka.replication_factor)] == ["3"]


def test_compose_kafka_is_a_three_broker_kraft_quorum() -> None:
    """Three brokers, each broker and controller, vote in one quorum; new topics default to three
    replicas with two in sync, and nothing creates a topic by accident."""
    brokers = {
        name: s["environment"] for name, s in _services().items() if re.fullmatch(r"kafka-\d", name)
    }
    assert len(brokers) == 3
    voters = {f"{env['KAFKA_NODE_ID']}@{name}:9093" for name, env in brokers.items()}
    for env in brokers.values():
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    bootstrap = _compose_worker_env("ingest")["RECSTREAM_BOOTSTRAP_SERVERS"]
    assert bootstrap == ",".join(f"{name}:9092" for name in sorted(brokers))


def test_compose_qdrant_is_a_replicated_three_node_cluster() -> None:
    """Three Qdrant peers run in cluster mode, the second and third bootstrap from the first, new
    collections get two replicas, and the workers' URL is an alias every node answers to."""
    nodes = {name: s for name, s in _services().items() if re.fullmatch(r"qdrant-\d", name)}
    assert sorted(nodes) == ["qdrant-1", "qdrant-2", "qdrant-3"]
    for name, node in nodes.items():
        env = node["environment"]
        assert env["QDRANT__CLUSTER__ENABLED"] == "true"
        assert env["QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR"] == "2"
        p2p = env["QDRANT__CLUSTER__P2P__PORT"]
        own_uri = ["--uri", f"http://{name}:{p2p}"]
        join = [] if name == "qdrant-1" else ["--bootstrap", f"http://qdrant-1:{p2p}"]
        assert node["command"] == join + own_uri
        assert node["networks"]["default"]["aliases"] == ["qdrant"]
    url = _compose_worker_env("recommend")["RECSTREAM_QDRANT_URL"]
    assert url == "http://qdrant:6333"


def test_every_recstream_variable_is_a_settings_field() -> None:
    """Each RECSTREAM_* name in compose, the Dockerfiles and the k8s manifests, split at the
    prefix and the nested delimiter, walks to one real field of infra.settings.Settings."""
    names = set(_image_env(CPU_DOCKERFILE)) | set(_image_env(GPU_DOCKERFILE))
    for role in ROLES:
        names |= set(_compose_worker_env(role))
    for deployment in _k8s("Deployment").values():
        names |= set(_pod_env(deployment))
    names = {name for name in names if name.startswith(ENV_PREFIX)}
    assert {"RECSTREAM_KAFKA__PARTITIONS", "RECSTREAM_STREAM__WEB_PORT"} <= names
    assert len(names) >= 15
    for name in sorted(names):
        _field(name)


@pytest.mark.parametrize("role", ROLES)
def test_settings_load_from_a_compose_workers_environment(
    role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compose worker's environment builds valid Settings with the intended values."""
    settings = _settings_from(_compose_worker_env(role), monkeypatch)
    assert settings.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092,kafka-3:9092"
    assert (settings.kafka.partitions, settings.kafka.replication_factor) == (12, 3)
    assert settings.vectors.url == "http://qdrant:6333"
    assert settings.vectors.api_key is not None
    assert settings.vectors.api_key.get_secret_value() == COMPOSE_SECRETS["QDRANT_API_KEY"]
    assert (settings.stream.web_host, settings.stream.web_port) == ("0.0.0.0", 6066)
    assert settings.data_dir == Path("/var/lib/recstream")
    assert settings.log_json is True
    assert settings.encoder.device == ("cuda" if role == "encoder" else "auto")


@pytest.mark.parametrize("role", ROLES)
def test_settings_load_from_a_k8s_pods_environment(
    role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A k8s pod's ConfigMap plus Secret references builds valid Settings: SASL over TLS with the
    password from the Secret, and the Qdrant key only where the role opens the vector store."""
    deployment = _k8s("Deployment")[f"recstream-{role}"]
    settings = _settings_from(_pod_env(deployment), monkeypatch)
    kafka = settings.kafka
    assert (kafka.security_protocol, kafka.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert kafka.sasl_password is not None
    assert kafka.sasl_password.get_secret_value() == K8S_SECRETS["kafka-sasl-password"]
    assert (kafka.partitions, kafka.replication_factor) == (12, 3)
    assert str(settings.vectors.url).startswith("https://")
    api_key = settings.vectors.api_key
    if role == "ingest":
        assert api_key is None
    else:
        assert api_key is not None
        assert api_key.get_secret_value() == K8S_SECRETS["qdrant-api-key"]
    assert settings.encoder.device == ("cuda" if role == "encoder" else "auto")


def test_credentials_come_only_from_secrets() -> None:
    """Every SecretStr setting a pod gets comes from a Secret reference; the ConfigMap, compose's
    literal values and the images' ENV hold no secret-typed setting."""
    for name in _configmap():
        assert not _is_secret(_field(name)), f"{name} is a secret but sits in the ConfigMap"
    for path in (CPU_DOCKERFILE, GPU_DOCKERFILE):
        for name in _image_env(path):
            if name.startswith(ENV_PREFIX):
                assert not _is_secret(_field(name)), f"{path.name} bakes in {name}"
    for role, service in _workers().items():
        for name, value in service["environment"].items():
            if _is_secret(_field(name)):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{role}: {name}"
    for deployment in _k8s("Deployment").values():
        for var in _container(deployment).get("env", []):
            if not var["name"].startswith(ENV_PREFIX):
                assert "fieldRef" in var["valueFrom"], var["name"]  # only pod facts, no secrets
                continue
            secret_ref = "secretKeyRef" in var.get("valueFrom", {})
            assert _is_secret(_field(var["name"])) == secret_ref, var["name"]


def test_worker_commands_parse_as_cli_roles() -> None:
    """Each compose worker and k8s Deployment runs its image's ENTRYPOINT (`recstream worker`)
    with arguments the real CLI parser accepts, as the role its name says."""
    entrypoints = {
        "infra/deploy/Dockerfile": _exec_form(_dockerfile(CPU_DOCKERFILE), "ENTRYPOINT"),
        "infra/deploy/Dockerfile.gpu": _exec_form(_dockerfile(GPU_DOCKERFILE), "ENTRYPOINT"),
    }
    parser = build_parser()
    for role, service in _workers().items():
        argv = entrypoints[service["build"]["dockerfile"]] + service["command"]
        assert argv[0] == "recstream"
        args = parser.parse_args(argv[1:])
        assert (args.command, args.role) == ("worker", role)
    images = {"recstream": entrypoints["infra/deploy/Dockerfile"]}
    images["recstream-gpu"] = entrypoints["infra/deploy/Dockerfile.gpu"]
    for name, deployment in _k8s("Deployment").items():
        container = _container(deployment)
        argv = images[container["image"].split(":")[0]] + container["args"]
        args = parser.parse_args(argv[1:])
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        assert (args.command, args.role) == ("worker", component)
        assert name == f"recstream-{component}"


def test_prometheus_scrapes_every_worker_on_its_web_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prometheus has one job per worker role, discovering that compose service's replicas on
    the port its Settings give the web server, at /metrics."""
    config = _yaml_docs(PROMETHEUS)[0]
    scraped = {}
    for job in config["scrape_configs"]:
        assert job["metrics_path"] == "/metrics"
        [sd] = job["dns_sd_configs"]
        [service] = sd["names"]
        scraped[service] = sd["port"]
        assert job["job_name"] == service
    assert set(scraped) == {f"recstream-{role}" for role in _workers()}
    for role in _workers():
        port = _settings_from(_compose_worker_env(role), monkeypatch).stream.web_port
        assert scraped[f"recstream-{role}"] == port == 6066


def test_grafana_dashboard_charts_every_published_metric_and_no_other() -> None:
    """Every query in the dashboard names only the workers' metric names (histograms through
    _bucket/_sum/_count), each of them is charted, and it reads the provisioned datasource."""
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets
    used = set()
    for target in targets:
        for name in re.findall(r"\brecstream_[a-z0-9_]+", target["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name:
                assert base in HISTOGRAMS, f"{name}: {base} is not a histogram"
            used.add(base)
    assert used == METRICS
    [datasource] = _yaml_docs(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")[0][
        "datasources"
    ]
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for t in targets}
    assert uids == {datasource["uid"]}
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = _yaml_docs(GRAFANA / "provisioning" / "dashboards" / "recstream.yaml")[0][
        "providers"
    ]
    mounts = _services()["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


# -- images ----------------------------------------------------------------------------------------


def test_gpu_image_is_cuda_and_the_encoder_gets_a_gpu() -> None:
    """Dockerfile.gpu builds and runs on an NVIDIA CUDA image and installs the pinned torch from
    PyTorch's CUDA index; compose reserves an nvidia GPU and k8s requests one for the encoder."""
    instructions = _dockerfile(GPU_DOCKERFILE)
    images = _base_images(instructions)
    assert len(images) == 2
    assert all(image.startswith("nvidia/cuda:") for image in images), images
    [cuda] = [rest for kw, rest in instructions if kw == "ARG" and rest.startswith("TORCH_CUDA=")]
    [torch] = [run for run in _pip_installs(GPU_DOCKERFILE) if "torch==" in run]
    torch = torch.replace("${TORCH_CUDA}", cuda.removeprefix("TORCH_CUDA="))
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+ ", torch), torch
    assert f"torch=={_torch_pin()}" in torch.split()
    devices = _workers()["encoder"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    deployment = _k8s("Deployment")["recstream-encoder"]
    assert _container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_cpu_image_takes_the_cpu_build_of_torch() -> None:
    """Dockerfile starts from no CUDA image and installs the pinned torch from PyTorch's CPU
    index before the worker extra, so pip never resolves the CUDA build; no CUDA index appears."""
    instructions = _dockerfile(CPU_DOCKERFILE)
    assert not any("nvidia" in image or "cuda" in image for image in _base_images(instructions))
    installs = _pip_installs(CPU_DOCKERFILE)
    torch = [i for i, run in enumerate(installs) if "torch==" in run]
    worker = [i for i, run in enumerate(installs) if '".[worker]"' in run]
    assert len(torch) == 1
    assert len(worker) == 1
    assert torch[0] < worker[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[torch[0]]
    assert f"torch=={_torch_pin()}" in installs[torch[0]].split()
    assert not re.search(r"whl/cu\d+", CPU_DOCKERFILE.read_text())


@pytest.mark.parametrize("dockerfile", [CPU_DOCKERFILE, GPU_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_runs_the_worker_unprivileged_with_a_healthcheck(dockerfile: Path) -> None:
    """The final stage runs `recstream worker` as a non-root user, checks /healthz on the web
    port it exposes, fetches nothing with ADD, and declares no credential."""
    instructions = _dockerfile(dockerfile)
    assert len(_base_images(instructions)) >= 2  # multi-stage
    final = _final_stage(instructions)
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert _exec_form(final, "ENTRYPOINT") == ["recstream", "worker"]
    [healthcheck] = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert "RECSTREAM_STREAM__WEB_PORT" in healthcheck
    env = _image_env(dockerfile)
    assert [rest for keyword, rest in final if keyword == "EXPOSE"] == [
        env["RECSTREAM_STREAM__WEB_PORT"]
    ]
    assert env["RECSTREAM_STREAM__WEB_HOST"] == "0.0.0.0"
    for keyword, rest in instructions:
        assert not (keyword == "ADD" and re.search(r"\bhttps?://", rest)), rest
        if keyword in {"ENV", "ARG"}:
            assert not re.search(r"PASSWORD|API_KEY|SECRET|TOKEN|PSEUDONYM_KEY", rest), rest


# -- k8s workloads ---------------------------------------------------------------------------------


def test_k8s_workers_have_probes_resources_and_budgets() -> None:
    """Each Deployment probes /healthz (liveness) and /readyz (readiness) on the web port the
    ConfigMap sets, has CPU and memory requests and limits, and a Service and PDB select it."""
    port = int(_configmap()["RECSTREAM_STREAM__WEB_PORT"])
    services, budgets = _k8s("Service"), _k8s("PodDisruptionBudget")
    for name, deployment in _k8s("Deployment").items():
        container = _container(deployment)
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        assert services[name]["spec"]["selector"] == labels
        assert services[name]["spec"]["ports"][0]["port"] == port
        assert budgets[name]["spec"]["selector"]["matchLabels"] == labels


def test_recommend_autoscaler_stays_within_the_partition_count() -> None:
    """The HPA scales the recommend Deployment (which leaves replicas to it) between at least one
    replica and no more than the topics' partitions, past which workers would sit idle."""
    [hpa] = _k8s("HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "recstream-recommend")
    assert "replicas" not in _k8s("Deployment")["recstream-recommend"]["spec"]
    partitions = int(_configmap()["RECSTREAM_KAFKA__PARTITIONS"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"] == partitions
