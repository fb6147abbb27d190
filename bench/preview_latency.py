"""Warm preview latency: 16 sample images through the cached model, as the Preview page does it.

The page keeps the model in ``st.cache_resource``; this measures the call it makes after that,
over several seeds (different images each time), and prints the median and worst time.
Usage: python bench/preview_latency.py [--data DIR] [--model NAME] [-n 16]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.inference import Classifier  # noqa: E402
from pipeline.models import parse_model  # noqa: E402
from pipeline.preview import preview  # noqa: E402
from pipeline.sources import SAMPLE_DATA, list_images, open_source  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--data", default=str(SAMPLE_DATA))
parser.add_argument("--model", default="efficientnet_lite0")
parser.add_argument("-n", type=int, default=16)
args = parser.parse_args()

began = time.perf_counter()
classifier = Classifier(parse_model(args.model))
listing = list_images(open_source(args.data))
preview(listing, classifier, n=args.n, seed=0)  # cold: first forward pass
cold = time.perf_counter() - began
times = [preview(listing, classifier, n=args.n, seed=seed).seconds for seed in range(1, 11)]
print(f"{args.model}, {args.n} images: cold start {cold:.2f} s; warm median {statistics.median(times):.2f} s, worst {max(times):.2f} s")
