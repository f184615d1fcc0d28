"""BLAS and LAPACK calls that release the GIL: the loaded OpenBLAS (or any CBLAS / LAPACKE library) through ctypes.

scipy's f2py wrappers (`scipy.linalg.blas`, `scipy.linalg.lapack`) hold the GIL for the whole call. The
calibration products (`gram`) run in a worker thread beside onnxruntime's runs and the main thread's row
drawing, and OBS scores two groups at once (`criteria.OBS.score_all`): with the GIL held through every
product, those threads took turns instead of running together. Measured with py-spy --gil on ResNet-50's
obs + seq prune (256 samples): 25 s of ssyrk and 4 s of sgemm held the GIL (the statistics pass and the seq
waves), and 5 s of potrf / potri in the OBS scores. ctypes releases the GIL around a foreign call.

`library()` finds the routines in the BLAS libraries threadpoolctl sees loaded (scipy's own OpenBLAS first, the
one `scipy.linalg.blas` calls, so the results are those of the f2py wrappers), under the names the wheels and
the usual builds export (``scipy_cblas_ssyrk``, ``scipy_cblas_ssyrk64_``, ``cblas_ssyrk``), checks them on a
small product, and is None where none is found: the callers then use scipy's wrappers as before.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Cblas", "cholesky_inverse", "gemm_tn", "gesv", "library", "syrk_lower"]

ROW_MAJOR, COL_MAJOR = 101, 102
NO_TRANS, TRANS = 111, 112
UPPER, LOWER = 121, 122
LAPACK_COL_MAJOR = 102

# (symbol prefix, suffix, integer type): scipy's and numpy's wheels (OpenBLAS, LP64 and ILP64), plain CBLAS (LP64)
_NAMINGS = (("scipy_", "", ctypes.c_int32), ("scipy_", "64_", ctypes.c_int64), ("", "", ctypes.c_int32))


@dataclass(frozen=True)
class Cblas:
    """The routines of one library: ssyrk / sgemm (CBLAS), spotrf / spotri / dpotrf / dpotri / dgesv (LAPACKE)."""

    path: str
    ssyrk: Callable[..., Any]
    sgemm: Callable[..., Any]
    potrf: dict[Any, Callable[..., Any]]  # by numpy scalar type: float32 (s), float64 (d)
    potri: dict[Any, Callable[..., Any]]
    dgesv: Callable[..., Any]
    int_type: type


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _bind(lib: ctypes.CDLL, prefix: str, suffix: str, it: type) -> Cblas | None:
    def fn(name: str, res: type | None, *args: type) -> Callable[..., Any]:
        f = getattr(lib, prefix + name + suffix)
        f.restype, f.argtypes = res, list(args)
        return f

    p, f32 = ctypes.c_void_p, ctypes.c_float
    try:
        ssyrk = fn("cblas_ssyrk", None, ctypes.c_int, ctypes.c_int, ctypes.c_int, it, it, f32, p, it, f32, p, it)
        sgemm = fn("cblas_sgemm", None, ctypes.c_int, ctypes.c_int, ctypes.c_int, it, it, it, f32, p, it, p, it, f32,
                   p, it)
        potrf = {np.float32: fn("LAPACKE_spotrf", it, ctypes.c_int, ctypes.c_char, it, p, it),
                 np.float64: fn("LAPACKE_dpotrf", it, ctypes.c_int, ctypes.c_char, it, p, it)}
        potri = {np.float32: fn("LAPACKE_spotri", it, ctypes.c_int, ctypes.c_char, it, p, it),
                 np.float64: fn("LAPACKE_dpotri", it, ctypes.c_int, ctypes.c_char, it, p, it)}
        dgesv = fn("LAPACKE_dgesv", it, ctypes.c_int, it, it, p, it, p, p, it)
    except AttributeError:
        return None
    # LAPACKE scans its inputs for NaN (an extra pass, and an error where LAPACK itself, as scipy's wrappers call
    # it, returns NaNs): off, so both paths behave alike. Only LAPACKE callers of this library see the setting.
    nancheck = getattr(lib, prefix + "LAPACKE_set_nancheck" + suffix, None)
    if nancheck is not None:
        nancheck.restype, nancheck.argtypes = None, [ctypes.c_int]
        nancheck(0)
    return Cblas(lib._name, ssyrk, sgemm, potrf, potri, dgesv, it)


def _works(c: Cblas) -> bool:
    """A small ssyrk, sgemm and Cholesky inverse against numpy (a wrong integer width or naming fails here)."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((7, 5)).astype(np.float32)
    acc = np.zeros((5, 5), np.float32)
    c.ssyrk(ROW_MAJOR, LOWER, TRANS, 5, 7, 1.0, _ptr(rows), 5, 0.0, _ptr(acc), 5)
    want = rows.T @ rows
    if not np.allclose(np.tril(acc), np.tril(want), rtol=1e-4, atol=1e-4):
        return False
    b = rng.standard_normal((7, 3)).astype(np.float32)
    prod = np.zeros((5, 3), np.float32)
    c.sgemm(ROW_MAJOR, TRANS, NO_TRANS, 5, 3, 7, 1.0, _ptr(rows), 5, _ptr(b), 3, 0.0, _ptr(prod), 3)
    if not np.allclose(prod, rows.T @ b, rtol=1e-4, atol=1e-4):
        return False
    spd = np.asfortranarray(want.astype(np.float64) + np.eye(5))
    inv = spd.copy(order="F")
    if c.potrf[np.float64](LAPACK_COL_MAJOR, b"U", 5, _ptr(inv), 5) != 0:
        return False
    if c.potri[np.float64](LAPACK_COL_MAJOR, b"U", 5, _ptr(inv), 5) != 0:
        return False
    full = np.triu(inv) + np.triu(inv, 1).T
    return bool(np.allclose(full, np.linalg.inv(spd), rtol=1e-6, atol=1e-8))


