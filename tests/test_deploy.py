"""The deployable files in deploy/ stay in step with the code: every flag, setting and option they
name exists and validates, the probes and timeouts fit the server's drain, and the Serve config and
the RayService's embedded application agree. With the ray extra installed, both also validate
against Serve's own schema and build the application."""

from __future__ import annotations

import configparser
import importlib.util
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from talora.server.backends.ray.support import RayOptions
from talora.server.cli import build_parser
from talora.server.http.server import DRAIN_MARGIN_S
from talora.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MOUNT = "/mnt/adapters"


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def serve_configs() -> dict[str, dict]:
    """The Serve config file, and the one embedded in the RayService."""
    (service,) = load_yaml(DEPLOY / "ray" / "rayservice.yaml")
    return {"serve.yaml": load_yaml(DEPLOY / "ray" / "serve.yaml")[0],
            "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}


def local_paths(args: dict, folder: Path) -> dict:
    """``args`` with the cluster's mount replaced by a real folder (Settings checks that folders exist)."""
    return {k: str(folder) if str(v) == MOUNT else v for k, v in args.items()}


def settings_from_flags(argv: list[str], folder: Path) -> Settings:
    flags = vars(build_parser().parse_args(argv))  # an unknown flag exits here
    return Settings(**local_paths(flags, folder))


@pytest.mark.parametrize("name", ["serve.yaml", "rayservice.yaml"])
def test_serve_config_args_are_settings_and_ray_options_that_validate(name, tmp_path):
    (app,) = serve_configs()[name]["applications"]
    module, _, attr = app["import_path"].partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    assert f"def {attr}(" in Path(spec.origin).read_text()
    args = local_paths(app["args"], tmp_path)
    ray_keys = set(RayOptions.model_fields)
    unknown = set(args) - ray_keys - set(Settings.model_fields)
    assert not unknown, f"{name}: not a setting or a --ray option: {sorted(unknown)}"
    RayOptions(**{k: v for k, v in args.items() if k in ray_keys})
    settings = Settings(**{k: v for k, v in args.items() if k not in ray_keys})
    (deployment,) = app["deployments"]
    assert deployment["name"] == "TaloraReplica"
    assert deployment["graceful_shutdown_timeout_s"] > settings.drain_timeout_s  # requests finish, then stop
    assert deployment["max_ongoing_requests"] == args.get("max_ongoing_requests", deployment["max_ongoing_requests"])


def test_the_rayservice_embeds_the_serve_config_application():
    configs = serve_configs()
    (plain,), (embedded,) = configs["serve.yaml"]["applications"], configs["rayservice.yaml"]["applications"]
    secretless = {k: v for k, v in plain["args"].items() if k != "admin_token"}  # a Secret in the RayService
    assert embedded["args"] == secretless
    assert {k: v for k, v in embedded.items() if k != "args"} == {k: v for k, v in plain.items() if k != "args"}


def test_the_rayservice_turns_on_ray_token_authentication_and_keeps_the_admin_token_in_a_secret():
    (service,) = load_yaml(DEPLOY / "ray" / "rayservice.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["TALORA_ADMIN_TOKEN"]["valueFrom"]
    assert "admin_token" not in service["spec"]["serveConfigV2"]


def test_every_rayservice_node_loads_the_proxy_middleware_with_the_serve_configs_limits(tmp_path):
    """Serve's proxy runs on every node: each must have the variables ``talora-serve --ray`` sets for a
    local cluster, with the limits the application's settings give (``cli.proxy_limits``)."""
    from talora.server.backends.ray.cli import proxy_limits
    from talora.server.backends.ray.support import RayOptions

    (service,) = load_yaml(DEPLOY / "ray" / "rayservice.yaml")
    (app,) = serve_configs()["serve.yaml"]["applications"]
    ray_keys = set(RayOptions.model_fields)
    args = local_paths(app["args"], tmp_path)
    settings = Settings(**{k: v for k, v in args.items() if k not in ray_keys})
    want = proxy_limits(settings, RayOptions(**{k: v for k, v in args.items() if k in ray_keys})).env()
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in want} == want


def test_the_kubernetes_deployment_runs_valid_flags_with_probes_and_a_grace_period_past_the_drain(tmp_path):
    deployment, service = load_yaml(DEPLOY / "kubernetes" / "talora-serve.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = settings_from_flags(container["args"], tmp_path)
    assert settings.host == "0.0.0.0"
    assert container["ports"][0]["containerPort"] == settings.port == service["spec"]["ports"][0]["port"]
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s + DRAIN_MARGIN_S
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"/ready", "/health"}
    from talora.server.http.routes_health import router

    assert paths <= {getattr(route, "path", None) for route in router.routes}


def test_the_systemd_unit_runs_valid_flags_and_waits_for_the_drain(tmp_path):
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / "systemd" / "talora-serve.service").read_text())
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/talora-serve")
    settings = settings_from_flags([a if a != "/srv/talora/adapters" else MOUNT for a in command[1:]], tmp_path)
    assert int(service["TimeoutStopSec"]) > settings.drain_timeout_s + DRAIN_MARGIN_S
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"


def test_the_serve_configs_validate_against_serve_and_build(tmp_path):
    """With the ray extra: Serve's schema accepts both configs and their args build the application."""
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from talora.adapters.demo import demo_bundle_dir
    from talora.server.backends.ray.serve import app_builder

    store = tmp_path / "adapters"
    shutil.copytree(demo_bundle_dir(), store, ignore=shutil.ignore_patterns("__*", "*.py"))
    for config in serve_configs().values():
        ServeDeploySchema.model_validate(config)
        (app,) = config["applications"]
        assert app_builder(local_paths(app["args"], store)) is not None
