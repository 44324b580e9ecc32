from typing import get_args

import pytest
import torch

from bidistill.models import make_aggregator, masked_softmax
from bidistill.models.aggregators import SUM_SCALE, AggregatorName

from .helpers import IN_DIM, make_batch, pad_more

AGGREGATORS = get_args(AggregatorName)  # every aggregator a config may name


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("hidden", [30, 64])  # 30: not a multiple of the TransMIL heads
def test_padding_never_changes_a_bag(name, hidden):
    torch.manual_seed(0)
    agg = make_aggregator(name, IN_DIM, hidden, dropout=0.25).eval()
    batch = make_batch()
    with torch.no_grad():
        plain = agg(batch.bags, batch.tile_valid)
        padded_batch = pad_more(batch, 7)
        padded = agg(padded_batch.bags, padded_batch.tile_valid)
    assert plain.embedding.shape == (5, agg.out_dim)
    widths = {
        "abmil-mean": 2 * hidden,
        "abmil-count": hidden + 1,
        "abmil-count-mean": 2 * hidden + 1,
        "additive": 1,
        "mean-count": hidden + 1,
    }
    assert agg.out_dim == widths.get(name, hidden)
    torch.testing.assert_close(padded.embedding, plain.embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.attention[:, :11], plain.attention, atol=1e-6, rtol=1e-5)
    assert torch.all(padded.attention[:, 11:] == 0)
    assert torch.all(plain.attention[~batch.tile_valid] == 0)
    # Shares sum to 1; an additive aggregator's contributions sum to its embedding.
    total = plain.embedding[:, 0] if name == "additive" else torch.ones(5)
    torch.testing.assert_close(plain.attention.sum(dim=1), total)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_bag_embedding_depends_on_each_instance_and_order_does_not_matter(name):
    torch.manual_seed(0)
    agg = make_aggregator(name, IN_DIM, 32, dropout=0.0).eval()
    batch = make_batch(b=1, n=9)
    perm = torch.randperm(9)
    with torch.no_grad():
        a = agg(batch.bags, batch.tile_valid).embedding
        b = agg(batch.bags[:, perm], batch.tile_valid[:, perm]).embedding
        changed = batch.bags.clone()
        changed[0, 4] += 1.0
        c = agg(changed, batch.tile_valid).embedding
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_fully_masked_bag_gives_finite_output(name):
    agg = make_aggregator(name, IN_DIM, 32, dropout=0.0).eval()
    bags = torch.randn(2, 4, IN_DIM)
    valid = torch.tensor([[True, True, False, False], [False] * 4])
    with torch.no_grad():
        out = agg(bags, valid)
    assert torch.isfinite(out.embedding).all()
    assert torch.all(out.attention[1] == 0)


def test_masked_softmax_zero_row_instead_of_nan():
    weights = masked_softmax(torch.randn(2, 3), torch.tensor([[True, False, True], [False] * 3]))
    assert torch.isfinite(weights).all()
    assert weights[0, 1] == 0 and weights[1].sum() == 0
    assert torch.isclose(weights[0].sum(), torch.tensor(1.0))


def test_unknown_aggregator_is_refused():
    choices = (
        "abmil-mean, abmil, abmil-sum, abmil-count, abmil-count-mean, additive, mean, "
        "mean-count or transmil"
    )
    with pytest.raises(ValueError, match=choices):
        make_aggregator("maxpool", IN_DIM, 8, 0.0)


