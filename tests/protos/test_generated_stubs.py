"""The committed stubs are exactly what scripts/gen_protos.sh generates from protos/teacher.proto."""

from __future__ import annotations

import subprocess

from tests import REPO


def test_stubs_match_the_proto():
    run = subprocess.run(["bash", str(REPO / "scripts" / "gen_protos.sh"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
