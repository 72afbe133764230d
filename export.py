#!/usr/bin/env python3
"""Export a Llama-family checkpoint to a Mesa-Extrapolation ONNX engine. See `python export.py --help`."""
import sys

from export.cli import main

if __name__ == "__main__":
    sys.exit(main())
