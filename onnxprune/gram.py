"""Sums of row products accumulated in place with BLAS: the Hessians ``sum x x^T`` and cross moments
``sum y x^T`` that calibration (`calibration.collect_stats`) and the sequential repair
(`repair_stats.sequential_stats`) build from blocks of ~1,024 sampled rows.

``acc += rows.T @ rows`` in numpy allocates the F x F product, faults its pages in and adds it in a second
pass; for ResNet-50's 4,609-feature convs that costs three times the product itself. BLAS with beta = 1
writes into the accumulator directly. Measured on one core, 1,024 float32 rows (scipy's ssyrk against
numpy): 4,609 features 613 -> 149 ms, 2,305: 44 -> 37 ms, 257: the same. The calls go through `cblas` (ctypes,
the GIL released while they run), scipy's wrappers where no CBLAS library is found.
"""

from __future__ import annotations

import numpy as np

# scipy's BLAS is a second OpenBLAS beside numpy's: loaded here, at import, so that `single_threaded_blas`
# (threadpoolctl, which limits the libraries loaded when it is entered) holds it to one thread too; loaded
# inside that block it ran two spinning threads against onnxruntime's (the seq repair's waves 31 -> 36 s)
from scipy.linalg import blas

from onnxprune import cblas

__all__ = ["add_gram", "add_product", "fill_upper", "with_one"]


def with_one(parts: list[np.ndarray]) -> np.ndarray:
    """The rows of `parts` stacked (float32), with a constant feature 1 appended: one copy, the ``[x 1]`` rows of
    a layer with a bias."""
    out = np.empty((sum(len(p) for p in parts), parts[0].shape[1] + 1), np.float32)
    out[:, -1] = 1.0
    at = 0
    for p in parts:
        out[at : at + len(p), :-1] = p
        at += len(p)
    return out


def add_gram(acc: np.ndarray, rows: np.ndarray) -> None:
    """``acc += rows^T rows`` in place (float32), into the lower triangle of `acc` only: its upper triangle is
    left as it was until `fill_upper` completes it, once the sums are done."""
    assert acc.dtype == np.float32 and acc.flags.c_contiguous, "a C-ordered float32 accumulator"
    lib = cblas.library()  # ctypes: the GIL released for the product (`cblas`)
    if lib is not None:
        cblas.syrk_lower(lib, acc, np.ascontiguousarray(rows, np.float32))
        return
    # acc.T is Fortran-ordered: its upper triangle is acc's lower one; rows.T is Fortran-ordered too (no copy)
    out = blas.ssyrk(1.0, np.ascontiguousarray(rows, np.float32).T, beta=1.0, c=acc.T, trans=0, lower=0,
                     overwrite_c=1)
    assert np.shares_memory(out, acc), "ssyrk copied its accumulator"


def add_product(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``acc += a^T b`` in place (float32; `a` [rows, m], `b` [rows, n], `acc` [m, n])."""
    assert acc.dtype == np.float32 and acc.flags.c_contiguous, "a C-ordered float32 accumulator"
    lib = cblas.library()
    if lib is not None:
        cblas.gemm_tn(lib, acc, np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
        return
    # in Fortran order acc is acc.T = b^T a: both transposed operands are Fortran views (no copies)
    out = blas.sgemm(1.0, np.ascontiguousarray(b, np.float32).T, np.ascontiguousarray(a, np.float32).T, beta=1.0,
                     c=acc.T, trans_b=1, overwrite_c=1)
    assert np.shares_memory(out, acc), "sgemm copied its accumulator"


def fill_upper(acc: np.ndarray, block: int = 256) -> np.ndarray:
    """The square `acc` made symmetric from its lower triangle (in place), returned.

    By blocks of rows, each copying the transposed block column below it: 4,609 x 4,609 float32 in 56 ms, where
    one masked copy over the whole matrix (``np.copyto(acc, acc.T, where=...)``) took 309 ms.
    """
    n = len(acc)
    for i in range(0, n, block):
        j = min(n, i + block)
        diagonal = acc[i:j, i:j]
        diagonal[...] = np.tril(diagonal) + np.tril(diagonal, -1).T
        if j < n:
            acc[i:j, j:] = acc[j:, i:j].T
    return acc
