"""Every bad input a user can reach from the CLI: exit 2 and one line that names the fix.

Each row runs the real CLI in a subprocess (`python -m batchseg ...`) and checks the exit code
and stderr: exactly one line (usage errors: argparse's usage line, then the error line), no
traceback, and nothing started (no Ray, nothing written). S3 rows use a moto S3 API server on
127.0.0.1; "no credentials" rows run with every AWS credential source removed, "rejected
credentials" rows talk to a second moto server that checks keys (INITIAL_NO_AUTH_ACTION_COUNT=0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import free_port, moto_server
from tests.synthetic_results import write_results


@dataclass(frozen=True)
class Bad:
    args: list[str]
    says: str  # the one line contains this
    code: int = 2
    env: str = "creds"  # "creds" (moto's test keys), "none" (no credential source at all)
    usage: bool = False  # an argparse usage error: the usage line, then the error line


TV = ["--backend", "torchvision", "--random-init"]
RUN = ["run", "--input", "{images}", "--output", "{out}"]

ROWS = {
    # --- issue 11's table -------------------------------------------------------------------
    "output is an existing file": Bad(["run", "--input", "{images}", "--output", "{a_file}", *TV], "is a file"),
    "input folder with no images": Bad(["run", "--input", "{empty}", "--output", "{out}", *TV], "no images found under"),
    "eval --gt missing": Bad(["eval", "{results}", "--gt", "{tmp}/nope.json"], "--gt {tmp}/nope.json: not found"),
    "export from s3 without credentials": Bad(
        ["export", "labelstudio", "s3://cli-lake/results", "{out}", "--s3-endpoint-url", "{s3}"],
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --s3-anon", env="none"),
    "s3 input without credentials": Bad(
        ["run", "--input", "s3://cli-lake/images/", "--output", "{out}", "--s3-endpoint-url", "{s3}", *TV],
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --s3-anon", env="none"),
    "config YAML syntax error": Bad(["run", "--config", "{bad_yaml}"], "{bad_yaml}:3:8: invalid YAML"),
    "typo'd flag": Bad(["run", "--batchsize", "4"], "did you mean --batch-size?", usage=True),
    # --- issue 11's "also" list ---------------------------------------------------------------
    "output bucket rejects the credentials": Bad(
        [*RUN[:3], "--output", "s3://cli-lake/out", "--s3-endpoint-url", "{auth_s3}", *TV],
        "S3 rejected the credentials (InvalidAccessKeyId)"),
    "output bucket does not exist": Bad(
        [*RUN[:3], "--output", "s3://no-such-bucket/out", "--s3-endpoint-url", "{s3}", *TV], "no such S3 bucket"),
    "export to a bucket without credentials": Bad(
        ["export", "coco", "{results}", "s3://cli-lake/coco", "--s3-endpoint-url", "{s3}"], "DEST s3://cli-lake/coco: no S3 credentials",
        env="none"),
    "export from an unreachable endpoint": Bad(
        ["export", "cvat", "s3://cli-lake/results", "{out}", "--s3-endpoint-url", "http://127.0.0.1:{dead_port}"],
        "cannot reach the S3 endpoint http://127.0.0.1:{dead_port}: check --s3-endpoint-url"),
    "--set unknown field": Bad([*RUN, *TV, "--set", "models.instance.scor_threshold=0.7"],
                               "unknown field 'scor_threshold'; did you mean 'score_threshold'?"),
    "--set into a number": Bad([*RUN, *TV, "--set", "batch_size.x=1"], "batch_size: Input should be a valid integer"),
    "--set a flag into a number": Bad([*RUN, *TV, "--set", "batch_size=true"], "batch_size: Input should be a valid integer"),
    "--set a fraction into a count": Bad([*RUN, *TV, "--set", "num_actors=1.5"], "num_actors: Input should be a valid integer"),
    "--set a number into a flag": Bad([*RUN, *TV, "--set", "overwrite=1"], "overwrite: Input should be a valid boolean"),
    "--set without =": Bad([*RUN, *TV, "--set", "batch_size"], "write it as key.path=value"),
    "negative score threshold": Bad([*RUN, *TV, "--score-threshold", "-0.5"], "greater than or equal to 0 (got -0.5)"),
    "negative failure budget": Bad([*RUN, *TV, "--max-failed-fraction", "-1"], "max_failed_fraction"),
    "weights file that is not a checkpoint": Bad([*RUN, "--backend", "torchvision", "--weights", "{garbage_weights}"],
                                                 "checkpoint"),
    "label map that misses classes": Bad(
        [*RUN, "--backend", "torchvision", "--weights", "{tv_weights}", "--label-map", "{short_label_map}"], "label_map"),
    # --- more found while trying ---------------------------------------------------------------
    "unknown field in the config file": Bad(["run", "--config", "{typo_yaml}"],
                                            "{typo_yaml}:3:1: config error at batchsize: unknown field 'batchsize'; "
                                            "did you mean 'batch_size'?"),
    "config is a folder": Bad(["run", "--config", "{tmp}"], "cannot read config file"),
    "no input at all": Bad(["run", "--output", "{out}", *TV], "pass --input URI"),
    "a task twice": Bad([*RUN, "--tasks", "instance,instance"], "task listed twice"),
    "label map file missing": Bad([*RUN, *TV, "--label-map", "{tmp}/labels.yaml"], "labels.yaml"),
    "cuda on a machine without a GPU": Bad([*RUN, *TV, "--device", "cuda"], "--device cpu"),
    "eval --gt is a folder": Bad(["eval", "{results}", "--gt", "{tmp}"], "a folder; give the path of a file"),
    "eval --gt is not JSON": Bad(["eval", "{results}", "--gt", "{a_file}"], "is not JSON"),
    "eval --gt is JSON but not COCO": Bad(["eval", "{results}", "--gt", "{list_json}"], "COCO"),
    "export from a folder with no results": Bad(["export", "coco", "{empty}", "{out}"], "no batchseg dataset at"),
    "export format unknown": Bad(["export", "yaml", "{results}", "{out}"], "invalid choice: 'yaml'", usage=True),
    "export option of another format": Bad(["export", "coco", "{results}", "{out}", "--tasks-per-file", "3"],
                                           "unrecognized arguments: --tasks-per-file 3", usage=True),
    "export missing DEST": Bad(["export", "cvat", "{results}"], "required: DEST", usage=True),
    "bad --url-map": Bad(["export", "labelstudio", "{results}", "{out}", "--url-map", "nothing"], "PREFIX=URL"),
    "zero tasks per file": Bad(["export", "labelstudio", "{results}", "{out}", "--tasks-per-file", "0"],
                               "--tasks-per-file must be at least 1"),
    "not a number": Bad(["render", "{results}", "{out}", "--limit", "many"], "invalid int value: 'many'", usage=True),
    "render --limit 0": Bad(["render", "{results}", "{out}", "--limit", "0"], "--limit must be at least 1"),
    # --- found by a second look: shapes and places no check covered ---------------------------
    "empty --output": Bad(["run", "--input", "{images}", "--output", "", *TV], "names no folder"),
    "empty --input": Bad(["run", "--input", "", "--output", "{out}", *TV], "an input is empty"),
    "output inside an earlier run's output": Bad(["run", "--input", "{images}", "--output", "{results}/annotations", *TV],
                                                 "inside an earlier run's output; give that output folder"),
    "--set value that is not YAML": Bad([*RUN, *TV, "--set", "batch_size=[1"], "quote it as a YAML string"),
    "--set a model of an unknown task": Bad([*RUN, *TV, "--set", "models.instnace.score_threshold=0.9"],
                                            "models.instnace: unknown task; did you mean 'instance'?"),
    "--set tasks to a nested list": Bad([*RUN, "--set", "tasks=[[a]]"], "tasks.0: Input should be a valid string"),
    "--set a model to a number": Bad([*RUN, "--set", "models.instance=5"], "models.instance: Input should be a valid"),
    "config file not UTF-8": Bad(["run", "--config", "{latin1_yaml}"], "is not UTF-8 text"),
    "RESULTS holds another tool's Parquet": Bad(["export", "coco", "{foreign}", "{out}"], "is not a batchseg dataset"),
    "eval --gt annotation without bbox": Bad(["eval", "{results}", "--gt", "{gt_no_bbox}"], "annotations[0] has no bbox"),
    "eval --gt images without ids": Bad(["eval", "{results}", "--gt", "{gt_no_ids}"], "each with an integer id"),
    "eval --gt without annotations": Bad(["eval", "{results}", "--gt", "{gt_no_anns}"], "holds no annotations"),
    "--weights with --random-init": Bad([*RUN, *TV, "--weights", "{tv_weights}"], "weights and random_init both set"),
    "--tasks names no task": Bad([*RUN, *TV, "--tasks", ","], "names no task"),
    "eval --out is a folder": Bad(["eval", "{results}", "--gt", "{gt_no_anns}", "--out", "{tmp}"],
                                  "a folder; give the path of a file, such as"),
    "eval --out under a file": Bad(["eval", "{results}", "--gt", "{gt_no_anns}", "--out", "{a_file}/m/eval.json"],
                                   "is a file, not a folder"),
}


@pytest.fixture(scope="module")
def auth_s3():
    """A moto S3 server that checks access keys: moto's test keys are unknown to it."""
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        yield url


