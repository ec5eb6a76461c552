import contextlib

import pytest
import torch

from monai_effq.solver.linalg import CholeskyRows, cholesky, factor_dtype, spd_inverse


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gram(n: int, seed: int, groups: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(groups, 4 * n, n, generator=g))
    return 2 * torch.bmm(x.transpose(1, 2), x) + torch.eye(n)


def _on_threads(fn, *args) -> list[torch.Tensor]:
    out = []
    for n in (1, 2):
        with threads(n):
            out.append(fn(*args))
    return out


@pytest.mark.parametrize("rows", [16, 64])  # MKL's float32 triangular solve differs on 1 and 2 threads with 16 rows
def test_factorisations_and_solves_are_the_same_on_one_and_two_threads(rows):
    a = _gram(432, seed=0)  # the size at which MKL's float32 Cholesky was seen to depend on threads
    rhs = torch.randn(1, rows, 432, generator=torch.Generator().manual_seed(1))
    for fn, args in (
        (lambda m: cholesky(m).float(), (a,)),
        (spd_inverse, (a,)),
        (lambda m, r: CholeskyRows(m, block=128).solve_rows(r), (a, rhs)),
    ):
        one, two = _on_threads(fn, *args)
        assert one.dtype == torch.float32 and torch.equal(one, two)


@pytest.mark.parametrize("block", [7, 40, 256])
def test_solve_rows_inverts_the_factorised_matrix(block):
    a = _gram(40, seed=2, groups=2)
    rhs = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(3))
    x = CholeskyRows(a, block=block).solve_rows(rhs)
    torch.testing.assert_close(torch.bmm(x, a), rhs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.bmm(spd_inverse(a), a), torch.eye(40).expand(2, -1, -1), rtol=1e-4, atol=1e-4)


def test_factorisations_run_in_float64_on_the_cpu_only():
    assert factor_dtype(torch.device("cpu")) == torch.float64
    assert factor_dtype(torch.device("cuda", 0)) == torch.float32
    assert cholesky(_gram(5, seed=4)).dtype == torch.float64
