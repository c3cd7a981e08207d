"""Synchronisation of compiled worker threads: atomics on int64 array elements, a barrier that spins briefly
and then sleeps (Linux futex), and the CPU's cycle counter for cheap timing inside compiled code.

Used by the checkerboard sampler (:mod:`.checkerboard`), whose worker threads each run one compiled call for
a whole ``step`` and meet at a barrier between colour phases, with no Python (and no GIL) in between.

The barrier's state is an int64 array ``sync`` of at least 2 elements: ``sync[0]`` = threads arrived,
``sync[1]`` = generation. A waiting thread spins ``spin`` times on the generation, then sleeps on it with
``FUTEX_WAIT`` (x86-64 and AArch64 Linux, a raw ``syscall`` instruction emitted inline, so the compiled code
has no run-time addresses and stays cacheable); elsewhere it only spins. The last thread to arrive resets the
count, advances the generation and wakes the sleepers. Everything is sequentially consistent (``seq_cst``),
so the writes made before a barrier are visible to every thread after it.
"""

from __future__ import annotations

import platform
import sys

from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_ARCH = platform.machine().lower()
if sys.platform.startswith("linux") and _ARCH in ("x86_64", "amd64"):
    _SYSCALL = (202, "syscall", "={rax},{rax},{rdi},{rsi},{rdx},{r10},~{rcx},~{r11},~{memory}")
elif sys.platform.startswith("linux") and _ARCH in ("aarch64", "arm64"):
    _SYSCALL = (98, "svc #0", "={x0},{x8},{x0},{x1},{x2},{x3},~{memory}")
else:  # pragma: no cover - other platforms spin
    _SYSCALL = None
HAS_FUTEX = _SYSCALL is not None
if HAS_FUTEX:
    llvm.initialize_native_asmparser()  # numba's LLVM emits inline assembly only with the parser loaded
_FUTEX_WAIT_PRIVATE = 128
_FUTEX_WAKE_PRIVATE = 129
_I64 = ir.IntType(64)


def _item_ptr(context, builder, aryty, ary_val, idx):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [idx])


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """``arr[idx] += val`` atomically (int64 array); returns the value before the addition."""
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
    return sig, codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]`` read atomically (int64 array)."""
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)
    return sig, codegen


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (``llvm.readcyclecounter``: the TSC on x86-64, 0 where there is none)."""
    sig = types.int64()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])
    return sig, codegen


@intrinsic
def _futex(typingctx, arr, idx, op, val):
    """``futex(&arr[idx], op, val, NULL)`` on the low 32 bits of an int64 element (little-endian); a no-op
    returning 0 where there is no futex."""
    sig = types.int64(arr, types.intp, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        if _SYSCALL is None:  # pragma: no cover
            return ir.Constant(_I64, 0)
        addr = builder.ptrtoint(_item_ptr(context, builder, sig.args[0], args[0], args[1]), _I64)
        fnty = ir.FunctionType(_I64, [_I64] * 5)
        asm = ir.InlineAsm(fnty, _SYSCALL[1], _SYSCALL[2], side_effect=True)
        return builder.call(asm, [ir.Constant(_I64, _SYSCALL[0]), addr, args[2], args[3], ir.Constant(_I64, 0)])
    return sig, codegen


@njit(cache=True, inline="always")
def barrier(sync, n_threads, spin):
    """Wait until ``n_threads`` threads have called ``barrier`` on ``sync`` (see the module docstring)."""
    if n_threads <= 1:
        return
    g = atomic_load(sync, 1)
    if atomic_add(sync, 0, 1) == n_threads - 1:
        atomic_add(sync, 0, -n_threads)
        atomic_add(sync, 1, 1)
        _futex(sync, 1, _FUTEX_WAKE_PRIVATE, 2147483647)
        return
    n = 0
    while atomic_load(sync, 1) == g:
        n += 1
        if n > spin:
            _futex(sync, 1, _FUTEX_WAIT_PRIVATE, g & 0xFFFFFFFF)


@njit(cache=True)
def cycles_now():
    """:func:`cycles` callable from Python."""
    return cycles()
