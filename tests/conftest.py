"""Tiny models run fastest single-threaded, and tests share the machine's cores."""

import torch

torch.set_num_threads(1)
