"""Shared set-up of the tests in tests/ (one file per project file; flowar.py's tests are
test_flowar.py at the top level): the repository root on sys.path, so that these files
import the project modules and test_flowar.py's helpers; one thread per test process; and
the helpers that more than one file here uses."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent    # the repository root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

# One thread per test process: deterministic, and no oversubscription when the tests
# launch 2-process torchrun jobs on a 2-core machine. (test_flowar.py does the same.)
torch.set_num_threads(1)

# the real CIFAR-10 copy (../shared/data); the tests that read it skip without it
CIFAR_ROOT = ROOT.parent / 'shared' / 'data'


class _FakeMoments:
    """Stands in for data.LatentDataset in make_batch: moments (N, P, 2C, h, w), labels."""

    def __init__(self, moments, labels, scale_factor=1.0):
        self.m, self.y, self.scale_factor = moments, labels, scale_factor

    def moments_batch(self, idx):
        return self.m[idx], self.y[idx]
