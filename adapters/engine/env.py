"""Every environment variable signround honours, read here and nowhere else.

| variable | meaning | default |
|---|---|---|
| `SIGNROUND_COMPILE` | torch.compile the tuning step's qdq and update (`0`/`1`) | on for CUDA only |
| `SIGNROUND_COMPILE_BLOCK` | also torch.compile the block forward (`0`/`1`) | on for CUDA blocks of > 24 M tuned weights |
| `SIGNROUND_CUDA_GRAPHS` | replay each block's tuning steps from one CUDA graph (`0`/`1`) | on for CUDA blocks of ≤ 24 M tuned weights |
| `SIGNROUND_CACHE` | where converted offline assets are cached | `~/.cache/signround` |
| `SIGNROUND_COMMIT` | the commit a benchmark records when git cannot tell | none |
| `WORLD_SIZE`, `RANK`, `LOCAL_RANK` | torchrun's data-parallel placement | one process |

None of them changes the maths: compile and graph switches change how a step runs, not what it computes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import attrs

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _flag(name: str) -> Optional[bool]:
    raw = os.environ.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} must be 0 or 1 (or true/false, yes/no, on/off)")


@attrs.frozen
class Env:
    """A snapshot of the variables above (None = not set)."""

    compile: Optional[bool]
    compile_block: Optional[bool]
    cuda_graphs: Optional[bool]
    cache_dir: Path
    commit: Optional[str]
    world_size: int
    rank: int
    local_rank: int


def read() -> Env:
    """The environment as it is now."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Env(compile=_flag("SIGNROUND_COMPILE"), compile_block=_flag("SIGNROUND_COMPILE_BLOCK"),
               cuda_graphs=_flag("SIGNROUND_CUDA_GRAPHS"),
               cache_dir=Path(os.environ.get("SIGNROUND_CACHE", Path.home() / ".cache" / "signround")),
               commit=os.environ.get("SIGNROUND_COMMIT") or None, world_size=world, rank=rank,
               local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))
