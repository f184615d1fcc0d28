"""`cblas`: the products and factorizations of calibration through ctypes give scipy's wrappers' results bit for
bit, and release the GIL while they run (what lets the products' worker, onnxruntime's runs and the main thread
run together)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy

from onnxprune import cblas, criteria, gram, repair_stream


def _wheel_openblas() -> bool:
    return (Path(scipy.__file__).parent.parent / "scipy.libs").is_dir()


def test_the_library_of_scipys_wheel_is_found_and_checked():
    if not _wheel_openblas():
        pytest.skip("scipy is not a PyPI wheel here (no scipy.libs): the callers use scipy's wrappers")
    lib = cblas.library()
    assert lib is not None and "scipy.libs" in lib.path  # the library scipy's own wrappers call


@pytest.fixture
def both():
    """(ctypes library, None): the two paths of every caller."""
    lib = cblas.library()
    if lib is None:
        pytest.skip("no CBLAS / LAPACKE library found: only scipy's wrappers")
    return lib


def test_products_equal_scipys_bit_for_bit(both, monkeypatch):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 97)).astype(np.float32)
    other = rng.standard_normal((300, 13)).astype(np.float32)
    start = rng.standard_normal((97, 97)).astype(np.float32)
    got = {}
    for name, lib in (("ctypes", both), ("scipy", None)):
        monkeypatch.setattr(cblas, "library", lambda lib=lib: lib)
        acc, cross = start.copy(), np.ones((97, 13), np.float32)
        gram.add_gram(acc, rows)
        gram.add_product(cross, rows, other)
        got[name] = (np.tril(acc), np.triu(acc, 1), cross)
    for a, b in zip(got["ctypes"], got["scipy"]):
        assert np.array_equal(a, b)
    assert np.array_equal(got["ctypes"][1], np.triu(start, 1))  # the upper triangle is left as it was
    assert np.allclose(got["ctypes"][0], np.tril(start + rows.T @ rows), rtol=1e-4, atol=1e-3)


def test_factorizations_equal_scipys_bit_for_bit(both, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 60))
    H = (x.T @ x / 400).astype(np.float32)
    rhs = rng.standard_normal((60, 7))
    got = {}
    for name, lib in (("ctypes", both), ("scipy", None)):
        monkeypatch.setattr(cblas, "library", lambda lib=lib: lib)
        inverse = criteria.damped_inverse(H, 0.01)
        in_place = criteria.damped_inverse(H.copy(), 0.01, overwrite=True)
        solved = repair_stream.symmetric_solve(np.ascontiguousarray(H, np.float64) + np.eye(60), rhs.copy())
        got[name] = (inverse, in_place, solved)
    for a, b in zip(got["ctypes"], got["scipy"]):
        assert a is not None and b is not None and np.array_equal(a, b)
    lam = 0.01 * float(np.mean(np.diag(H)[:-1])) + 1e-12
    assert np.allclose(got["ctypes"][0], np.linalg.inv(H.astype(np.float64) + lam * np.eye(60)), rtol=1e-3, atol=1e-3)
    assert np.allclose(got["ctypes"][2], np.linalg.solve(H.astype(np.float64) + np.eye(60), rhs))
    not_spd = -np.eye(5, dtype=np.float32)  # float32 Cholesky fails: None in place, float64 retry then inv
    assert criteria.damped_inverse(not_spd.copy(), 0.0, overwrite=True) is None


def _longest_stall(products) -> tuple[float, float]:
    """(longest gap between two iterations of a pure-Python loop on this thread while `products` ran in another
    thread, seconds the products took): a call that holds the GIL stalls the loop for its whole length."""
    done = threading.Event()

    def work() -> None:
        products()
        done.set()

    t = threading.Thread(target=work)
    start = last = time.perf_counter()
    longest = 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    t.join()
    return longest, time.perf_counter() - start


@pytest.mark.exclusive
def test_the_gil_is_released_during_the_products(both, monkeypatch):
    """One long product in a thread: beside scipy's wrapper the Python loop here stalls for most of it (the
    check that the measurement can tell), beside the ctypes call it keeps running (a loaded machine's scheduling
    gaps are far shorter than the call)."""
    from onnxprune.calibration import single_threaded_blas

    rows = np.random.default_rng(2).standard_normal((4096, 2500)).astype(np.float32)
    stall = {}
    with single_threaded_blas():
        for name, lib in (("ctypes", both), ("scipy", None)):
            monkeypatch.setattr(cblas, "library", lambda lib=lib: lib)
            acc = np.zeros((2500, 2500), np.float32)
            stall[name] = _longest_stall(lambda acc=acc: gram.add_gram(acc, rows))
    (ctypes_gap, ctypes_s), (scipy_gap, scipy_s) = stall["ctypes"], stall["scipy"]
    assert scipy_gap > 0.5 * scipy_s, stall
    assert ctypes_gap < 0.25 * ctypes_s, stall


def test_non_finite_statistics_behave_as_with_scipys_wrappers(both, monkeypatch):
    """LAPACKE's NaN scan is off: a Hessian with a NaN (a model whose activations overflowed) gives what scipy's
    wrappers gave (the same LAPACK routine on the same values), not a new error."""
    H = np.eye(6) + 0.1
    H[2, 3] = H[3, 2] = np.nan
    outcome = {}
    for name, lib in (("ctypes", both), ("scipy", None)):
        monkeypatch.setattr(cblas, "library", lambda lib=lib: lib)
        try:
            outcome[name] = repair_stream.symmetric_solve(H.copy(), np.ones((6, 2)))
        except np.linalg.LinAlgError as e:
            outcome[name] = str(e)
        outcome[name + " inverse"] = criteria.damped_inverse(H.astype(np.float32), 0.01)
    for key in ("ctypes", "ctypes inverse"):
        a, b = outcome[key], outcome[key.replace("ctypes", "scipy")]
        assert type(a) is type(b)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b, equal_nan=True)
        else:
            assert a == b
