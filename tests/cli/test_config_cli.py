"""Bad flags and configs fail before any work starts, with one line naming the fix."""

import subprocess
import sys

import pytest

from batchseg.config import ConfigError, load_config


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "batchseg", "run", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def tv(*extra):
    return ["--backend", "torchvision", "--random-init", *extra]


@pytest.mark.parametrize("args, message", [
    (["--input", "/x", "--output", "/o", "--tasks", "bogus"], "unknown task 'bogus'"),
    (["--input", "ftp://host/x", "--output", "/o", *tv()], "unsupported URI scheme"),
    (["--input", "/x", "--output", "/o", "--backend", "torchvision"], "no weights given"),
    (["--input", "/x", "--output", "/o", "--backend", "torchvision", "--weights", "/no/such.pth"], "weights not found"),
    (["--input", "/definitely/missing", "--output", "/o", *tv()], "input not found"),
    (["--input", "/x", "--output", "/o", *tv("--model", "resnet9000")], "unknown torchvision model"),
    (["--input", "/x", "--output", "/o", *tv("--batch-size", "0")], "batch_size"),
    (["--input", "/x", "--output", "/o", *tv("--set", "no_such_field=1")], "no_such_field"),
    (["--input", "/x", "--output", "/o", *tv("--precision", "fp16", "--device", "cpu")], "needs CUDA"),
    (["--config", "/no/job.yaml"], "config file not found"),
])
def test_bad_config_exits_2_with_one_line(args, message, tmp_path):
    result = cli(*[str(tmp_path) if a == "/x" else str(tmp_path / "out") if a == "/o" else a for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_unknown_flag_is_a_usage_error():
    result = cli("--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_detectron2_missing_or_weights_unreachable_names_the_fix(tmp_path):
    """The default backend is detectron2 with the official zoo weights: without detectron2 the
    error names how to install it; with it, unreachable weights (no network here) are named."""
    result = cli("--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert ("needs the 'detectron2' package" in result.stderr and "official source" in result.stderr) or (
        "weights not reachable at https://dl.fbaipublicfiles.com/detectron2/" in result.stderr
    ), result.stderr


def test_dry_run_prints_resolved_config(tmp_path):
    result = cli("--input", str(tmp_path), "--output", str(tmp_path / "o"), *tv("--score-threshold", "0.7"),
                 "--allow-empty", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert '"score_threshold": 0.7' in result.stdout and '"backend": "torchvision"' in result.stdout


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "inputs: [s3://bucket/images/]\noutput: s3://bucket/out/\n"
        "models:\n  instance: {backend: torchvision, random_init: true, score_threshold: 0.3}\n"
    )
    cfg = load_config(path, [(["models", "instance", "score_threshold"], 0.8), (["batch_size"], 16)])
    assert cfg.models["instance"].score_threshold == 0.8 and cfg.batch_size == 16
    assert cfg.models["instance"].model is None  # detectron2's default config name does not leak in
    assert cfg.storage_options("s3://b/k") == {"anon": False}


def test_model_flag_with_several_tasks_is_refused():
    with pytest.raises(ConfigError, match="exactly one task"):
        load_config(None, [(["inputs"], ["/x"]), (["output"], "/o"), (["tasks"], ["instance", "instance"]),
                           (["models", "*", "weights"], "/w.pth")])


def test_s3_endpoint_goes_to_client_kwargs():
    cfg = load_config(None, [(["inputs"], ["s3://b/i/"]), (["output"], "/o"), (["models", "*", "backend"], "torchvision"),
                             (["models", "*", "random_init"], True), (["s3", "endpoint_url"], "http://127.0.0.1:9000")])
    assert cfg.storage_options("s3://b/i/") == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert cfg.storage_options("/local/path") == {}


def test_cli_run_starts_its_own_local_ray(samples, tmp_path):
    """No --ray-address and no RAY_ADDRESS: a fresh local Ray, whatever /tmp/ray last recorded."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "batchseg", "run", "--input", str(samples.root / "street"), "--output", str(tmp_path),
         "--backend", "tests.oracle:ColorKeyBackend"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batchseg: 2 images, 2 annotated, 0 failed; found 4 instances" in result.stdout
    # a healthy run's console: no error-level lines, no token notice, no Ray Data progress blocks
    assert "core_worker.cc" not in result.stderr and "Token authentication" not in result.stderr, result.stderr
    assert "logging_progress" not in result.stderr and "streaming_executor" not in result.stderr, result.stderr
    assert not [line for line in result.stderr.splitlines() if " E " in line or "ERROR" in line], result.stderr


def test_unknown_category_names_fail_preflight(tmp_path):
    result = cli("--input", str(tmp_path), "--output", str(tmp_path / "o"), *tv(),
                 "--set", "models.instance.categories=[person, unicorn]")
    assert result.returncode == 2 and "unknown categories ['unicorn']" in result.stderr


def test_densepose_without_its_package_names_the_fix(tmp_path):
    """sys.modules[name] = None makes `import name` fail as if the package were absent."""
    code = (
        "import sys; sys.modules['densepose'] = None; from batchseg.cli import main; "
        f"sys.exit(main(['run', '--input', {str(tmp_path)!r}, '--output', {str(tmp_path / 'o')!r}, "
        "'--tasks', 'densepose', '--random-init']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "models.densepose: backend 'detectron2' needs the" in line
    assert ("'densepose' package" in line and "projects/DensePose" in line) or "'detectron2' package" in line


def test_torchvision_backend_is_instance_only(tmp_path):
    result = cli("--input", str(tmp_path), "--output", str(tmp_path / "o"), "--tasks", "panoptic", *tv())
    assert result.returncode == 2 and "instance segmentation only" in result.stderr


@pytest.mark.parametrize("budget, code", [("0.5", 3), ("0.7", 0)])
def test_failure_budget_sets_the_exit_code_and_lists_the_failures(samples, tmp_path, budget, code):
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "batchseg", "run", "--input", str(samples.root / "street"), "--input",
         str(samples.root / "bad"), "--output", str(tmp_path), "--backend", "tests.oracle:ColorKeyBackend",
         "--max-failed-fraction", budget],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == code, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run.json").read_text())
    failed_list = tmp_path / "runs" / f"{summary['run_id']}.failed"  # part-*.jsonl, one per write task
    assert summary["failed_list"] == str(failed_list)
    failed = [json.loads(line) for part in sorted(failed_list.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert sorted(f["image_uri"].rsplit("/", 1)[1] for f in failed) == ["bomb.png", "empty.jpg", "not_an_image.png", "truncated.jpg"]
    assert summary["failed_fraction"] == pytest.approx(4 / 6, abs=1e-6)
    assert summary["status"] == ("failure_budget_exceeded" if code == 3 else "ok")
    if code == 3:
        assert "over max_failed_fraction=0.5" in result.stderr
