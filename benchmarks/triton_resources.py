"""What lenet.triton_book's kernels cost a Hopper GPU, read without one: each kernel compiled
for sm_90 (H100, H200) by Triton's own compiler and ptxas, then its registers per thread,
spilled bytes, shared memory, and its machine code's instruction mix (cuobjdump).

    python benchmarks/triton_resources.py [KERNEL ...] [--against REV]

Registers bound how many warps a multiprocessor holds (65,536 registers: 8 warps at 255
registers, 16 at 128); a STACK above 0 is registers spilled to local memory; SHFL and BAR
count the cross-thread reductions' shuffles and barriers. Counts are of the code, not of its
execution: a loop Triton did not unroll counts once. Not timings: a GPU measures those
(benchmarks/gpu_speed.py). Runs on a CPU with the triton package alone.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lenet import triton_book as k

# kernel: (warps it launches with, as _BookLeNet does; its arguments that are not float
# pointers: an integer's type, or a compile-time constant's value at a batch of 128)
KERNELS = {
    "_forward": (k.PROGRAM_WARPS, {}),
    "_backward": (k.PROGRAM_WARPS, {}),
    "_forward_conv1": (k.SPLIT_WARPS, {}),
    "_forward_conv2": (k.SPLIT_WARPS, {}),
    "_forward_dense": (k.PROGRAM_WARPS, {"y_ptr": "*i64", "smoothing": "fp32", "LOSS": True}),
    "_backward_dense": (k.PROGRAM_WARPS, {}),
    "_backward_conv": (k.SPLIT_WARPS, {}),
    "_sum_images": (4, {"IMAGES": 128, "width": "i32", "BLOCK": 64, "BN": 32}),
    "_outer_sum": (4, {"a_stride": "i32", "b_stride": "i32", "IMAGES": 128, "rows": "i32",
                       "cols": "i32", "BR": 32, "BC": 32, "BN": 32}),
    "_batch_sums": (4, {"IMAGES": 128}),
}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
COUNTED = ("FFMA", "LDG", "STG", "LDS", "STS", "SHFL", "BAR")


def compile_for_hopper(fn, warps: int, args: dict | None = None) -> tuple[bytes, int]:
    """A @triton.jit kernel compiled for sm_90: (its cubin, its shared memory in bytes).
    `args` gives the arguments that are not float pointers (as in KERNELS)."""
    args = args or {}
    signature = {a: args[a] if isinstance(args.get(a), str) else
                 "constexpr" if a in args else "*fp32" for a in fn.arg_names}
    constants = {a: v for a, v in args.items() if not isinstance(v, str)}
    # 16-byte aligned, as Triton specializes a kernel for torch's (256-byte aligned) tensors
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if signature[a] == "*fp32"}
    compiled = triton.compile(ASTSource(fn, signature, constants, aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return compiled.asm["cubin"], compiled.metadata.shared


def cuobjdump(cubin: bytes, option: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([TOOLS / "cuobjdump", option, f.name], capture_output=True,
                              text=True, check=True).stdout


def machine_code(cubin: bytes) -> list[str]:
    """The cubin's SASS, one instruction per item, without addresses and encodings."""
    return [line.split("*/", 1)[1].split(";")[0].strip()
            for line in cuobjdump(cubin, "--dump-sass").splitlines()
            if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]


def resources(cubin: bytes) -> dict:
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)",
                            cuobjdump(cubin, "--dump-resource-usage")))
    ops = [line.split() for line in machine_code(cubin)]
    opcodes = [op[1] if op and op[0].startswith("@") else op[0] for op in ops if op]
    counts = {name: sum(o.split(".")[0] == name for o in opcodes) for name in COUNTED}
    return {"regs": int(found["REG"]), "stack": int(found["STACK"]),
            "instructions": len(opcodes), **counts}


def module_at(rev: str):
    """lenet.triton_book as it was at git revision `rev`, imported on its own."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/lenet/triton_book.py"], cwd=root,
                            capture_output=True, text=True)
    if source.returncode:
        sys.exit(f"triton_resources.py: {rev}: {source.stderr.strip()}")
    folder = Path(tempfile.mkdtemp())
    path = folder / ("triton_book_" + re.sub(r"\W", "_", rev) + ".py")
    path.write_text(source.stdout)  # Triton's jit reads a kernel's source from its file
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(rev: str, names: list[str]) -> None:
    """Whether each kernel compiles to the same SASS at `rev` as in the working tree, and
    both sides' registers, instructions, shuffles and barriers."""
    old = module_at(rev)
    print(f"Triton {triton.__version__}, sm_90: the working tree's kernels against {rev}'s")
    for name in names:
        warps, args = KERNELS[name]
        if not hasattr(old, name):
            print(f"{name}: not at {rev}")
            continue
        ours, theirs = (compile_for_hopper(getattr(m, name), warps, args)[0] for m in (k, old))
        same = "the same" if machine_code(ours) == machine_code(theirs) else "different"
        sides = [f"{where}: " + ", ".join(f"{key} {r[key]}" for key in
                                          ("regs", "stack", "instructions", "SHFL", "BAR"))
                 for where, r in (("here", resources(ours)), (rev, resources(theirs)))]
        print(f"{name}: {same} machine code ({'; '.join(sides)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", nargs="*", metavar="KERNEL",
                   help=f"kernels to compile (default: all of {', '.join(KERNELS)})")
    p.add_argument("--against", metavar="REV",
                   help="instead, say whether each kernel compiles to the same machine code "
                   "as at git revision REV (a refactor that must not change a measured kernel)")
    a = p.parse_args()
    unknown = [name for name in a.kernels if name not in KERNELS]
    if unknown:
        p.error(f"no kernel {unknown[0]!r}: expected one of {', '.join(KERNELS)}")
    if a.against:
        return compare(a.against, a.kernels or list(KERNELS))
    print(f"Triton {triton.__version__}, sm_90")
    print("| kernel | warps | regs | stack B | shared B | instructions | "
          + " | ".join(COUNTED) + " |")
    print("|---|" + "---|" * (5 + len(COUNTED)))
    for name in a.kernels or KERNELS:
        warps, args = KERNELS[name]
        cubin, shared = compile_for_hopper(getattr(k, name), warps, args)
        r = resources(cubin)
        print(f"| {name} | {warps} | {r['regs']} | {r['stack']} | {shared} | "
              f"{r['instructions']} | " + " | ".join(str(r[c]) for c in COUNTED) + " |",
              flush=True)


if __name__ == "__main__":
    main()
