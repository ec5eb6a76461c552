import pytest
import torch

from monai_effq.solver.linalg import RowSolver, cholesky, spd_inverse

from ..threads import torch_threads


def _gram(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(1, 4 * n, n, generator=g))
    return 2 * torch.bmm(x.transpose(1, 2), x) + torch.eye(n)


def _on_threads(fn, *args) -> list[torch.Tensor]:
    out = []
    for n in (1, 2):
        with torch_threads(n):
            out.append(fn(*args))
    return out


def test_factorisations_are_the_same_on_one_and_two_threads():
    a = _gram(432, seed=0)  # the size at which MKL's float32 Cholesky was seen to depend on threads
    rhs = torch.randn(1, 16, 432, generator=torch.Generator().manual_seed(1))
    solve = lambda m, r: RowSolver(m, block=64).solve_rows(r)  # noqa: E731 (7 blocks, the last one short)
    for fn, args in ((lambda m: cholesky(m, block=64), (a,)), (spd_inverse, (a,)), (solve, (a, rhs))):
        one, two = _on_threads(fn, *args)
        assert one.dtype == torch.float32 and torch.equal(one, two)


@pytest.mark.parametrize("n", [96, 100])  # aligned, and padded to 112
def test_the_factor_is_a_float32_lower_triangle_whose_product_is_the_matrix(n):
    a = _gram(n, seed=13)
    lower = cholesky(a, block=32)
    assert lower.dtype == torch.float32 and lower.shape == (1, n, n) and torch.equal(lower, lower.tril())
    exact = torch.linalg.cholesky(a.double())
    torch.testing.assert_close(lower.double(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))


def test_a_factor_of_a_matrix_that_is_not_positive_definite_is_refused_as_lapack_refuses_it():
    with pytest.raises(torch.linalg.LinAlgError, match="20x20 matrix is not positive definite"):
        cholesky(-torch.eye(20)[None])
    with pytest.raises(ValueError, match="multiple of 16"):
        cholesky(torch.eye(20)[None], block=24)


def test_the_inverse_is_the_same_on_one_and_two_threads_where_lapacks_is_not():
    a = _gram(1296, seed=1)  # 48 channels x 27 taps: LAPACK's float64 inverse of this, rounded, differs
    one, two = _on_threads(spd_inverse, a)
    assert torch.equal(one, two)
    with torch_threads(2):
        spd_inverse(a)
        assert torch.get_num_threads() == 2  # restored after its one-thread section


def test_the_row_solver_is_the_same_on_one_and_two_threads():
    a = _gram(864, seed=4)  # 32 channels x 27 taps: LAPACK's float64 factor of this differs in its last bits
    rhs = torch.randn(1, 32, 864, generator=torch.Generator().manual_seed(5))
    one, two = _on_threads(lambda: RowSolver(a).solve_rows(rhs))
    assert torch.equal(one, two)


def test_row_solver_inverts_the_matrix():
    a = _gram(40, seed=2)
    rhs = torch.randn(1, 3, 40, generator=torch.Generator().manual_seed(3))
    exact = torch.linalg.solve(a.double(), rhs.double().mT).mT
    for block in (16, 32, 64):  # 40 padded to 48: three blocks, a short last block, one block
        x = RowSolver(a, block=block).solve_rows(rhs)
        torch.testing.assert_close(x.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.bmm(spd_inverse(a), a), torch.eye(40)[None], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, rows", [(432, 9), (216, 10), (1285, 7)])
def test_the_row_solver_is_the_same_on_one_and_two_threads_for_row_counts_and_sizes_off_sixteen(n, rows):
    # unpadded, MKL's products with 9, 10 or 7 rows (the right-hand sides, or the last block of
    # the factor at n = 1285) gave other bits on 1 and 2 threads
    a = _gram(n, seed=6)
    rhs = torch.randn(1, rows, n, generator=torch.Generator().manual_seed(7))
    one, two = _on_threads(lambda: RowSolver(a).solve_rows(rhs))
    assert torch.equal(one, two) and one.shape == rhs.shape
    exact = torch.linalg.solve(a.double(), rhs.double().mT).mT
    torch.testing.assert_close(one.double(), exact, rtol=1e-4, atol=1e-4)


def test_the_row_solver_returns_the_dtype_it_is_given_and_refuses_unaligned_blocks():
    a = _gram(20, seed=8)
    assert RowSolver(a).solve_rows(torch.ones(1, 2, 20, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="multiple of 16"):
        RowSolver(a, block=13)


def test_a_matrix_that_is_not_positive_definite_is_refused_with_what_to_do():
    a = -torch.eye(20)[None]
    with pytest.raises(ValueError, match="not positive definite.*rho_start"):
        RowSolver(a)


@pytest.mark.parametrize("n", [96, 100])  # aligned, and padded to 112 (the padding keeps a unit diagonal)
def test_a_shifted_solver_gives_the_bits_of_one_built_from_a_shifted_copy_and_leaves_the_matrix_alone(n):
    a = _gram(n, seed=9)
    before = a.clone()
    rhs = torch.randn(1, 16, n, generator=torch.Generator().manual_seed(10))
    for shift in (0.5, 37.0):
        copy = a.clone()
        copy.diagonal(dim1=1, dim2=2).add_(shift)
        expected = RowSolver(copy, block=32)
        shifted = RowSolver(a, block=32, shift=shift)
        assert torch.equal(shifted.lower, expected.lower)
        assert torch.equal(shifted.solve_rows(rhs), expected.solve_rows(rhs))
    assert torch.equal(a, before)


def test_a_solver_built_in_an_earlier_solvers_workspace_is_the_one_built_afresh():
    a = _gram(100, seed=11)
    rhs = torch.randn(1, 16, 100, generator=torch.Generator().manual_seed(12))
    first = RowSolver(a, block=32, shift=1.0)
    fresh = RowSolver(a, block=32, shift=8.0)
    reused = RowSolver(a, block=32, shift=8.0, workspace=first.lower)
    assert reused.lower is first.lower
    assert torch.equal(reused.solve_rows(rhs), fresh.solve_rows(rhs))
    # a workspace of another shape is not used
    assert RowSolver(_gram(40, seed=2), block=32, workspace=first.lower).lower is not first.lower


def test_row_solutions_are_contiguous_where_padding_is_cut_off_and_carry_no_gradient():
    a = _gram(27, seed=3)
    rhs = torch.randn(1, 5, 27, requires_grad=True)  # 27 columns and 5 rows: both padded to 32
    x = RowSolver(a).solve_rows(rhs)
    assert x.is_contiguous() and x.shape == (1, 5, 27)
    assert not x.requires_grad  # products are written into slices: nothing here is differentiable
    assert torch.allclose(torch.bmm(x, a), rhs.detach(), rtol=1e-4, atol=1e-4)
