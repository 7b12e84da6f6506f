"""python -m ds_face.ijb: the same command as python -m ds_face.eval ijb."""
import sys

from ds_face.ijb.cli import main

sys.exit(main())