@pytest.fixture(scope="module")
def lake(s3_endpoint, tmp_path_factory):
    """s3://cli-lake/ with one image and a results folder (its own bucket: the S3 server is the
    session's, and other tests list their buckets whole)."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="cli-lake")
    results = write_results(tmp_path_factory.mktemp("lake_results"))
    for path in results.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "cli-lake", f"results/{path.relative_to(results)}")
    s3.put_object(Bucket="cli-lake", Key="images/a.png", Body=_png())
    return s3_endpoint


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def places(tmp_path_factory, lake, auth_s3, tv_weights) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "images").mkdir()
    (tmp / "images" / "a.png").write_bytes(_png())
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("no images here")
    (tmp / "a_file").write_text("not a folder, not JSON")
    (tmp / "bad.yaml").write_text("inputs: [samples/images]\noutput: out/x\ntasks: [instance\nbatch_size: 4\n")
    (tmp / "typo.yaml").write_text("inputs: [samples/images]\noutput: out/x\nbatchsize: 4\n")
    (tmp / "list.json").write_text("[]")
    (tmp / "garbage.pth").write_bytes(b"this is not a checkpoint" * 100)
    (tmp / "short_labels.yaml").write_text("1: {id: 1, name: person}\n2: {id: 3, name: car}\n")
    (tmp / "latin1.yaml").write_bytes("inputs: [caf\u00e9]\n".encode("latin-1"))
    (tmp / "foreign").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "label": ["a", "b"]}), tmp / "foreign" / "part-0.parquet")
    image = {"id": 1, "file_name": "people/p000000.jpg", "width": 80, "height": 60}
    gts = {"gt_no_bbox": {"images": [image], "categories": [{"id": 1, "name": "person"}],
                          "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]},
           "gt_no_ids": {"images": [{"file_name": "a.jpg"}], "categories": [], "annotations": []},
           "gt_no_anns": {"images": [image], "categories": [{"id": 1, "name": "person"}], "annotations": []}}
    for name, gt in gts.items():
        (tmp / f"{name}.json").write_text(json.dumps(gt))
    return {
        "tmp": str(tmp), "images": str(tmp / "images"), "empty": str(tmp / "empty"),
        "a_file": str(tmp / "a_file"), "bad_yaml": str(tmp / "bad.yaml"), "typo_yaml": str(tmp / "typo.yaml"),
        "list_json": str(tmp / "list.json"), "garbage_weights": str(tmp / "garbage.pth"),
        "short_label_map": str(tmp / "short_labels.yaml"), "tv_weights": str(tv_weights),
        "latin1_yaml": str(tmp / "latin1.yaml"), "foreign": str(tmp / "foreign"),
        **{name: str(tmp / f"{name}.json") for name in gts},
        "results": str(write_results(tmp / "results")), "s3": lake, "auth_s3": auth_s3, "dead_port": str(free_port()),
    }


def environment(kind: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if kind == "none":  # every source botocore looks at, including the instance metadata service
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.pop(name, None)
        env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
                   AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.mark.parametrize("bad", ROWS.values(), ids=ROWS.keys())
def test_bad_input_exits_with_one_line_naming_the_fix(bad: Bad, places, tmp_path):
    places = {**places, "out": str(tmp_path / "out")}
    args = [a.format(**places) for a in bad.args]
    result = subprocess.run([sys.executable, "-m", "batchseg", *args], capture_output=True, text=True, timeout=180,
                            env=environment(bad.env))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == bad.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stderr, result.stderr[-3000:]
    if bad.usage:
        assert len(lines) == 2 and lines[0].startswith("usage: batchseg "), result.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("batchseg: "), result.stderr
    assert bad.says.format(**places) in lines[-1], lines[-1]
    assert not Path(places["out"]).exists()  # nothing written


@pytest.mark.parametrize("command", [["run"], ["export"], ["export", "coco"], ["export", "labelstudio"],
                                     ["export", "cvat"], ["eval"], ["render"], ["review"],
                                     ["push"], ["push", "labelstudio"]])
def test_help_lists_defaults_exit_codes_and_describes_every_positional(command):
    parser = _parser_of(command)
    text = parser.format_help()
    assert "exit codes:" in text and "  2  bad flag, config or input" in text
    for action in parser._actions:
        if not action.option_strings:  # positionals, sub-commands included
            assert action.help, f"{' '.join(command)}: {action.dest} has no description"
        elif action.default not in (None, False, [], "==SUPPRESS==") and action.help:
            assert "default" in action.help or "%(default)" in parser._get_formatter()._get_help_string(action), \
                f"{' '.join(command)} {action.option_strings[0]}: default {action.default!r} not shown"


def test_each_export_format_has_its_own_help():
    helps = {fmt: subprocess.run([sys.executable, "-m", "batchseg", "export", fmt, "--help"], capture_output=True,
                                 text=True, timeout=60).stdout for fmt in ("coco", "labelstudio", "cvat")}
    assert len(set(helps.values())) == 3
    assert "instances.json" in helps["coco"] and "--tasks-per-file" not in helps["coco"]
    assert "--tasks-per-file" in helps["labelstudio"] and "labeling_config.xml" in helps["labelstudio"]
    assert "cvat_coco_instances.zip" in helps["cvat"]


def _parser_of(command: list[str]):
    from batchseg.cli import build_parser

    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if a.choices and word in a.choices)
        parser = sub.choices[word]
    return parser


def test_an_output_another_run_holds_fails_before_ray_starts(places, tmp_path):
    from batchseg.store.lease import Lease

    out = tmp_path / "out"
    out.mkdir()
    with Lease(str(out), {}, "20260101T000000Z-0ther0"):
        result = subprocess.run([sys.executable, "-m", "batchseg", "run", "--input", places["images"],
                                 "--output", str(out), *TV], capture_output=True, text=True, timeout=180,
                                env=environment("creds"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 4 and len(lines) == 1, result.stderr[-3000:]  # 4: output locked
    assert "is being written by run 20260101T000000Z-0ther0" in lines[0]
    assert "Started a local Ray" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # the holder released its lease; nothing else written
