"""Deployment settings that reach the pods: the engine cache, the image, the credentials secret."""

import json
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from flows.deployments import deployments  # noqa: E402
from flows.settings import Settings  # noqa: E402
from pipeline.backends.tensorrt import EngineCache  # noqa: E402

TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "gpu-work-pool.json"


def test_engine_cache_setting_reaches_every_process_scene_job(monkeypatch):
    monkeypatch.setenv("CRACKMAP_ENGINE_CACHE", "s3://models/engines/")
    monkeypatch.setenv("CRACKMAP_GPU_IMAGE", "registry.example/crackmap/worker-gpu:1.1")
    scene = next(d for d in deployments(Settings(), with_schedule=False) if d.name == "process-scene")
    assert scene.job_variables == {
        "image": "registry.example/crackmap/worker-gpu:1.1",
        "env": {"CRACKMAP_ENGINE_CACHE": "s3://models/engines/"},
    }
    others = [d for d in deployments(Settings(), with_schedule=False) if d.name != "process-scene"]
    assert all("env" not in (d.job_variables or {}) for d in others)


def test_engine_cache_from_the_environment_keeps_an_s3_url_whole(monkeypatch, tmp_path):
    monkeypatch.setenv("CRACKMAP_ENGINE_CACHE", "s3://models/engines")
    cache = EngineCache()
    assert cache.root == "s3://models/engines" and cache.path("x.engine") == "s3://models/engines/x.engine"
    monkeypatch.setenv("CRACKMAP_ENGINE_CACHE", str(tmp_path))
    assert EngineCache().root == str(tmp_path)


def test_gpu_pool_template_takes_credentials_from_a_secret_and_names_a_buildable_image():
    template = json.loads(TEMPLATE.read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "{{ credentials_secret }}"}}]
    assert container["env"] == "{{ env }}" and container["image"] == "{{ image }}"
    variables = template["variables"]["properties"]
    assert variables["credentials_secret"]["default"] == "crackmap-credentials"
    readme = (TEMPLATE.parents[1] / "README.md").read_text()
    image = variables["image"]["default"]
    assert f"docker push {image}" in readme and f"-t {image}" in readme
    assert "kubectl create secret generic crackmap-credentials" in readme
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"):
        assert key in readme
