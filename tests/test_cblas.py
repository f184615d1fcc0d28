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


def _python_progress_during(products) -> int:
    """Iterations a pure-Python loop on this thread makes while `products` run in another thread."""
    done = threading.Event()

    def work() -> None:
        products()
        done.set()

    t = threading.Thread(target=work)
    count = 0
    t.start()
    while not done.is_set():
        count += 1
    t.join()
    return count


def test_the_gil_is_released_during_the_products(both, monkeypatch):
    from onnxprune.calibration import single_threaded_blas

    rows = np.random.default_rng(2).standard_normal((1024, 1500)).astype(np.float32)
    counts = {}
    with single_threaded_blas():
        for name, lib in (("ctypes", both), ("scipy", None)):
            monkeypatch.setattr(cblas, "library", lambda lib=lib: lib)
            acc = np.zeros((1500, 1500), np.float32)
            start = time.perf_counter()
            counts[name] = _python_progress_during(lambda acc=acc: [gram.add_gram(acc, rows) for _ in range(4)])
            counts[name + " s"] = time.perf_counter() - start
    # per second of products, the Python loop ran ~4x as often beside the ctypes call as beside f2py's (measured
    # 17.7 M against 4.2 M iterations per second on 2 cores)
    per_second = {k: counts[k] / counts[k + " s"] for k in ("ctypes", "scipy")}
    assert per_second["ctypes"] > 2 * per_second["scipy"], counts