def test_abmil_mean_appends_the_plain_mean_to_the_attention_pooling():
    torch.manual_seed(0)
    both = make_aggregator("abmil-mean", IN_DIM, 16, dropout=0.0).eval()
    attention_only = make_aggregator("abmil", IN_DIM, 16, dropout=0.0).eval()
    attention_only.load_state_dict(both.state_dict())  # the same layers, the same names
    batch = make_batch()
    with torch.no_grad():
        out, ref = both(batch.bags, batch.tile_valid), attention_only(batch.bags, batch.tile_valid)
        h = both.project(batch.bags)
    torch.testing.assert_close(out.embedding[:, :16], ref.embedding)
    torch.testing.assert_close(out.attention, ref.attention)
    valid = batch.tile_valid[..., None].float()
    mean = (h * valid).sum(dim=1) / valid.sum(dim=1)
    torch.testing.assert_close(out.embedding[:, 16:], mean)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_instance_layers_embed_each_instance_before_the_pooling(name):
    """Two instance layers: the pooling reads ReLU(W2 ReLU(W1 x + b1) + b2) (D → H, then
    H → H); one layer, the default, stays the single Linear → ReLU → Dropout of before."""
    torch.manual_seed(0)
    deep = make_aggregator(name, IN_DIM, 16, 0.0, instance_layers=2).eval()
    first, second = deep.project[0], deep.project[3]
    assert (first.in_features, first.out_features) == (IN_DIM, 16)
    assert (second.in_features, second.out_features) == (16, 16)
    batch = make_batch()
    with torch.no_grad():
        h = deep.project(batch.bags)
        expected = torch.relu(second(torch.relu(first(batch.bags))))
    torch.testing.assert_close(h, expected)
    assert len(make_aggregator(name, IN_DIM, 16, 0.0).project) == 3


def test_abmil_sum_sees_how_many_key_instances_a_bag_holds():
    """Softmax attention pools a bag of 1 or 40 copies of one instance (among the same
    background) to nearly the same embedding; the un-normalised gated sum grows with the count,
    by the copies' gate times their projection over ``SUM_SCALE``."""
    torch.manual_seed(0)
    summing = make_aggregator("abmil-sum", IN_DIM, 16, dropout=0.0).eval()
    softmax = make_aggregator("abmil", IN_DIM, 16, dropout=0.0).eval()
    softmax.load_state_dict(summing.state_dict())  # the same layers: only the pooling differs
    background, key = torch.randn(60, IN_DIM), torch.randn(1, IN_DIM) * 3

    def pooled(module, copies):
        bag = torch.cat([background, key.expand(copies, -1)])[None]
        with torch.no_grad():
            return module(bag, torch.ones(bag.shape[:2], dtype=torch.bool))

    with torch.no_grad():
        h = summing.project(key)
        gate = torch.tanh(summing.attention_v(h)) * torch.sigmoid(summing.attention_u(h))
        key_gate = torch.sigmoid(summing.attention_w(gate)).squeeze()
    one, forty = pooled(summing, 1), pooled(summing, 40)
    torch.testing.assert_close(
        forty.embedding - one.embedding, 39 * key_gate * h / SUM_SCALE, atol=1e-5, rtol=1e-4
    )
    # Softmax, the same layers: a weighted average, inside the instances' range whatever the
    # count; the sum of 40 copies leaves it.
    with torch.no_grad():
        projected = summing.project(torch.cat([background, key]))
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    averaged = pooled(softmax, 40).embedding[0]
    assert torch.all((averaged >= low - 1e-5) & (averaged <= high + 1e-5))
    assert torch.any(forty.embedding[0] > high + 1e-3)
    # The weights are the gates' shares: they sum to 1, and every copy of the key has one gate.
    torch.testing.assert_close(forty.attention.sum(), torch.tensor(1.0))
    assert torch.allclose(forty.attention[0, 60:], forty.attention[0, 60])


def test_abmil_count_appends_the_log_of_how_many_instances_its_attention_finds_telling():
    torch.manual_seed(0)
    counting = make_aggregator("abmil-count", IN_DIM, 16, dropout=0.0).eval()
    softmax = make_aggregator("abmil", IN_DIM, 16, dropout=0.0).eval()
    softmax.load_state_dict(counting.state_dict())
    batch = make_batch()
    with torch.no_grad():
        out, ref = counting(batch.bags, batch.tile_valid), softmax(batch.bags, batch.tile_valid)
        h = counting.project(batch.bags)
        gate = torch.tanh(counting.attention_v(h)) * torch.sigmoid(counting.attention_u(h))
        gates = torch.sigmoid(counting.attention_w(gate).squeeze(-1)) * batch.tile_valid
    torch.testing.assert_close(out.embedding[:, :16], ref.embedding)  # the softmax pooling
    torch.testing.assert_close(out.attention, ref.attention)  # and its heatmap
    torch.testing.assert_close(out.embedding[:, 16], torch.log1p(gates.sum(dim=1)))


