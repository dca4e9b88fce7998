import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# one intra-op thread: the tiny test models are far faster without OpenMP hand-offs,
# and Ray actors in the same tests need the other core
torch.set_num_threads(1)
