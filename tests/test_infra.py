"""Cluster packaging checked against the package: no cluster or Docker engine runs here, so the
manifests are parsed and held to what the code and pins say."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

import batchseg
from batchseg.predictors.densepose_configs import PINNED_COMMIT

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
IMAGE = f"batchseg:{batchseg.__version__}"
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
CRON = re.compile(r"^(\S+\s+){4}\S+$")


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _check_rayjob_spec(spec):
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["python", "/app/jobs/annotate.py"]
    assert (REPO / args[1].removeprefix("/app/")).is_file()
    config = args[args.index("--config") + 1]
    assert (REPO / config.removeprefix("/app/")).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert str(cluster["rayVersion"]) == RAY_PIN
    head = _containers(cluster["headGroupSpec"]["template"])
    workers = [c for g in cluster["workerGroupSpecs"] for c in _containers(g["template"])]
    assert {c["image"] for c in head + workers} == {IMAGE}
    for worker in workers:
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] >= cluster["workerGroupSpecs"][0]["minReplicas"]
    _check_job_config_scales_from_zero(REPO / config.removeprefix("/app/"), cluster["workerGroupSpecs"][0]["maxReplicas"])


def _check_job_config_scales_from_zero(path: Path, gpu_workers: int) -> None:
    """GPU workers start at zero: the job must ask for GPUs (device cuda, not auto, which would
    see none and run on CPU) and let its pool grow to one actor per GPU worker."""
    job = yaml.safe_load(path.read_text())
    assert job["device"] == "cuda" and job["max_actors"] >= gpu_workers


def test_rayjob():
    job = yaml.safe_load((INFRA / "kuberay/rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _check_rayjob_spec(job["spec"])


def test_raycronjob_wraps_the_same_rayjob_on_a_schedule():
    text = (INFRA / "kuberay/raycronjob.yaml").read_text()
    cron = yaml.safe_load(text)
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert CRON.match(cron["spec"]["schedule"]) and "--feature-gates=RayCronJob=true" in text
    _check_rayjob_spec(cron["spec"]["jobTemplate"])
    # one fixed output: each night is an incremental run over it
    assert cron["spec"]["jobTemplate"]["entrypoint"].endswith("--output s3://my-lake/prelabels/")


def test_cronjob_for_older_operators_creates_rayjobs_with_rbac():
    docs = {d["kind"]: d for d in yaml.safe_load_all((INFRA / "kuberay/cronjob-rayjob.yaml").read_text())}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    rule = docs["Role"]["rules"][0]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
    cron = docs["CronJob"]["spec"]
    assert CRON.match(cron["schedule"]) and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["containers"][0]["command"][:3] == ["kubectl", "create", "-f"]
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    assert rayjob["metadata"]["generateName"].endswith("-") and rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["entrypoint"].endswith("--output s3://my-lake/prelabels/")  # incremental
    _check_rayjob_spec(rayjob["spec"])


def test_cluster_launcher():
    cfg = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    assert cfg["docker"]["image"] == IMAGE
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"]["GPU"] == 0
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu and all(n["max_workers"] > n["min_workers"] for n in gpu)  # autoscales
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert cfg["max_workers"] >= max(n["max_workers"] for n in gpu)
    config = REPO / "jobs/configs/four-tasks.yaml"  # the one its header tells to submit
    assert str(config.relative_to(REPO)) in (INFRA / "cluster-launcher.yaml").read_text()
    _check_job_config_scales_from_zero(config, max(n["max_workers"] for n in gpu))


def test_runtime_env_excludes_local_state():
    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]


def test_dockerfile_runs_the_install_script_with_the_pins():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.M) and "cudnn-devel" in dockerfile
    assert "bash infra/install.sh deps" in dockerfile and "bash infra/install.sh app" in dockerfile
    for copied in ("batchseg/", "jobs/", "requirements/", "infra/install.sh"):
        assert f"COPY {copied}" in dockerfile and (REPO / copied).exists()
    assert "DENSEPOSE_CONFIGS=/opt/detectron2/projects/DensePose/configs" in dockerfile


@pytest.mark.parametrize("step", ["deps", "app"])
def test_install_script_dry_run(step):
    out = subprocess.run(["bash", str(INFRA / "install.sh"), step, "--dry-run"], capture_output=True, text=True, check=True).stdout
    if step == "deps":
        assert "-r requirements/torch.txt" in out and "download.pytorch.org/whl/cu128" in out
        assert f"checkout {PINNED_COMMIT}" in out  # the same commit the DensePose config resolver fetches
        assert "FORCE_CUDA=1" in out and "projects/DensePose" in out
    else:
        assert out.strip() == "+ pip install ."
    assert PINNED_COMMIT in (REPO / "docs/backends.md").read_text()  # the manual's detectron2 install


def test_install_script_refuses_unknown_step():
    result = subprocess.run(["bash", str(INFRA / "install.sh"), "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown step" in result.stderr
