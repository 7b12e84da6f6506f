"""python -m ds_face.eval: the .bin verification sets (and `ijb`)."""
import sys

from ds_face.eval.verification import main

if __name__ == "__main__":
    sys.exit(main())
