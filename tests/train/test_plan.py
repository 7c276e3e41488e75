"""`batchseg train` before any worker: the data, the split, and every one-line refusal.

Real parts: sample images with COCO ground truth, pycocotools, torch checkpoints on disk.
No Ray: all of this must fail (or pass) before Ray starts.
"""

from __future__ import annotations

import json

import pytest
import torch

from batchseg.cli import main
from batchseg.config import ConfigError, StorageConfig
from batchseg.predictors.base import load_label_map
from batchseg.train import data
from batchseg.train.driver import TrainSpec, plan
from batchseg.train.hyper import Hyper
from batchseg.train.recipe import build_model

ARCH = "maskrcnn_resnet18_fpn"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from batchseg.samples import write_samples

    dest = tmp_path_factory.mktemp("scenes")
    write_samples(dest, scenes=40, seed=3)
    return dest


def spec(scenes, tmp_path, **kw) -> TrainSpec:
    hyper = kw.pop("hyper", Hyper(arch=ARCH, iterations=2, min_size=64, max_size=96))
    return TrainSpec(data=str(scenes / "ground_truth.json"), images=str(scenes / "images"),
                     output=str(tmp_path / "model"), hyper=hyper, **kw)


def test_the_split_is_by_image_id_hash_and_the_same_every_time(scenes, tmp_path):
    examples, categories, source = data.from_coco(str(scenes / "ground_truth.json"), str(scenes / "images"), StorageConfig())
    first = data.split(examples, categories, source, 0.25)
    again = data.split(list(reversed(examples)), categories, source, 0.25)
    assert {e["image_id"] for e in first.heldout} == {e["image_id"] for e in again.heldout}
    assert len(first.train) + len(first.heldout) == len(examples) == 40 + 11
    assert 0.1 < len(first.heldout) / len(examples) < 0.4
    # an image keeps its side whatever else is in the data
    assert all(data.is_heldout(e["image_id"], 0.25) for e in first.heldout)
    assert {e["image_id"] for e in data.split(examples[:10], categories, source, 0.25).heldout} == \
        {e["image_id"] for e in first.heldout if e in examples[:10]}


def test_coco_examples_read_tar_members_and_decode_to_training_rows(scenes):
    examples, categories, _ = data.from_coco(str(scenes / "ground_truth.json"), str(scenes / "images"), StorageConfig())
    members = [e for e in examples if e["image_uri"].startswith("tar://")]
    assert len(members) == 2 and all("shard-000000.tar" in e["image_uri"] for e in members)
    index = {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]), start=1)}
    batch = {k: [e[k] for e in members + examples[:2]] for k in examples[0]}
    rows = data.decode_examples(batch, 64, 96, index, StorageConfig())
    assert len(rows["image"]) == 4
    for image, masks, labels in zip(rows["image"], rows["masks"], rows["labels"]):
        assert min(image.shape[:2]) == 64 or max(image.shape[:2]) == 96
        assert masks.shape[1:] == image.shape[:2] and len(masks) == len(labels) >= 1
        assert set(labels) <= set(index.values())


def test_the_label_map_is_the_form_batchseg_run_takes(scenes, tmp_path):
    split, _, _ = plan(spec(scenes, tmp_path))
    table = load_label_map(json.loads(json.dumps(split.label_map())))
    assert [(i, c.id, c.name) for i, c in sorted(table.items())] == [
        (1, 1, "person"), (2, 3, "car"), (3, 18, "dog"), (4, 44, "bottle")]
    assert split.instances_per_category["person"] > 0


def test_too_few_images_is_one_line(scenes, tmp_path):
    with pytest.raises(ConfigError, match=r"training images .*fewer than 500; review more images, or lower --min-images"):
        plan(spec(scenes, tmp_path, min_images=500))


def test_a_category_with_no_instance_is_one_line(scenes, tmp_path):
    gt = json.loads((scenes / "ground_truth.json").read_text())
    gt["categories"].append({"id": 77, "name": "unicorn"})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ConfigError, match="categories with no instance in the training images: unicorn; leave them out "
                                          "with --categories person,car,dog,bottle"):
        plan(TrainSpec(data=str(path), images=str(scenes / "images"), output=str(tmp_path / "m"),
                       hyper=Hyper(arch=ARCH)))


