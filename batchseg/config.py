"""One typed job config: a YAML file plus CLI overrides, validated before Ray starts.

Every check that can fail without touching an image happens here (unknown task, bad URI
scheme, missing weights), so a bad job exits with one line before any work is scheduled.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator,
                      model_validator)

TASKS = ("instance", "panoptic", "keypoint", "densepose")
BACKENDS = ("detectron2", "torchvision")
URI_SCHEMES = ("", "file", "s3", "gs", "gcs", "abfs", "az", "http", "https", "memory")

# detectron2 model zoo (and DensePose's); weights default to the official checkpoints.
DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "instance": {"backend": "detectron2", "model": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"},
    "panoptic": {"backend": "detectron2", "model": "COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml"},
    "keypoint": {"backend": "detectron2", "model": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml"},
    "densepose": {"backend": "detectron2", "model": "densepose_rcnn_R_50_FPN_s1x"},
}


class ConfigError(ValueError):
    """A job config that cannot run; the message is one line that names the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Strict):
    """How to reach object storage; credentials come from the usual AWS env vars / profiles."""

    endpoint_url: str | None = None  # also read from AWS_ENDPOINT_URL(_S3) by botocore itself
    anon: StrictBool = False
    region: str | None = None

    def options(self, uri: str) -> dict[str, Any]:
        """fsspec storage options for `uri` (empty for anything but s3://)."""
        if _scheme(uri) not in ("s3", "s3a"):
            return {}
        opts: dict[str, Any] = {"anon": self.anon}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        return opts


class ModelConfig(_Strict):
    """One task's predictor.

    backend: "detectron2", "torchvision", or "package.module:Class" for a custom backend.
    model: detectron2 model-zoo config name or YAML path; torchvision architecture name.
    weights: local path, s3:// or http(s) URL (downloaded once per node and cached); for
      detectron2 zoo configs, None means the official checkpoint.
    """

    backend: str
    model: str | None = None
    weights: str | None = None
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="pin the weights' content")
    model_card: str | None = Field(None, description="model_card.json of a `batchseg train` model (--model-dir sets it)")
    random_init: StrictBool = False
    label_map: str | dict[int, Any] | None = None
    score_threshold: StrictFloat = Field(0.5, ge=0.0, le=1.0)
    categories: list[str] | None = Field(None, description="keep only these category names")
    batch_size: StrictInt | None = Field(None, gt=0, description="images per forward; default: the job's")
    min_size: StrictInt | None = Field(None, gt=0, description="test-time shortest edge, pixels")
    max_size: StrictInt | None = Field(None, gt=0, description="test-time longest edge cap, pixels")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in BACKENDS and ":" not in v:
            raise ValueError(
                f"unknown backend {v!r}; use one of {', '.join(BACKENDS)} or 'package.module:Class'"
            )
        return v

    @model_validator(mode="after")
    def _weights_or_random(self) -> "ModelConfig":
        if self.weights and self.random_init:
            raise ValueError("weights and random_init both set; drop --random-init to load the weights, "
                             "or --weights for a randomly initialised smoke test")
        if self.backend == "torchvision" and not self.weights and not self.random_init:
            raise ValueError(
                "no weights given; set weights to a path, s3:// or https:// URL "
                "(--weights), or ask for random_init (--random-init) for a smoke test"
            )
        return self


class VideoConfig(_Strict):
    """Which frames of a video input are annotated (docs/video.md). Times are presentation
    times in seconds; at most one of fps, every_n and keyframes_only (none: every frame)."""

    fps: StrictFloat | StrictInt | None = Field(None, gt=0, description="frames a second, by presentation time")
    every_n: StrictInt | None = Field(None, gt=0, description="every n-th frame (frame_index % n == 0)")
    keyframes_only: StrictBool = Field(False, description="only keyframes (decodes nothing else)")
    max_frames: StrictInt | None = Field(None, gt=0, description="at most this many frames per video")
    start: StrictFloat | StrictInt = Field(0.0, ge=0, description="first time sampled, seconds")
    end: StrictFloat | StrictInt | None = Field(None, gt=0, description="sampling stops before this time, seconds")
    segment_s: StrictFloat | StrictInt = Field(60.0, gt=0, description="seconds of video one read task decodes")
    track: StrictBool = Field(False, description="link instances across frames into tracks (track_id)")
    track_iou: StrictFloat = Field(0.3, gt=0, le=1, description="least mask IoU that continues a track")

    @model_validator(mode="after")
    def _one_mode(self) -> "VideoConfig":
        modes = [name for name, on in (("fps", self.fps is not None), ("every_n", self.every_n is not None),
                                       ("keyframes_only", self.keyframes_only)) if on]
        if len(modes) > 1:
            raise ValueError(f"{' and '.join(modes)} both set; choose one sampling mode (or none: every frame)")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self

    def sampling(self) -> str:
        """The fields that choose frames, as text: part of a video's done key, so that a
        changed sampling reads the video again (and annotates only frames new under it)."""
        fields = ("fps", "every_n", "keyframes_only", "max_frames", "start", "end", "segment_s")
        return ",".join(f"{f}={getattr(self, f)}" for f in fields)


