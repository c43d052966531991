"""Pieces of scripts/benchmark.py: ours vs transformers' LlamaForCausalLM, one concern per module."""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # runnable as `python scripts/benchmark.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))
