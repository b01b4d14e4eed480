"""Time loading + pre-processing of one real BraTS case (240x240x155) into 64x64 slices.

Usage (from the repository root):
  python -m jaxvae.bench.data [CASE_DIR] [--modality t2] [--repeats 5] [--out bench.json]

One warm-up run, then the median over the repeats of each stage (image read, segmentation
read, pre-processing) and of the whole. Target: < 2 s per case. The gzip decompression inside
nibabel is the floor of the read stages.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import nibabel
import numpy as np
import scipy

from jaxvae.base.errors import JaxvaeError
from jaxvae.base.io import write_text
from jaxvae.data import nifti
from jaxvae.data.datasets import find_brats_cases
from jaxvae.data.preprocess import PreprocessParams, preprocess_volume

DEFAULT_CASE = Path(__file__).resolve().parents[1] / "../shared/data/brats2021_t2/BraTS2021_00006"


def run_once(case, params):
    """Seconds spent in each stage of one case's loading and pre-processing."""
    t0 = time.perf_counter()
    volume = nifti.load_volume(case.image_path)
    t1 = time.perf_counter()
    seg = nifti.load_seg(case.seg_path, volume) if case.seg_path else None
    t2 = time.perf_counter()
    images, _, _, _ = preprocess_volume(volume.data, params, lesion=seg, name=case.image_path)
    t3 = time.perf_counter()
    return {"load_image_s": t1 - t0, "load_seg_s": t2 - t1, "preprocess_s": t3 - t2,
            "total_s": t3 - t0}, volume.data.shape, len(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir", nargs="?", default=DEFAULT_CASE, type=Path,
                        help="BraTS case folder (default: %(default)s)")
    parser.add_argument("--modality", default="t2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write JSON here (default: print it)")
    args = parser.parse_args(argv)
    try:
        (case,) = find_brats_cases(args.case_dir.resolve(), args.modality)
        params = PreprocessParams()
        run_once(case, params)  # warm-up: file cache, BLAS threads, imports
        runs = []
        for _ in range(args.repeats):
            times, shape, n_slices = run_once(case, params)
            runs.append(times)
        result = {
            "benchmark": "load + preprocess one case",
            "case": case.case_id, "image": case.image_path.name, "shape": list(shape),
            "slices_out": n_slices, "params": dataclasses.asdict(params),
            "repeats": args.repeats,
            **{f"median_{k}": statistics.median(r[k] for r in runs) for k in runs[0]},
            "runs": runs,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "numpy": np.__version__, "scipy": scipy.__version__,
                        "nibabel": nibabel.__version__},
        }
        text = json.dumps(result, indent=2)
        if args.out:
            write_text(args.out, text + "\n", overwrite=True)
        print(text)
    except JaxvaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
