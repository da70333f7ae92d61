"""Ahead-of-time compile report of the Triton MoE kernels (``moue.triton_moe``): what can be
checked about the GPU path on a machine without a GPU (registers, spills, shared memory, software
pipelining, tensor-core instructions), for ``moue bench moe`` and the tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

from moue.triton_moe import BLOCK_P, KERNELS, SMALL, Blocks

__all__ = ["compile_report"]

_KERNEL_ARGS = {
    "_up_kernel": ("x_ptr", "tok_ptr", "w_ptr", "offs_ptr", "tile_ends_ptr", "h_ptr", "D", "F", "P",
                   "stride_xt", "stride_we", "stride_wd", "stride_wf", "stride_hs"),
    "_down_kernel": ("h_ptr", "w_ptr", "gate_ptr", "offs_ptr", "tile_ends_ptr", "y_ptr", "F", "D", "P",
                     "stride_hs", "stride_we", "stride_wf", "stride_wd", "stride_ys"),
}
_INT_PTRS = {"tok_ptr", "offs_ptr", "tile_ends_ptr"}
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _launch_args(kernel: str, D: int, F: int, P: int) -> dict[str, int | None]:
    """The integer arguments ``_launch`` passes for contiguous tensors of these sizes (``None``
    for pointers)."""
    if kernel == "_up_kernel":
        ints = {"D": D, "F": F, "P": P, "stride_xt": D, "stride_we": D * 2 * F, "stride_wd": 2 * F,
                "stride_wf": 1, "stride_hs": F}
    else:
        ints = {"F": F, "D": D, "P": P, "stride_hs": F, "stride_we": F * D, "stride_wf": D,
                "stride_wd": 1, "stride_ys": D}
    return {a: ints.get(a) for a in _KERNEL_ARGS[kernel]}


def compile_report(arch: int = 90, dtype: str = "bf16", blocks: Blocks = SMALL, *,
                   D: int = 1024, F: int = 512, P: int = 64) -> dict[str, dict]:
    """Compile both kernels for an NVIDIA GPU of compute capability ``arch`` (80, 90, ...) without
    one: Triton's ahead-of-time path down to a cubin with the ptxas Triton ships, then the cubin's
    resource usage from the bundled ``cuobjdump``.

    The kernels are specialised the way Triton's launcher specialises them for a call with
    contiguous tensors of sizes ``D``, ``F``, ``P`` (default: the GPU benchmark's large shape):
    integer arguments equal to 1 (the unit strides) become constants, pointers and integers
    divisible by 16 get ``tt.divisibility = 16`` (what enables vectorised, pipelined loads), as in
    ``triton.tools.compile``. Per kernel: ``registers`` per thread, ``spill_bytes`` (local memory +
    stack: registers that did not fit), ``shared_bytes`` (static + Triton's dynamic shared memory
    for the pipelined tiles), ``cp_async`` (asynchronous global->shared copies in the PTX: the
    software pipeline), ``mma`` (the tensor-core instruction family in the PTX: ``wgmma`` on Hopper,
    ``mma`` on Ampere, ``None`` if the dots fell back to FMAs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {"_up_kernel": (KERNELS["_up_kernel"], blocks.n_up), "_down_kernel": (KERNELS["_down_kernel"], blocks.n_down)}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = {}
    for name, (fn, block_n) in kernels.items():
        signature, attrs = {}, {}
        constexprs: dict[str, int] = {}
        for i, (arg, value) in enumerate(_launch_args(name, D, F, P).items()):
            if value is None:  # a pointer (torch allocations are 16-byte aligned)
                signature[arg] = "*i32" if arg in _INT_PTRS else f"*{dtype}"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif value == 1:
                signature[arg], constexprs[arg] = "constexpr", 1
            else:
                signature[arg] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        tiles = {"BLOCK_M": blocks.m, "BLOCK_N": block_n, "BLOCK_K": blocks.k, "BLOCK_P": BLOCK_P}
        signature.update(dict.fromkeys(tiles, "constexpr"))
        constexprs.update(tiles)
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": blocks.warps, "num_stages": blocks.stages})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        reg, stack, static_shared, local = map(int, _RES.search(usage).groups())
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else None
        out[name] = {"registers": reg, "spill_bytes": stack + local, "mma": mma,
                     "shared_bytes": static_shared + compiled.metadata.shared,
                     "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
                     "target": f"sm_{arch}{'a' if arch == 90 else ''}", "dtype": dtype, "blocks": blocks}
    return out
