"""Shared pytest set-up. CI runs hypothesis derandomized so a red run can be reproduced exactly.

Tests live in folders mirroring the package's rooms; the helper modules they share (tiny_models,
_templating_helpers, vlm_helpers, checkpoint_helpers) stay here, so this folder goes on sys.path.
No test module imports another test module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
