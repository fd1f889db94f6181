"""`aift predict` for plastic_sorting: the class and the probabilities of each image (or .npy array of bands).

Each file is read and resized as the eval split is (``PlasticSortingDataModule.transform(train=False)``), scaled to
[0, 1], and goes through ``DeployableClassifier``: the checkpoint's normalisation, the network and a softmax, the
same graph the ONNX export holds.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator

import torch
from torchvision.transforms import v2

from aifactory_train.recipe import DataError
from aifactory_train.recipe import read_in_batches
from .data import load_file
from .export import DeployableClassifier, training_normalisation


def read_image(path: Path, channels: list[str], size: int) -> torch.Tensor:
    """One file as a float (C, size, size) tensor in [0, 1]; a file that cannot be read, or has other bands than
    the model was trained on, is named."""
    try:
        image = load_file(str(path), len(channels))
    except Exception as err:  # noqa: BLE001 - name the file, whatever the decoder raised
        raise DataError(f"cannot decode '{path}': {err}") from err
    if image.ndim != 3 or image.shape[0] != len(channels):
        raise DataError(f"'{path}' has {image.shape[0] if image.ndim == 3 else 'no'} bands of shape (C, H, W); the "
                        f"model was trained on {len(channels)}: {', '.join(channels)}")
    image = v2.Resize((size, size), antialias=True)(image)
    return v2.functional.to_dtype(image, torch.float32, scale=True)


def predict_files(module, files: list[Path], batch_size: int, options: dict[str, Any]) -> Iterator[dict]:
    info = module.hparams.data_info
    mean, std = training_normalisation(info)
    channels, size, names = list(info["channels"]), int(info["image_size"]), module.class_names
    model = DeployableClassifier(module.net, mean, std).to(module.device).eval()
    read = functools.partial(read_image, channels=channels, size=size)
    for chunk, decoded in read_in_batches(files, read, batch_size, options["num_workers"]):
        images = torch.stack(decoded).to(module.device)
        _, probabilities = model(images)
        for path, row in zip(chunk, probabilities.float().cpu()):
            best = int(row.argmax())
            yield {"file": str(path), "class": names[best], "probability": float(row[best]),
                   "probabilities": dict(zip(names, row.tolist()))}
