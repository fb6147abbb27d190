"""What a user would write instead of Ray on one machine: a plain PyTorch DataLoader loop, tuned.

Run as its own process; prints the number of images classified.
"""

import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.models import describe, load_module, parse_model
from pipeline.sources import list_images, open_source

data, model_name, batch_size, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
spec = parse_model(model_name)
prep = describe(spec).preprocessing
transform = transforms.Compose(
    [
        transforms.Resize(prep.resize, interpolation=transforms.InterpolationMode(prep.interpolation)),
        transforms.CenterCrop(prep.crop),
        transforms.ToTensor(),
        transforms.Normalize(prep.mean, prep.std),
    ]
)
files = list_images(open_source(data)).files


class Images(Dataset):
    def __len__(self):
        return len(files)

    def __getitem__(self, i):
        with Image.open(files[i]) as image:
            image.draft("RGB", (prep.resize, prep.resize))
            return transform(image.convert("RGB"))


torch.set_num_threads(2)
model = load_module(spec).to(memory_format=torch.channels_last)
done = 0
loader = DataLoader(Images(), batch_size=batch_size, num_workers=1, prefetch_factor=4, persistent_workers=False)
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
    for batch in loader:
        model(batch.contiguous(memory_format=torch.channels_last)).argmax(1)
        done += len(batch)
print(done)
