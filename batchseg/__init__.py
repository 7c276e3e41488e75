"""batchseg: batch instance segmentation of image lakes with Ray Data and Detectron2."""

__version__ = "0.1.0"
