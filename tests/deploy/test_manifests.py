"""The shipped YAML: cluster configs, the Serve config and the KubeRay RayService manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.bootstrap import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


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
    assert set(groups) == {"expert-shards", "cpu-workers", "gpu-workers"}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    app = serve_config.applications[0]
    assert app.import_path == "deploy.app:app_builder"
    config = load_config(app.args)
    assert config.server.host == "0.0.0.0" and config.dense.autoscaling.max_replicas == 4


def test_kuberay_expert_shard_group_autoscales_and_matches_the_pool_config():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    shards = groups["expert-shards"]
    assert shards["minReplicas"] <= shards["replicas"] <= shards["maxReplicas"]
    offered = json.loads(json.loads(shards["rayStartParams"]["resources"]))  # KubeRay quoting
    app = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    e = load_config(app.applications[0].args).experts
    assert e.resources and all(offered.get(k, 0) >= v for k, v in e.resources.items())
    for g, group in groups.items():  # only that group offers the shards' custom resource
        if g != "expert-shards":
            assert "resources" not in group.get("rayStartParams", {}), g
    assert e.autoscaling.enabled and e.autoscaling.add_nodes
    assert e.autoscaling.max_shards <= shards["maxReplicas"] * offered["expert_shard"]
    pod_cpus = float(shards["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert e.num_cpus <= pod_cpus == float(shards["rayStartParams"]["num-cpus"])


def test_dockerfile_builds_the_image_the_manifest_names():
    dockerfile = (ROOT / "Dockerfile").read_text()
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    for image in images:  # every tag is one the Dockerfile's header builds
        assert f"-t {image} " in dockerfile or f"-t {image}\n" in dockerfile, image
    workdirs = {c["workingDir"] for p in pods for c in p["template"]["spec"]["containers"]}
    assert workdirs == {"/app"} and "WORKDIR /app" in dockerfile
    ray_pin = re.search(r"ray\[serve\]==([\d.]+)", (ROOT / "pyproject.toml").read_text())[1]
    assert cluster["rayVersion"] == ray_pin
    assert re.search(rf"RAY_IMAGE=rayproject/ray:{re.escape(ray_pin)}-py311-cpu", dockerfile)
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, re.M):
        for src in line.split()[:-1]:  # the sources exist in the repository
            assert (ROOT / src).exists(), src


def test_elastic_config_turns_the_pool_policies_on():
    demo = load_config({"config": str(DEPLOY / "configs" / "demo.yaml")})
    assert not demo.experts.rebalance.enabled and not demo.experts.autoscaling.enabled
    elastic = load_config({"config": str(DEPLOY / "configs" / "elastic.yaml")})
    e = elastic.experts
    assert e.rebalance.enabled and e.autoscaling.enabled and e.redundant_per_shard == 2
    assert e.autoscaling.min_shards <= e.shards <= e.autoscaling.max_shards
