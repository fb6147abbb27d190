"""What a user would write instead of Ray on one machine: a plain PyTorch DataLoader loop, tuned.

It gets every trick the project's actor has (JPEG draft decoding, uint8 crops, on a CPU the frozen
graph on micro-batches with threads = cores and freed memory kept for the next batch, on a GPU bf16 +
channels_last and pinned batches), so
(b)/(d) measures what Ray itself costs. Run as its own process; prints the number of images classified.

    python bench/dataloader_loop.py DATA MODEL BATCH_SIZE PRECISION [DEVICE [WORKERS]]
"""

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.inference import Classifier, keep_freed_memory
from pipeline.models import parse_model
from pipeline.preprocess import decode
from pipeline.sources import list_images, open_source

data, model_name, batch_size, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
workers = int(sys.argv[6]) if len(sys.argv) > 6 else 1
threads = os.cpu_count() if device == "cpu" else None
classifier = Classifier(parse_model(model_name), device=device, precision=precision, threads=threads)
if device == "cpu":
    keep_freed_memory()  # as a CPU Predictor does (the DataLoader's workers fork from here, keeping it too)
files = list_images(open_source(data)).files


class Images(Dataset):
    def __len__(self):
        return len(files)

    def __getitem__(self, i):
        return torch.from_numpy(decode(Path(files[i]).read_bytes(), classifier.preprocessing))


done = 0
loader = DataLoader(Images(), batch_size=batch_size, num_workers=workers, prefetch_factor=4, pin_memory=device == "cuda")
for batch in loader:
    classifier.top_k(batch.numpy(), 5)
    done += len(batch)
print(done)
