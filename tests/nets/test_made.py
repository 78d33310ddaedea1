import pytest
import torch

from resflow.nets.made import MADE, MaskedLinear

D, N_PARAMS = 5, 3


def _jacobians(made: MADE, x: torch.Tensor, ctx: torch.Tensor | None):  # type: ignore[no-untyped-def]
    """``d out / d x`` as ``[n_params, D, D]`` and ``d out / d ctx`` as ``[n_params, D, k]``."""
    if ctx is None:
        jx = torch.autograd.functional.jacobian(lambda a: made(a[None])[0], x)
        return jx.view(N_PARAMS, D, D), None
    jx, jc = torch.autograd.functional.jacobian(lambda a, c: made(a[None], c[None])[0], (x, ctx))
    return jx.view(N_PARAMS, D, D), jc.view(N_PARAMS, D, -1)


@pytest.mark.parametrize("order", ["natural", "reversed", "random"])
@pytest.mark.parametrize("context", [0, 2])
@pytest.mark.parametrize("residual", [False, True])
def test_autoregressive_property(order, context, residual):
    made = MADE(
        D,
        (20, 20, 20),
        N_PARAMS,
        order=order,
        seed=4,
        context_features=context,
        activation="tanh",
        residual=residual,
        zero_init=False,
    ).double()
    x = torch.randn(D, dtype=torch.float64)
    ctx = torch.randn(context, dtype=torch.float64) if context else None
    jx, jc = _jacobians(made, x, ctx)
    degree = made.degrees  # position in the order, 1..D
    allowed = degree[None, :] < degree[:, None]  # [out dim d, in dim e]: m(e) < m(d)
    for i in range(N_PARAMS):
        assert jx[i][~allowed].abs().max() == 0, f"parameter {i}: depends on a later input"
        assert (jx[i][allowed].abs() > 0).all(), f"parameter {i}: misses an earlier input"
    if jc is not None:  # every output, the first in the order included, sees the context
        assert (jc.abs() > 0).all()
    first = int(made.order[0])
    assert jx[:, first].abs().max() == 0  # the first dimension depends on no input


def test_output_layout_and_zero_init():
    made = MADE(D, (8,), N_PARAMS, zero_init=True)
    out = made(torch.randn(4, D))
    assert out.shape == (4, N_PARAMS * D) and torch.equal(out, torch.zeros(4, N_PARAMS * D))
    made = MADE(D, (8,), N_PARAMS, order="reversed", zero_init=False)
    # output i * D + d belongs to dimension d: its mask row is dimension d's
    rows = made.output_layer.mask.view(N_PARAMS, D, -1)
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])
    assert rows[0][D - 1].sum() == 0  # reversed: dimension D-1 comes first


def test_masks_travel_with_state_dict_and_dtype():
    made = MADE(D, (8, 8), order="random", seed=1)
    keys = set(made.state_dict())
    assert {"order", "degrees", "input_layer.mask", "output_layer.mask"} <= keys
    assert made.double().input_layer.mask.dtype == torch.float64
    assert isinstance(made.input_layer, MaskedLinear)


def test_single_dimension_and_errors():
    made = MADE(1, (4,), 2, zero_init=False, context_features=2)
    out1 = made(torch.randn(3, 1), torch.zeros(3, 2))
    out2 = made(torch.randn(3, 1), torch.zeros(3, 2))
    torch.testing.assert_close(out1, out2)  # no input dependence, only the context
    with pytest.raises(ValueError, match=r"MADE expects \[B, 1\]"):
        made(torch.randn(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="expects a context with 2 features, got none"):
        made(torch.randn(3, 1))
    with pytest.raises(ValueError, match="unknown order"):
        MADE(3, order="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, order=[0, 1, 1])
    with pytest.raises(ValueError, match="equal hidden widths"):
        MADE(3, (8, 16), residual=True)