def test_abmil_count_mean_is_the_attention_pooling_the_mean_and_the_count():
    torch.manual_seed(0)
    both = make_aggregator("abmil-count-mean", IN_DIM, 16, dropout=0.0).eval()
    counting = make_aggregator("abmil-count", IN_DIM, 16, dropout=0.0).eval()
    with_mean = make_aggregator("abmil-mean", IN_DIM, 16, dropout=0.0).eval()
    counting.load_state_dict(both.state_dict())  # the same weights, no more
    with_mean.load_state_dict(both.state_dict())
    batch = make_batch()
    with torch.no_grad():
        out = both(batch.bags, batch.tile_valid)
        count, mean = (
            counting(batch.bags, batch.tile_valid),
            with_mean(batch.bags, batch.tile_valid),
        )
    torch.testing.assert_close(out.embedding[:, :32], mean.embedding)  # pooling, then the mean
    torch.testing.assert_close(out.embedding[:, 32], count.embedding[:, 16])  # then the count
    torch.testing.assert_close(out.attention, count.attention)  # the heatmap: the attention


def test_mean_count_is_the_mean_and_the_log_of_the_bag_size():
    """Two bags with the same shares of instance kinds (one key instance in three) but ten times
    as many instances pool to the same mean and differ only in log(1 + n)."""
    torch.manual_seed(0)
    counting = make_aggregator("mean-count", IN_DIM, 16, dropout=0.0).eval()
    mean = make_aggregator("mean", IN_DIM, 16, dropout=0.0).eval()
    mean.load_state_dict(counting.state_dict())  # the same weights, no more
    kinds = torch.randn(3, IN_DIM)
    small = kinds.repeat(2, 1)[None]  # 6 instances
    large = kinds.repeat(20, 1)[None]  # 60
    with torch.no_grad():
        a = counting(small, torch.ones(1, 6, dtype=torch.bool))
        b = counting(large, torch.ones(1, 60, dtype=torch.bool))
        ref = mean(small, torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(a.embedding[:, :16], ref.embedding)
    torch.testing.assert_close(a.embedding[:, :16], b.embedding[:, :16])
    torch.testing.assert_close(a.embedding[:, 16], torch.log1p(torch.tensor([6.0])))
    torch.testing.assert_close(b.embedding[:, 16], torch.log1p(torch.tensor([60.0])))
    torch.testing.assert_close(a.attention, torch.full((1, 6), 1 / 6))  # a flat map


def test_additive_adds_each_instance_s_gated_evidence_and_its_heatmap_is_that_contribution():
    """z = Σ_k sigmoid(score_k) (v^T h_k + b) / SUM_SCALE, one number; the weights are the
    signed terms, so that 40 copies of a key instance add 39 times its term to z, and a tile that
    speaks against the positive class has a negative weight."""
    torch.manual_seed(0)
    additive = make_aggregator("additive", IN_DIM, 16, dropout=0.0).eval()
    background, key = torch.randn(60, IN_DIM), torch.randn(1, IN_DIM) * 3

    def pooled(copies):
        bag = torch.cat([background, key.expand(copies, -1)])[None]
        with torch.no_grad():
            return additive(bag, torch.ones(bag.shape[:2], dtype=torch.bool))

    with torch.no_grad():
        h = additive.project(torch.cat([background, key]))
        gate = torch.tanh(additive.attention_v(h)) * torch.sigmoid(additive.attention_u(h))
        terms = torch.sigmoid(additive.attention_w(gate)) * additive.evidence(h) / SUM_SCALE
    one, forty = pooled(1), pooled(40)
    torch.testing.assert_close(one.attention[0], terms.squeeze(-1))
    torch.testing.assert_close(one.embedding[0, 0], terms.sum())
    torch.testing.assert_close(
        forty.embedding - one.embedding, 39 * terms[-1:], rtol=1e-4, atol=1e-5
    )
    assert (one.attention < 0).any() and (one.attention > 0).any()  # signed, not shares
