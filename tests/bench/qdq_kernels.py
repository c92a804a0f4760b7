"""The compiled qdq kernels per layer shape under each way of marking shapes for torch.compile.

    python tests/bench/qdq_kernels.py --json qdq-kernels.json --code-dir qdq-code     # on a GPU

For every layer shape of the 2b and 8b benches (W4 G128 sym, bf16 weights) the compiled qdq
forward and the compiled layer step (`rounding/layer_step.py`) are timed (CUDA events, median of
`--repeats` runs of 20 calls) with the layer dims marked
- dynamic: both dims symbolic, the group size constant (the engine's default: one graph per half);
- static_in: only the out dim symbolic (one graph per distinct in dim: two at Llama shapes);
- static: every dim a constant (one graph per layer shape).
Printed with the bytes each kernel must move (forward: weight 2 + v 4 + output 2 bytes a weight;
step: weight 2 + v 4 + 4 + gradient 2 + best code 1 + 1) as GB/s, and whether the three variants
give equal outputs. `--code-dir`: the generated Triton source of each variant's first compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from signround.adapters.engine import runtime
from signround.rounding import QuantSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported: its sibling
from gpu_check import random_layer  # noqa: E402

SHAPES = {"2b": [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)],
          "8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]}
FWD_BYTES, STEP_BYTES = 8, 14


def _mark(mode: str) -> Callable[..., None]:
    def mark(grouped: torch.Tensor, *per_layer: torch.Tensor) -> None:
        if mode == "static":
            return
        torch._dynamo.maybe_mark_dynamic(grouped, 0)
        torch._dynamo.mark_static(grouped, 2)
        if mode == "dynamic":
            torch._dynamo.maybe_mark_dynamic(grouped, 1)
        for t in per_layer:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            if mode == "dynamic":
                torch._dynamo.maybe_mark_dynamic(t, 1)
    return mark


def _layer(out_f: int, in_f: int, dev: torch.device) -> dict[str, Any]:
    spec = QuantSpec(bits=4, group_size=128, sym=True)
    gw, v, a, b, g = random_layer(out_f, in_f, spec, dev, seed=out_f * 7 + in_f)
    codes = torch.zeros(gw.grouped.shape, dtype=torch.uint8, device=dev)
    return dict(gw=gw, spec=spec, v=v, a=a, b=b, g=g, codes=codes, ba=a.clone(), bb=b.clone())


def _time(fn: Callable[[], Any], repeats: int) -> float:
    """Median microseconds per call over `repeats` runs of 20 calls (wall clock on a CPU)."""
    fn()
    runs = []
    if not torch.cuda.is_available():
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(20):
                fn()
            runs.append((time.perf_counter() - t) * 1e6 / 20)
        return sorted(runs)[len(runs) // 2]
    torch.cuda.synchronize()
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            fn()
        e.record()
        e.synchronize()
        runs.append(s.elapsed_time(e) * 1000 / 20)
    return sorted(runs)[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="dynamic,static_in,static")
    p.add_argument("--sizes", default="2b,8b")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--code-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="small shapes (a dry run on a CPU)")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tiny:
        SHAPES.update({s: [(o // 16, i // 16) for o, i in shapes] for s, shapes in SHAPES.items()})
    from torch._inductor.utils import run_and_get_code

    rows: list[dict[str, Any]] = []
    outputs: dict[tuple, list[torch.Tensor]] = {}
    lrs = torch.tensor([0.005, 0.005], device=dev)
    better = torch.ones((), dtype=torch.bool, device=dev)
    for mode in a.modes.split(","):
        torch._dynamo.reset()
        runtime._COMPILED.clear()
        runtime._dynamic = _mark(mode)  # the engine's shape marking, replaced for this variant
        torch._dynamo.config.automatic_dynamic_shapes = mode != "static"
        ops = runtime._compiled_ops()
        first = True
        for size in a.sizes.split(","):
            for out_f, in_f in SHAPES[size]:
                L = _layer(out_f, in_f, dev)
                gw, spec = L["gw"], L["spec"]
                fargs = (gw.grouped, gw.wmin, gw.wmax, L["v"], L["a"], L["b"], spec, in_f, torch.bfloat16)

                def fwd() -> torch.Tensor:
                    return ops.forward(*fargs)

                v, al, be = L["v"].clone(), L["a"].clone(), L["b"].clone()

                def step() -> None:
                    with torch.no_grad():
                        ops.step(gw.grouped, gw.wmin, gw.wmax, v, al, be, spec, in_f, torch.bfloat16, L["g"], better,
                                 L["codes"], L["ba"], L["bb"], lrs[0], lrs[1], True)

                if first and a.code_dir is not None:
                    a.code_dir.mkdir(parents=True, exist_ok=True)
                    _, code_f = run_and_get_code(fwd)
                    _, code_s = run_and_get_code(step)
                    (a.code_dir / f"{mode}-forward.py").write_text("\n\n".join(code_f))
                    (a.code_dir / f"{mode}-step.py").write_text("\n\n".join(code_s))
                    first = False
                out = fwd()
                # one step from the layer's fresh state, for the equality check across modes
                v.copy_(L["v"]), al.copy_(L["a"]), be.copy_(L["b"])
                step()
                outputs.setdefault((out_f, in_f), []).append(torch.cat([out.float().flatten(), v.flatten()]))
                n = out_f * in_f
                t_f, t_s = _time(fwd, a.repeats), _time(step, a.repeats)
                row = dict(mode=mode, size=size, shape=[out_f, in_f], forward_us=t_f, step_us=t_s,
                           forward_gbs=FWD_BYTES * n / t_f / 1e3, step_gbs=STEP_BYTES * n / t_s / 1e3)
                rows.append(row)
                print(f"{mode:9} {size:3} {out_f:6}x{in_f:<6} forward {t_f:8.1f} us ({row['forward_gbs']:6.0f} GB/s)  "
                      f"step {t_s:8.1f} us ({row['step_gbs']:6.0f} GB/s)", flush=True)
    equal = {f"{k[0]}x{k[1]}": all(torch.equal(outs[0], o) for o in outs[1:]) for k, outs in outputs.items()}
    print("outputs equal across modes:", equal)
    summary: dict[str, Any] = {"rows": rows, "equal_across_modes": equal, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                               "torch": torch.__version__}
    for mode in a.modes.split(","):
        for size in a.sizes.split(","):
            sel = [r for r in rows if r["mode"] == mode and r["size"] == size]
            summary[f"{mode}_{size}_block_us"] = {  # a Llama block: q, o of the first shape; k, v; gate, up; down
                "forward": sum(r["forward_us"] * m for r, m in zip(sel, (2, 2, 2, 1))),
                "step": sum(r["step_us"] * m for r, m in zip(sel, (2, 2, 2, 1)))}
    print(json.dumps({k: v for k, v in summary.items() if k.endswith("block_us")}, indent=1))
    if a.json is not None:
        a.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
