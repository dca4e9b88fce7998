"""The shipped YAML: cluster configs, the Serve config and the KubeRay RayService manifest."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.bootstrap import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_cluster_configs():
    demo = load_config({"config": str(DEPLOY / "configs" / "demo.yaml")})
    assert demo.model is None and demo.experts.shards == 2
    assert demo.dense.autoscaling.min_replicas == demo.dense.autoscaling.max_replicas == 1
    local = load_config({"config": str(DEPLOY / "configs" / "local-experts.yaml")})
    assert local.experts.shards == 0


def test_serve_yaml_is_a_valid_serve_config():
    raw = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "deploy.app:app_builder"
    assert load_config(app.args).experts.shards == 2  # relative path: resolved from the repo


def test_kuberay_rayservice():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    app = serve_config.applications[0]
    assert app.import_path == "deploy.app:app_builder"
    config = load_config(app.args)
    assert config.server.host == "0.0.0.0" and config.dense.autoscaling.max_replicas == 4
