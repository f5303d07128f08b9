#!/usr/bin/env python
"""``dwlab-check-gpu``: exit 0 when torch sees a GPU, else 1 with the likely reason."""

import sys

import torch

if torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): {torch.cuda.device_count()} GPU(s)")
    sys.exit(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): no usable GPU; is the host's NVIDIA driver >= 580 "
      "(CUDA 13.0) and was the container started with --gpus (compose: a GPU reservation)?")
sys.exit(1)
