"""python -m ds_face.export: a checkpoint -> model.pt, ONNX, the full head."""
import sys

from ds_face.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