def test_base_weights_whose_head_does_not_fit_are_refused_with_keep_head(scenes, tmp_path):
    base = tmp_path / "base.pt"
    torch.save(build_model(ARCH, 3).state_dict(), base)  # 2 categories; the data has 4
    with pytest.raises(ConfigError, match="--keep-head: the base weights' head has 2 classes but the data has 4"):
        plan(spec(scenes, tmp_path, base_weights=str(base), keep_head=True))
    plan(spec(scenes, tmp_path, base_weights=str(base)))  # new heads: fine


def test_base_weights_of_another_architecture_are_refused(scenes, tmp_path):
    base = tmp_path / "base.pt"
    torch.save(build_model("maskrcnn_resnet34_fpn", 5).state_dict(), base)
    with pytest.raises(ConfigError, match="does not fit MaskRCNN: .* is it for another architecture"):
        plan(spec(scenes, tmp_path, base_weights=str(base)))


def test_an_output_holding_another_model_is_refused(scenes, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model_card.json").write_text(json.dumps({"identity": "0" * 32, "data": {"uri": "s3://elsewhere/gt.json"}}))
    with pytest.raises(ConfigError, match=r"already holds another model \(model_card.json: trained on s3://elsewhere"):
        plan(spec(scenes, tmp_path))


def test_cli_refuses_bad_flags_before_ray_starts(scenes, tmp_path, capsys):
    code = main(["train", "--data", str(scenes / "ground_truth.json"), "--images", str(scenes / "images"),
                 "--output", str(tmp_path / "m"), "--task", "keypoint"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "batchseg: --task keypoint: training covers instance only"
    code = main(["train", "--data", str(tmp_path / "nothing.json"), "--output", str(tmp_path / "m")])
    assert code == 2 and "not found" in capsys.readouterr().err
    code = main(["train", "--data", str(scenes / "ground_truth.json"), "--output", str(tmp_path / "m"), "--lr", "0"])
    assert code == 2 and "--lr 0.0: give a positive learning rate" in capsys.readouterr().err


def test_a_config_file_gives_the_flags_and_flags_override_it(scenes, tmp_path, capsys):
    from batchseg.cli.main import build_parser
    from batchseg.cli.train import spec_from_args

    config = tmp_path / "train.yaml"
    config.write_text(f"data: {scenes / 'ground_truth.json'}\noutput: {tmp_path / 'm'}\niterations: 7\nlr: 0.5\n"
                      "arch: maskrcnn_resnet18_fpn\nmin-size: 96\n")
    spec = spec_from_args(build_parser().parse_args(["train", "--config", str(config), "--lr", "0.02"]))
    assert (spec.hyper.iterations, spec.hyper.lr, spec.hyper.min_size, spec.hyper.arch) == (7, 0.02, 96, ARCH)
    assert spec.data == str(scenes / "ground_truth.json")
    config.write_text("iteratons: 7\n")
    assert main(["train", "--config", str(config), "--data", "x.json", "--output", "m"]) == 2
    assert "unknown setting 'iteratons'; did you mean 'iterations'?" in capsys.readouterr().err


def test_run_model_dir_takes_the_card_and_flags_override_it(tmp_path):
    from batchseg.cli.main import build_parser
    from batchseg.cli.run import config_from_args

    model = tmp_path / "v2"
    model.mkdir()
    (model / "weights.pt").write_bytes(b"x")
    (model / "model_card.json").write_text(json.dumps({
        "backend": "torchvision", "model": ARCH, "weights": {"file": "weights.pt", "sha256": "ab" * 32},
        "label_map": "label_map.json", "min_size": 112, "max_size": 192}))
    args = build_parser().parse_args(["run", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                                      "--model-dir", str(model), "--max-size", "256"])
    m = config_from_args(args).models["instance"]
    assert (m.backend, m.model, m.weights, m.weights_sha256, m.label_map, m.min_size, m.max_size, m.model_card) == (
        "torchvision", ARCH, f"{model}/weights.pt", "ab" * 32, f"{model}/label_map.json", 112, 256, f"{model}/model_card.json")
    args = build_parser().parse_args(["run", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                                      "--model-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="no model_card.json there; give a folder `batchseg train` finished writing"):
        config_from_args(args)


def test_a_wrong_image_folder_is_one_line(scenes, tmp_path):
    """Every image unreadable (the COCO file_names are not under --images): refused before Ray
    starts; in the workers each image would be left out, and every pass would be empty."""
    with pytest.raises(ConfigError, match=r"\S+: cannot be read \(\[Errno 2\] .*\); give --images, the folder the file_names are under"):
        plan(TrainSpec(data=str(scenes / "ground_truth.json"), images=str(tmp_path), output=str(tmp_path / "m"), min_images=5))
