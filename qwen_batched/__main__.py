"""``python -m qwen_batched answer|extract ...`` (also under ``torchrun``); see :mod:`qwen_batched.jobs`."""
import sys

from .jobs import main

if __name__ == "__main__":
    sys.exit(main())
