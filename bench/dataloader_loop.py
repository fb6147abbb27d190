"""What a user would write instead of Ray on one machine: a plain PyTorch DataLoader loop, tuned.

It gets every trick the project's actor has (JPEG draft decoding, uint8 crops, the frozen graph on
micro-batches, threads = cores), so (b)/(d) measures what Ray itself costs. Run as its own process;
prints the number of images classified.
"""

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.inference import Classifier
from pipeline.models import parse_model
from pipeline.preprocess import decode
from pipeline.sources import list_images, open_source

data, model_name, batch_size, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
classifier = Classifier(parse_model(model_name), device="cpu", precision=precision, threads=os.cpu_count())
files = list_images(open_source(data)).files


class Images(Dataset):
    def __len__(self):
        return len(files)

    def __getitem__(self, i):
        return torch.from_numpy(decode(Path(files[i]).read_bytes(), classifier.preprocessing))


done = 0
loader = DataLoader(Images(), batch_size=batch_size, num_workers=1, prefetch_factor=4)
for batch in loader:
    classifier.top_k(batch.numpy(), 5)
    done += len(batch)
print(done)