class JobConfig(_Strict):
    inputs: list[str] = Field(min_length=1)
    output: str
    tasks: list[str] = Field(default_factory=lambda: ["instance"], min_length=1)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    decode_on_device: StrictBool = Field(False, description="decode baseline JPEGs on the GPU (nvJPEG); needs device cuda")
    decode_threads: StrictInt | None = Field(
        None, gt=0, description="threads each predictor actor decodes with on device cpu; None = the cluster's whole "
                                "CPUs per actor, rounded up")
    batch_size: StrictInt = Field(4, gt=0, description="images per model forward")
    num_actors: StrictInt | None = Field(None, gt=0, description="predictor actors; None = one per GPU")
    max_actors: StrictInt | None = Field(None, gt=0, description="autoscale the pool up to this many")
    gpus_per_actor: StrictFloat = Field(1.0, gt=0)
    actor_resource: str | None = Field(
        None, min_length=1, description="a custom Ray resource each predictor actor also asks one unit of: the pool "
                                        "goes only to nodes that offer it (docs/cluster.md)")
    max_retries: StrictInt = Field(3, ge=0, description="retries of a task, restarts of a predictor actor and "
                                                        "retries of its calls, each, after a worker or node dies")
    stall_timeout_s: StrictFloat = Field(180.0, gt=0, description="no image finished for this long while Ray "
                                                                   "holds demands no node can meet: say so")
    stall_deadline_s: StrictFloat | None = Field(
        900.0, gt=0, description="stalled this long with no autoscaler to add a node: stop with exit code 5 "
                                 "(None: wait for ever)")
    read_rows_per_block: StrictInt = Field(16, gt=0, description="images per read/decode task")
    rows_per_file: StrictInt = Field(2000, gt=0, description="least rows per output Parquet file")
    max_image_pixels: StrictInt = Field(89_478_485, gt=0, description="decompression-bomb limit")
    allow_empty: StrictBool = Field(False, description="an input with no images is not an error (scheduled runs)")
    overwrite: StrictBool = Field(False, description="delete earlier runs in the output, annotate everything")
    retry_failed: StrictBool = Field(False, description="annotate again images an earlier run failed on")
    skip_reviewed: StrictBool = Field(
        False, description="leave out images people reviewed (OUTPUT/reviews), whatever the models' fingerprint"
    )
    max_failed_fraction: StrictFloat | None = Field(
        None, ge=0.0, le=1.0, description="exit 3 (failure budget exceeded) when more images than this fail"
    )
    allow_http_weights: StrictBool = Field(False, description="allow weights over plain http:// without weights_sha256")
    s3: StorageConfig = Field(default_factory=StorageConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    ray_address: str | None = None

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        for task in v:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; supported: {', '.join(TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"task listed twice in {v}")
        return v

    @field_validator("inputs")
    @classmethod
    def _input_schemes(cls, v: list[str]) -> list[str]:
        for uri in v:
            if not uri.strip():
                raise ValueError("an input is empty; give a folder, an image, a .tar shard, a manifest or an s3:// URI")
            _check_scheme(uri)
        return [_lower_scheme(uri) for uri in v]

    @field_validator("output")
    @classmethod
    def _output_scheme(cls, v: str) -> str:
        if not v.strip().rstrip("/"):
            raise ValueError(f"output {v!r} names no folder; give a folder (local or s3://) for annotations/ and runs/")
        _check_scheme(v)
        return _lower_scheme(v)

    @model_validator(mode="before")
    @classmethod
    def _fill_default_models(cls, data: Any) -> Any:
        # Shapes that are wrong are left as they are, for pydantic to report in one line.
        if isinstance(data, dict) and isinstance(data.get("models") or {}, dict):
            models = dict(data.get("models") or {})
            unknown = [str(task) for task in models if task not in TASKS]
            if unknown:
                close = difflib.get_close_matches(unknown[0], TASKS, n=1)
                raise ValueError(f"models.{unknown[0]}: unknown task; "
                                 + (f"did you mean {close[0]!r}?" if close else f"supported: {', '.join(TASKS)}"))
            tasks = data.get("tasks") or ["instance"]
            for task in tasks if isinstance(tasks, list) else []:
                default = DEFAULT_MODELS.get(task) if isinstance(task, str) else None
                given = (models.get(task) or {}) if default else {}
                if default and isinstance(given, dict) and given.get("backend", default["backend"]) == default["backend"]:
                    models[task] = {**default, **given}
            data = {**data, "models": models}
        return data

    @model_validator(mode="after")
    def _coherent(self) -> "JobConfig":
        if self.precision != "fp32" and self.device == "cpu":
            raise ValueError(f"precision {self.precision} needs CUDA; use precision: fp32 on CPU")
        if self.decode_on_device and self.device == "cpu":
            raise ValueError("decode_on_device needs CUDA; set device: cuda (or auto), or decode_on_device: false on CPU")
        if self.max_actors is not None and self.max_actors < (self.num_actors or 1):
            raise ValueError("max_actors must be >= num_actors")
        if self.stall_deadline_s is not None and self.stall_deadline_s < self.stall_timeout_s:
            raise ValueError(f"stall_deadline_s ({self.stall_deadline_s:g}) must be >= stall_timeout_s "
                             f"({self.stall_timeout_s:g}): the stall is reported before the run stops")
        return self

    def storage_options(self, uri: str) -> dict[str, Any]:
        return self.s3.options(uri)


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


def _lower_scheme(uri: str) -> str:
    """`S3://b/k` -> `s3://b/k`: fsspec knows protocols in lower case only."""
    head, sep, rest = uri.partition("://")
    return f"{head.lower()}{sep}{rest}" if sep else uri


def _check_scheme(uri: str) -> None:
    if _scheme(uri) not in URI_SCHEMES:
        raise ValueError(
            f"unsupported URI scheme in {uri!r}; use a local path or one of "
            + ", ".join(s + "://" for s in URI_SCHEMES if s)
        )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], yaml-parsed value)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"bad override {item!r}; write it as key.path=value")
    try:
        return key.split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad value in override {item!r}: {_first_line(str(e))}; quote it as a YAML string") from None


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    if path[:2] == ["models", "*"]:  # a model flag: the one selected task
        tasks = data.get("tasks") or ["instance"]
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"tasks must be a list of task names ({', '.join(TASKS)}); got {tasks!r}")
        if len(tasks) != 1:
            raise ConfigError(
                f"a model flag ({path[2]}) needs exactly one task; with several tasks use "
                f"--set models.TASK.{path[2]}=VALUE"
            )
        path = ["models", str(tasks[0]), *path[2:]]
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a mapping")
    node[path[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[tuple[list[str], Any]]) -> JobConfig:
    """Read the YAML file (if any), apply dotted overrides in order, validate.

    Raises ConfigError with a one-line message on any problem; problems in the file are
    reported as `FILE:LINE:COLUMN: ...` (from PyYAML's marks).
    """
    data: dict[str, Any] = {}
    marks: dict[tuple[str, ...], yaml.Mark] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML") from None
        try:
            data = yaml.safe_load(text) or {}
            marks = _key_marks(yaml.compose(text))
        except yaml.MarkedYAMLError as e:
            raise ConfigError(_yaml_syntax(path, e)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_first_line(str(e))}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for key_path, value in overrides:
        _set_path(data, key_path, value)
        marks = {k: m for k, m in marks.items() if k[:len(key_path)] != tuple(key_path)}  # a flag set it
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path, marks)) from None


