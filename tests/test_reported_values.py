"""What reports print: grid thresholds as the grid's values, and help texts that end where their sentence does."""
import json
import subprocess
import sys

import numpy as np

from ds_face.eval import verification as ev


def test_chosen_thresholds_are_written_as_grid_values():
    """np.arange(0, 4, 0.01)[52] is 0.5199999999999999; the report writes 0.52 (the comparison still uses the
    grid itself, as arcface_torch does)."""
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 60)
    e = rng.normal(size=(240, 8))
    e[1::2][issame] = e[0::2][issame] + rng.normal(scale=0.6, size=(60, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    result = ev.verify(e, issame)
    grid = {round(float(t), 10) for t in ev.THRESHOLDS}
    assert result["thresholds"] and all(t in grid for t in result["thresholds"])
    text = json.dumps(result["thresholds"])
    assert all(len(repr(t).split(".")[-1]) <= 2 for t in result["thresholds"]), text


def test_ijb_help_states_its_whole_first_paragraph():
    out = subprocess.run([sys.executable, "-m", "ds_face.eval", "ijb", "--help"], capture_output=True, text=True,
                         check=True).stdout
    description = " ".join(out.split("\n\n")[1].split())
    assert description.endswith("(the protocol: ``ds_face.ijb``).") and "IJB-B / IJB-C" in description
