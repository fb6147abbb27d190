"""Ray's tutorial pipeline, reproduced faithfully for comparison (run as its own process).

read_images(mode="RGB") → map(preprocess_image) with ToTensor + weights.transforms(), carrying the
original image → map_batches(model class) → drop original_image → write_parquet.
On a machine without GPUs ``num_gpus`` is left out, as the tutorial says to do for CPU inference.
"""

import sys
import tempfile
from typing import Any

import numpy as np
import ray
import torch
from torchvision import transforms

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from pipeline.models import describe, load_module, parse_model

data, model_name, batch_size, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = parse_model(model_name)
info = describe(spec)
prep = info.preprocessing
# weights.transforms() for torchvision models; the same ImageClassification transform for the embedded one.
from torchvision.transforms._presets import ImageClassification  # noqa: E402

imagenet_transforms = ImageClassification(
    crop_size=prep.crop,
    resize_size=prep.resize,
    mean=prep.mean,
    std=prep.std,
    interpolation=transforms.InterpolationMode(prep.interpolation),
)
transform = transforms.Compose([transforms.ToTensor(), imagenet_transforms])

ds = ray.data.read_images(data, mode="RGB")


def preprocess_image(row: dict[str, np.ndarray]):
    return {"original_image": row["image"], "transformed_image": transform(row["image"])}


transformed_ds = ds.map(preprocess_image)


class ResnetModel:
    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_module(spec).to(self.device)
        self.model.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        torch_batch = torch.from_numpy(batch["transformed_image"]).to(self.device)
        with torch.inference_mode():
            prediction = self.model(torch_batch)
            predicted_classes = prediction.argmax(dim=1).detach().cpu()
            predicted_labels = [info.categories[i] for i in predicted_classes]
            return {"predicted_label": predicted_labels, "original_image": batch["original_image"]}


gpu = {"num_gpus": 1} if torch.cuda.is_available() else {}
predictions = transformed_ds.map_batches(ResnetModel, concurrency=concurrency, batch_size=batch_size, **gpu)
out = tempfile.mkdtemp()
predictions.drop_columns(["original_image"]).write_parquet(f"local://{out}")
print(out)