def _yaml_syntax(path: str | os.PathLike, e: yaml.MarkedYAMLError) -> str:
    """`job.yaml:3:8: invalid YAML: while parsing a flow sequence, expected ',' or ']', but
    got ':' (at 4:11)`: where the construct began, then where PyYAML gave up."""
    where = e.context_mark or e.problem_mark
    text = ", ".join(part for part in (e.context, e.problem) if part)
    at = f" (at {e.problem_mark.line + 1}:{e.problem_mark.column + 1})" if e.context_mark and e.problem_mark else ""
    return f"{path}:{where.line + 1}:{where.column + 1}: invalid YAML: {text}{at}"


def _key_marks(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], yaml.Mark]:
    """Dotted key path -> where its key starts in the file, for every mapping key."""
    marks: dict[tuple[str, ...], yaml.Mark] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            marks[path] = key.start_mark
            marks.update(_key_marks(value, path))
    return marks


def _describe(e: ValidationError, path: str | os.PathLike | None = None,
              marks: dict[tuple[str, ...], yaml.Mark] | None = None) -> str:
    """The first validation error as one line: where (FILE:LINE:COL when the file set it),
    what is wrong, the value given, and for an unknown field the closest known one."""
    err = e.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    where = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        msg = f"unknown field {loc[-1]!r}" + (f"; did you mean {close[0]!r}?" if close else
                                               f"; known fields: {', '.join(known)}" if known else "")
    elif err["type"] == "missing":
        flag = {"inputs": "--input URI", "output": "--output URI"}.get(where)
        msg = f"missing; set {where} in the config file" + (f" or pass {flag}" if flag else "")
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":
            given = err.get("input")
            msg += " (got a mapping)" if isinstance(given, dict) else " (got a list)" if isinstance(given, list) else f" (got {given!r})"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    mark = (marks or {}).get(loc)
    prefix = f"{path}:{mark.line + 1}:{mark.column + 1}: " if mark is not None else ""
    return f"{prefix}config error at {where}: {msg}{more}"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """Field names of the config model found at `loc` (mapping keys such as a task name are
    stepped over), or [] when `loc` does not lead to a model."""
    model: Any = JobConfig
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part)
            if field is None:
                return []
            model = field.annotation
        else:  # dict[str, Model] (models.TASK) or Optional[...]: the value type
            args = [a for a in typing.get_args(model) if a is not type(None)]
            model = args[-1] if args else None
    for arg in [model, *typing.get_args(model)]:  # Model, or Model | None
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return list(arg.model_fields)
    return []


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
