"""Synchronisation of compiled worker threads: atomics on int64 array elements, a barrier that spins briefly
and then sleeps (Linux futex), and the CPU's cycle counter for cheap timing inside compiled code.

Used by the checkerboard sampler (:mod:`.checkerboard`), whose worker threads each run one compiled call for
a whole ``step`` and meet at a barrier between colour phases, with no Python (and no GIL) in between.

The barrier's state is an int64 array ``sync`` of at least 2 elements: ``sync[0]`` = threads arrived,
``sync[1]`` = generation. A waiting thread spins ``spin`` times on the generation, then sleeps on it with
``FUTEX_WAIT`` (x86-64 and AArch64 Linux, a raw ``syscall`` instruction emitted inline, so the compiled code
has no run-time addresses and stays cacheable); elsewhere it only spins. :func:`thread_cpu_ns` reads the
calling thread's CPU clock the same way (a load-independent measure of a piece of work). The last thread to arrive resets the
count, advances the generation and wakes the sleepers. Everything is sequentially consistent (``seq_cst``),
so the writes made before a barrier are visible to every thread after it.
"""

from __future__ import annotations

import platform
import sys
import time

from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_ARCH = platform.machine().lower()
# (syscall instruction, register constraints, {name: number}) of the Linux system calls used here
if sys.platform.startswith("linux") and _ARCH in ("x86_64", "amd64"):
    _SYSCALL = ("syscall", "={rax},{rax},{rdi},{rsi},{rdx},{r10},~{rcx},~{r11},~{memory}",
                {"futex": 202, "clock_gettime": 228})
elif sys.platform.startswith("linux") and _ARCH in ("aarch64", "arm64"):  # pragma: no cover
    _SYSCALL = ("svc #0", "={x0},{x8},{x0},{x1},{x2},{x3},~{memory}", {"futex": 98, "clock_gettime": 113})
else:  # pragma: no cover - other platforms spin and have no thread CPU clock here
    _SYSCALL = None
HAS_FUTEX = _SYSCALL is not None
if HAS_FUTEX or _ARCH in ("aarch64", "arm64"):
    llvm.initialize_native_asmparser()  # numba's LLVM emits inline assembly only with the parser loaded
_FUTEX_WAIT_PRIVATE = 128
_FUTEX_WAKE_PRIVATE = 129
_CLOCK_THREAD_CPUTIME_ID = 3
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
    """A cheap monotonic tick counter: the TSC on x86-64 (``llvm.readcyclecounter``), the virtual counter
    ``cntvct_el0`` on AArch64 (the cycle counter there traps in user mode), 0 elsewhere. Its rate:
    :func:`ticks_per_second`."""
    sig = types.int64()

    def codegen(context, builder, sig, args):
        if _ARCH in ("x86_64", "amd64", "i386", "i686"):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "llvm.readcyclecounter")
            return builder.call(fn, [])
        if _ARCH in ("aarch64", "arm64"):  # pragma: no cover
            asm = ir.InlineAsm(ir.FunctionType(_I64, []), "mrs $0, cntvct_el0", "=r", side_effect=True)
            return builder.call(asm, [])
        return ir.Constant(_I64, 0)  # pragma: no cover
    return sig, codegen


def _syscall_codegen(name, builder, a1, a2, a3):
    """``syscall(name, a1, a2, a3, 0)`` as inline assembly (int64 registers); 0 where there is none."""
    if _SYSCALL is None:  # pragma: no cover
        return ir.Constant(_I64, 0)
    asm = ir.InlineAsm(ir.FunctionType(_I64, [_I64] * 5), _SYSCALL[0], _SYSCALL[1], side_effect=True)
    return builder.call(asm, [ir.Constant(_I64, _SYSCALL[2][name]), a1, a2, a3, ir.Constant(_I64, 0)])


@intrinsic
def _futex(typingctx, arr, idx, op, val):
    """``futex(&arr[idx], op, val, NULL)`` on the low 32 bits of an int64 element (little-endian); a no-op
    returning 0 where there is no futex."""
    sig = types.int64(arr, types.intp, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        addr = builder.ptrtoint(_item_ptr(context, builder, sig.args[0], args[0], args[1]), _I64)
        return _syscall_codegen("futex", builder, addr, args[2], args[3])
    return sig, codegen


@intrinsic
def _thread_clock(typingctx, arr, idx):
    """``clock_gettime(CLOCK_THREAD_CPUTIME_ID, (timespec *) &arr[idx])`` (int64 array, 2 elements)."""
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, sig, args):
        addr = builder.ptrtoint(_item_ptr(context, builder, sig.args[0], args[0], args[1]), _I64)
        return _syscall_codegen("clock_gettime", builder, ir.Constant(_I64, _CLOCK_THREAD_CPUTIME_ID), addr,
                                ir.Constant(_I64, 0))
    return sig, codegen


@njit(cache=True, inline="always")
def thread_cpu_ns(buf, idx):
    """CPU time of the calling thread in ns (a system call, ≈ 0.1–1 µs), using ``buf[idx], buf[idx + 1]`` as
    the timespec; 0 where it is not available."""
    buf[idx] = 0
    buf[idx + 1] = 0
    _thread_clock(buf, idx)
    return buf[idx] * 1000000000 + buf[idx + 1]


@njit(cache=True, inline="always")
def barrier(sync, n_threads, spin):
    """Wait until ``n_threads`` threads have called ``barrier`` on ``sync`` (see the module docstring),
    spinning ``spin`` ticks of :func:`cycles` before sleeping."""
    if n_threads <= 1:
        return
    g = atomic_load(sync, 1)
    if atomic_add(sync, 0, 1) == n_threads - 1:
        atomic_add(sync, 0, -n_threads)
        atomic_add(sync, 1, 1)
        _futex(sync, 1, _FUTEX_WAKE_PRIVATE, 2147483647)
        return
    t0 = cycles()
    while atomic_load(sync, 1) == g:
        if cycles() - t0 > spin:
            _futex(sync, 1, _FUTEX_WAIT_PRIVATE, g & 0xFFFFFFFF)


@njit(cache=True)
def cycles_now():
    """:func:`cycles` callable from Python."""
    return cycles()


_RATE = []


def ticks_per_second() -> float:
    """Rate of :func:`cycles`, measured once per process over ≈ 5 ms (0.0 where there is no counter)."""
    if not _RATE:
        cycles_now()  # compiled / loaded before the clock starts
        w0, c0 = time.perf_counter(), cycles_now()
        while time.perf_counter() - w0 < 0.005:
            pass
        _RATE.append((cycles_now() - c0) / (time.perf_counter() - w0))
    return _RATE[0]