@functools.cache
def library() -> Cblas | None:
    """The first loaded BLAS library that exports the routines under a known naming and passes `_works`; None if
    none does (the callers fall back to scipy's wrappers)."""
    from scipy.linalg import blas  # noqa: F401  (scipy's OpenBLAS loaded, so threadpoolctl lists it)
    from threadpoolctl import threadpool_info

    paths = [info["filepath"] for info in threadpool_info() if info.get("user_api") == "blas"]
    paths.sort(key=lambda path: "scipy.libs" not in path)  # the library scipy's wrappers call, first
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, it in _NAMINGS:
            bound = _bind(lib, prefix, suffix, it)
            if bound is not None and _works(bound):
                return bound
    return None


def syrk_lower(c: Cblas, acc: np.ndarray, rows: np.ndarray) -> None:
    """``acc += rows^T rows`` into the lower triangle of the C-ordered float32 `acc` (rows: C-ordered float32)."""
    n, k = acc.shape[0], rows.shape[0]
    c.ssyrk(ROW_MAJOR, LOWER, TRANS, n, k, 1.0, _ptr(rows), n, 1.0, _ptr(acc), n)


def gemm_tn(c: Cblas, acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``acc += a^T b`` (C-ordered float32 `acc` [m, n], `a` [rows, m], `b` [rows, n])."""
    m, n = acc.shape
    c.sgemm(ROW_MAJOR, TRANS, NO_TRANS, m, n, a.shape[0], 1.0, _ptr(a), m, _ptr(b), n, 1.0, _ptr(acc), n)


def cholesky_inverse(c: Cblas, fortran: np.ndarray) -> int:
    """The inverse of the symmetric positive definite Fortran-ordered float32 / float64 `fortran` in its upper
    triangle, in place (potrf, potri; the lower triangle left as it was); LAPACK's info (0: done)."""
    n = len(fortran)
    info = int(c.potrf[fortran.dtype.type](LAPACK_COL_MAJOR, b"U", n, _ptr(fortran), n))
    if info == 0:
        info = int(c.potri[fortran.dtype.type](LAPACK_COL_MAJOR, b"U", n, _ptr(fortran), n))
    return info


def gesv(c: Cblas, fortran: np.ndarray, rhs: np.ndarray) -> int:
    """``rhs := fortran^-1 rhs`` by LU, both Fortran-ordered float64, in place (`fortran` overwritten); info."""
    n = len(fortran)
    ipiv = np.empty(n, np.int64 if c.int_type is ctypes.c_int64 else np.int32)
    return int(c.dgesv(LAPACK_COL_MAJOR, n, rhs.shape[1], _ptr(fortran), n, _ptr(ipiv), _ptr(rhs), n))
