"""PoolStream: chunked pooling equals the aggregators' one-pass forward, padding included."""

import pytest
import torch

from bidistill.models.aggregators import make_aggregator
from bidistill.models.streaming import PoolStream, streams


@pytest.mark.parametrize(
    "name",
    ["abmil-mean", "abmil", "abmil-sum", "abmil-count", "abmil-count-mean", "additive", "mean"],
)
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("instance_layers", [1, 2])
def test_chunked_pooling_equals_the_whole_bag(name, chunk, instance_layers):
    torch.manual_seed(0)
    module = make_aggregator(name, 12, 16, 0.25, instance_layers).eval()
    bags = torch.randn(3, 40, 12)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, 25:] = False  # a padded bag
    valid[2, :] = False  # an empty one
    whole = module(bags, valid)
    stream = PoolStream(module, 40)
    for start in range(0, 40, chunk):
        stream.update(bags[:, start : start + chunk], valid[:, start : start + chunk])
    part = stream.result()
    assert part.embedding.shape == whole.embedding.shape == (3, module.out_dim)
    torch.testing.assert_close(part.embedding, whole.embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.attention, whole.attention, atol=1e-6, rtol=1e-5)
    assert torch.all(part.embedding[2] == 0) and torch.all(part.attention[2] == 0)


def test_transmil_is_refused():
    module = make_aggregator("transmil", 12, 16, 0.0)
    assert not streams(module)
    with pytest.raises(TypeError, match="TransMIL"):
        PoolStream(module, 40)
