"""Values followed on the host instead of read from the device every step: ActNorm's
initialisation flag and the Lipschitz layers' certificate schedule. They must follow
the buffers exactly, including after a state dict or a transient state is loaded."""

from __future__ import annotations

import torch

from resflow.layers.actnorm import ActNorm, ElementActNorm
from resflow.layers.residual.lipschitz_layers import LipschitzLinear


def test_actnorm_reads_its_flag_once_and_again_after_a_load():
    for layer in (ActNorm(3), ElementActNorm((3,))):
        fresh = {k: v.clone() for k, v in layer.state_dict().items()}
        x = 5 + 2 * torch.randn(64, 3)
        y, _ = layer(x)
        torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        y2, _ = layer(x + 100)  # initialised: the second batch does not re-initialise
        assert y2.mean() > 10
        layer.load_state_dict(fresh)  # an uninitialised state: the next batch initialises
        y3, _ = layer(x - 7)
        torch.testing.assert_close(y3.mean(0), torch.zeros(3), atol=1e-5, rtol=0)


def _certifies_at(layer: LipschitzLinear, n: int) -> list[int]:
    return [i for i in range(1, n + 1) if layer._count_step_certifies()]


def test_the_certificate_schedule_follows_the_loaded_step_count():
    layer = LipschitzLinear(4, 4)
    layer.train()
    assert _certifies_at(layer, 25) == [10, 20]
    assert int(layer.steps) == 25
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["steps"].fill_(7)
    layer.load_state_dict(state)
    assert _certifies_at(layer, 5) == [3]  # steps 8..12: the tenth certifies
    saved = layer.transient_state()
    _certifies_at(layer, 4)  # steps 13..16
    layer.load_transient_state(saved)  # back to 12: steps 13..22, the twentieth certifies
    assert _certifies_at(layer, 10) == [8]
    layer.eval()
    assert _certifies_at(layer, 2) == [1, 2]  # eval mode always certifies
