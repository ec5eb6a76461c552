import numpy as np
import pytest

from monai_effq.solver import kernels
from monai_effq.solver.column_loops import compiled, descend_columns, round_columns


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit: -0.0 and 0.0 differ, as they do in a checkpoint's float tensors."""
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _descend_inputs(groups: int, b: int, m: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    codes = rng.integers(0, 4, size=(groups, b, m)).astype(f32)
    neg_ic = -rng.uniform(0.5, 2.0, size=(groups, b, m)).astype(f32)
    # gradients at exact half-steps as well: round(±k.5) must go to even on both paths
    grad = (rng.integers(-8, 9, size=(groups, b, m)) + 0.5).astype(f32) / neg_ic
    grad[..., ::3] = rng.normal(size=grad[..., ::3].shape).astype(f32) * 3
    scale = rng.uniform(0.01, 0.1, size=(groups, m)).astype(f32)
    x = rng.normal(size=(groups, 4 * b, b)).astype(f32)
    hessian = np.ascontiguousarray(np.einsum("gki,gkj->gij", x, x).astype(f32))
    return grad, codes, neg_ic, scale, hessian


def _round_inputs(groups: int, b: int, m: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    scale = rng.uniform(0.05, 0.2, size=(groups, m)).astype(f32)
    zero = np.full((groups, m), 1.5, f32)
    w0 = rng.normal(size=(groups, b, m)).astype(f32) * 0.3
    w0[:, ::4] = ((rng.integers(-3, 3, size=w0[:, ::4].shape) + 0.5 - 1.5) * scale[:, None, :]).astype(f32)  # ties
    feedback = np.triu(rng.normal(size=(groups, b, b)).astype(f32) * 0.2, 1)
    return w0.copy(), w0, scale, zero, np.ascontiguousarray(feedback)


@pytest.mark.parametrize("groups, b, m", [(1, 64, 32), (2, 17, 5), (1, 1, 1), (3, 8, 1)])
def test_compiled_and_numpy_descent_give_the_same_bits(groups, b, m):
    pytest.importorskip("numba")
    runs = []
    for use_compiled in (False, True):
        grad, codes, neg_ic, scale, hessian = _descend_inputs(groups, b, m, seed=b * m)
        descend_columns(grad, codes, neg_ic, scale, hessian, 0, 3, use_compiled=use_compiled)
        runs.append((grad, codes))
    (g0, c0), (g1, c1) = runs
    assert _same_bits(c0, c1) and _same_bits(g0, g1)
    start = _descend_inputs(groups, b, m, seed=b * m)[1]
    assert not np.array_equal(c0, start)  # the pass moved codes, so the comparison means something
    assert c0.min() >= 0 and c0.max() <= 3


@pytest.mark.parametrize("groups, b, m", [(1, 128, 32), (2, 9, 7), (1, 1, 1)])
def test_compiled_and_numpy_gptq_rounding_give_the_same_bits(groups, b, m):
    pytest.importorskip("numba")
    runs = []
    for use_compiled in (False, True):
        w, w0, scale, zero, feedback = _round_inputs(groups, b, m, seed=b + m)
        codes, errors = round_columns(w, w0, scale, zero, feedback, 0, 3, use_compiled=use_compiled)
        runs.append((codes, errors, w))
    for a, b_ in zip(*runs):
        assert _same_bits(a, b_)
    codes = runs[0][0]
    assert set(np.unique(codes)) <= {0.0, 1.0, 2.0, 3.0} and (len(np.unique(codes)) > 1 or codes.size == 1)


def test_the_loops_fall_back_to_numpy_without_numba_and_say_so(monkeypatch):
    monkeypatch.setattr(kernels, "numba_kernels", lambda: None)
    assert not compiled()
    grad, codes, neg_ic, scale, hessian = _descend_inputs(1, 8, 4, seed=0)
    descend_columns(grad, codes, neg_ic, scale, hessian, 0, 3)  # runs in NumPy
    with pytest.raises(RuntimeError, match="Numba.*fast"):
        descend_columns(grad, codes, neg_ic, scale, hessian, 0, 3, use_compiled=True)


def test_numba_can_be_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MONAI_EFFQ_NUMBA", "0")
    kernels.numba_kernels.cache_clear()
    try:
        assert not compiled()
    finally:
        monkeypatch.delenv("MONAI_EFFQ_NUMBA")
        kernels.numba_kernels.cache_clear()


def test_other_dtypes_run_in_numpy_and_are_refused_by_the_compiled_loop():
    pytest.importorskip("numba")
    grad, codes, neg_ic, scale, hessian = (a.astype(np.float64) for a in _descend_inputs(1, 8, 4, seed=1))
    descend_columns(grad, codes, neg_ic, scale, hessian, 0, 3)
    assert codes.dtype == np.float64
    with pytest.raises(ValueError, match="float32"):
        descend_columns(grad, codes, neg_ic, scale, hessian, 0, 3, use_compiled=True)


def test_a_scale_that_only_broadcasts_runs_in_numpy_and_is_refused_by_the_compiled_loop():
    pytest.importorskip("numba")
    w, w0, scale, zero, feedback = _round_inputs(2, 6, 5, seed=3)
    one_scale, one_zero = scale[:, :1].copy(), zero[:, :1].copy()  # (G, 1): NumPy broadcasts it over the rows
    expected, _ = round_columns(w.copy(), w0, np.repeat(one_scale, 5, 1), np.repeat(one_zero, 5, 1), feedback, 0, 3, use_compiled=False)
    codes, _ = round_columns(w.copy(), w0, one_scale, one_zero, feedback, 0, 3)
    assert _same_bits(codes, expected)
    with pytest.raises(ValueError, match=r"\(G, m\) rows"):
        round_columns(w.copy(), w0, one_scale, one_zero, feedback, 0, 3, use_compiled=True)


def test_both_loops_round_exact_halves_to_even():
    pytest.importorskip("numba")
    halves = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], np.float32)
    for use_compiled in (False, True):
        # a step of exactly k + 1/2 from codes of 1: round half to even, then clipped to [0, 3]
        codes = np.ones((1, 1, 6), np.float32)
        grad = -halves[None, None, :]
        descend_columns(grad, codes, -np.ones_like(codes), np.ones((1, 6), np.float32), np.ones((1, 1, 1), np.float32), 0, 3,
                        use_compiled=use_compiled)
        assert codes[0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 3.0, 3.0]
        # w / s + z at exact halves (power-of-two scale, no feedback)
        w = (halves[None, None, :] - 1.5) * np.float32(0.25)
        out, _ = round_columns(w.copy(), w, np.full((1, 6), 0.25, np.float32), np.full((1, 6), 1.5, np.float32),
                               np.zeros((1, 1, 1), np.float32), 0, 3, use_compiled=use_compiled)
        assert out[0, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 2.0, 2.0]
