"""Fine-tuning on reviewed labels, on Ray Train: the last step of the loop
(pre-labels -> reviews -> a better model -> pre-labels again).

- `driver`: `plan` (every check, before any worker) and `train` (Ray Data + TorchTrainer, then
  the model folder); `TrainSpec` holds one job.
- `data`: examples from the reviews dataset or a COCO ground truth, the held-out split by
  image_id hash, decoding in Ray Data tasks.
- `recipe`: the torchvision Mask R-CNN recipe (new heads, SGD, step schedule, flips).
- `loop`: what each Ray Train worker runs.
- `detectron2`: the same through detectron2's own trainer (where detectron2 is installed).
- `model_dir`: the files of a trained model, read by `batchseg run --model-dir`.

Submodules are imported by name (this package's import pulls in neither torch nor Ray).
May import every package below the cli.
"""
