"""The Kubernetes example stays consistent: the router config parses, and names line up."""

from __future__ import annotations

from pathlib import Path

import yaml

from llmserve.routing.config import parse_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kubernetes"


def load(name: str) -> dict[tuple[str, str], dict]:
    docs = yaml.safe_load_all((EXAMPLES / name).read_text())
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_router_configmap_is_a_valid_router_config_pointing_at_the_engine_service(monkeypatch):
    engine, router = load("engine.yaml"), load("router.yaml")
    monkeypatch.setenv("LLMSERVE_ROUTER_ADMIN_TOKEN", "t")
    text = router[("ConfigMap", "llmserve-router")]["data"]["router.yaml"]
    config = parse_config(yaml.safe_load(text), source="router ConfigMap")
    service = engine[("Service", "llmserve-engine")]
    port = service["spec"]["ports"][0]["port"]
    assert config.replica_urls() == {f"http://llmserve-engine:{port}"}
    container = router[("Deployment", "llmserve-router")]["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == config.port


def test_engine_deployment_ranks_match_gpus_and_service_selects_its_pods():
    engine = load("engine.yaml")
    deployment = engine[("Deployment", "llmserve-engine")]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    tp = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--tensor-parallel-size=")]
    assert tp == [str(container["resources"]["limits"]["nvidia.com/gpu"])]
    selector = engine[("Service", "llmserve-engine")]["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert "--host=0.0.0.0" in container["args"]
