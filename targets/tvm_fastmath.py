"""Vectorisable float32 ``exp`` and ``erf`` for the LLVM targets (x86, AArch64, wasm).

TVM lowers ``tirx.exp`` / ``tirx.erf`` on LLVM to calls of libm's ``expf`` / ``erff``: one scalar call per
element even inside a vectorised loop (LLVM has no vector libm here). BERT's GELU (``x * (erf(x / sqrt 2) + 1)
/ 2``) then cost 28 ns an element (MiniLM-L6, seq 128: 5.4 ms per FFN epilogue of 128x1536, a third of the
whole encoder), softmax's ``exp`` 6.5 ns. As polynomials of the same accuracy they vectorise with the loop
around them:

* :func:`fast_exp`: Cephes ``expf``: ``2^n * p(r)``, ``n = round(x / ln 2)``, ``r = x - n ln 2`` (ln 2 split
  in two constants), ``p`` of degree 7, ``2^n`` built in the exponent bits; relative error < 3e-7 down to
  ``exp(-87)``, denormal results below (2^n applied in two halves), 0 below -104, inf above 88.7.
* :func:`fast_erf`: the rational approximation of Eigen / TVM's ``fast_erf`` (odd degree-13 numerator, even
  degree-8 denominator, input clamped to ``[-4, 4]`` where erf is +-1 in float32); absolute error ~1e-7.

:func:`install` registers them as the LLVM lowering of ``tirx.exp`` and ``tirx.erf`` (float32 only; other
other dtypes keep the rule registered before), once per process. Nothing else changes: a kernel that calls ``T.exp`` gets the
polynomial when it is lowered. Start reading at :func:`install`.
"""

from __future__ import annotations

import tvm
from tvm import tirx

__all__ = ["fast_erf", "fast_exp", "install"]

_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # fmt: skip
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)  # fmt: skip
_installed = False


def _dtype(e: tirx.PrimExpr) -> tuple[str, int]:
    """(element dtype, lanes) of an expression (TVM 0.27 keeps the dtype on ``e.ty``)."""
    dt = e.ty.dtype if hasattr(e, "ty") else e.dtype
    return str(dt).split("x")[0], int(getattr(dt, "lanes", 1))


def _c(value: float, like: tirx.PrimExpr) -> tirx.PrimExpr:
    """A constant of ``like``'s dtype (broadcast when ``like`` is a vector)."""
    base, lanes = _dtype(like)
    c = tirx.const(value, base)
    return tirx.Broadcast(c, lanes) if lanes > 1 else c


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` for a float32 (scalar or vector) expression, see the module doc."""
    x = tirx.max(tirx.min(x, _c(89.0, x)), _c(-104.0, x))
    n = tirx.floor(x * _c(_LOG2E, x) + _c(0.5, x))
    r = x - n * _c(_LN2_HI, x) - n * _c(_LN2_LO, x)
    p = _c(_EXP_POLY[0], x)
    for coef in _EXP_POLY[1:]:
        p = p * r + _c(coef, x)
    p = p * r * r + r + _c(1.0, x)
    base, lanes = _dtype(x)
    suffix = "" if lanes == 1 else f"x{lanes}"
    ni = tirx.Cast(f"int32{suffix}", n)
    # 2^n as 2^(n/2) * 2^(n - n/2): each half is a normal float down to n = -150 (denormal results)
    half = tirx.shift_right(ni, _c(1, ni))
    scale = [tirx.reinterpret(f"{base}{suffix}", tirx.shift_left(e + _c(127, ni), _c(23, ni))) for e in (half, ni - half)]
    return p * scale[0] * scale[1]


def fast_erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``erf(x)`` for a float32 (scalar or vector) expression, see the module doc."""
    x = tirx.max(tirx.min(x, _c(4.0, x)), _c(-4.0, x))
    x2 = x * x
    p = _c(_ERF_ALPHA[0], x)
    for coef in _ERF_ALPHA[1:]:
        p = p * x2 + _c(coef, x)
    q = _c(_ERF_BETA[0], x)
    for coef in _ERF_BETA[1:]:
        q = q * x2 + _c(coef, x)
    return x * p / q


def _rule(fast, previous):
    def lower(call: tirx.PrimExpr) -> tirx.PrimExpr:
        base, _lanes = _dtype(call.args[0])
        # other dtypes: the rule that was registered before (a rule must return an expression)
        return fast(call.args[0]) if base == "float32" else previous(call)

    return lower


def install() -> None:
    """Register :func:`fast_exp` / :func:`fast_erf` as the LLVM lowering of float32 ``exp`` / ``erf``."""
    global _installed
    if _installed:
        return
    for name, fast in (("tirx.exp", fast_exp), ("tirx.erf", fast_erf)):
        op = tvm.ir.Op.get(name)
        previous = op.get_attr("llvm.FLowerIntrinsic") or op.get_attr("default.FLowerIntrinsic")
        tirx.register_intrin_lowering(name, target="llvm", f=_rule(fast, previous), level=120)
    _installed = True
