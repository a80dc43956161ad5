"""Joint 2D-3D SSL: Sinkhorn codes, clustering agreement, masked slice modelling, the joint loss and stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lvmmed_monai.networks import LVMMedHybridBackbone
from lvmmed_monai.ssl.joint3d import (
    ClusteringAgreementLoss,
    Joint3DLoss,
    MaskedSliceModeling,
    set_training_stage,
    sinkhorn,
)
from lvmmed_monai.ssl.loss import LVMMedLoss

SMALL_INTER = {"dims": (32, 32, 64, 64), "num_heads": (2, 2, 4, 4)}


def _swav_sinkhorn(out: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn on one process (exp domain), the oracle."""
    q = torch.exp(out / eps).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_codes_rows_sum_to_one_and_clusters_are_equipartitioned():
    scores = F.normalize(torch.randn(24, 16, dtype=torch.float64), dim=1) @ F.normalize(
        torch.randn(6, 16, dtype=torch.float64), dim=1).t()
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q, _swav_sinkhorn(scores, 0.05, 3))
    torch.testing.assert_close(q.sum(1), torch.ones(24, dtype=torch.float64))  # a distribution per sample
    q = sinkhorn(scores, epsilon=0.05, iterations=500)
    torch.testing.assert_close(q.sum(1), torch.ones(24, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((6,), 24 / 6, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert (q >= 0).all()
    big = sinkhorn(torch.randn(5, 7) * 50)  # exp(1000) would overflow in the exp domain
    assert torch.isfinite(big).all()


def test_clustering_agreement_is_the_swapped_prediction_of_eq3():
    loss_fn = ClusteringAgreementLoss(8, num_prototypes=5, proj_dim=4, hidden_dim=None, temperature=0.1)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    loss = loss_fn(a, b)
    s, t = loss_fn.scores(a), loss_fn.scores(b)
    q_s, q_t = _swav_sinkhorn(s.detach(), 0.05, 3), _swav_sinkhorn(t.detach(), 0.05, 3)
    expected = -(q_s * F.log_softmax(t / 0.1, 1)).sum(1).mean() - (q_t * F.log_softmax(s / 0.1, 1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert loss_fn.prototypes.weight.grad.abs().sum() > 0 and loss_fn.projector.weight.grad.abs().sum() > 0
    hard = ClusteringAgreementLoss(8, num_prototypes=5, proj_dim=4, hard_codes=True)
    codes = hard.codes(hard.scores(a))
    assert set(codes.sum(1).tolist()) == {1.0} and set(codes.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="paired"):
        loss_fn(a, b[:3])


def test_feature_queue_is_swavs_sinkhorn_over_queue_and_batch_and_unbalances_near_duplicates():
    """queue_size: codes = SwAV's Sinkhorn on [queue scores; batch scores], the batch's rows; the queue is used
    once full, filled newest first in training mode only, and kept in the state dict."""
    torch.manual_seed(0)
    loss_fn = ClusteringAgreementLoss(8, num_prototypes=6, proj_dim=4, hidden_dim=None, queue_size=12)
    batches = [(torch.randn(4, 8), torch.randn(4, 8)) for _ in range(4)]
    seen = []
    for i, (a, b) in enumerate(batches):
        z_a = loss_fn.embed(a).detach()
        if i == 3:  # queue full (12 = 3 batches): the codes come from Sinkhorn over the queue and the batch
            queue_a = torch.cat(seen[::-1])  # newest first
            assert torch.equal(loss_fn.queue[0], queue_a)
            scores = torch.cat([queue_a, z_a]) @ F.normalize(loss_fn.prototypes.weight, dim=1).t()
            expected = _swav_sinkhorn(scores.detach(), 0.05, 3)[-4:]
            torch.testing.assert_close(loss_fn.codes(loss_fn._scores(z_a), view=0), expected)
            assert not torch.allclose(expected, _swav_sinkhorn((z_a @ F.normalize(
                loss_fn.prototypes.weight, dim=1).t()).detach(), 0.05, 3))
        else:  # not full yet: the batch alone, as without a queue
            torch.testing.assert_close(loss_fn.codes(loss_fn._scores(z_a), view=0),
                                       _swav_sinkhorn(loss_fn._scores(z_a).detach(), 0.05, 3))
        loss_fn(a, b)
        seen.append(z_a)
    assert int(loss_fn.queue_count) == 16 and {"queue", "queue_count"} <= set(loss_fn.state_dict())
    before = loss_fn.queue.clone()
    loss_fn.eval()
    loss_fn(*batches[0])
    assert torch.equal(loss_fn.queue, before)  # evaluation does not fill the queue
    # a batch of near-duplicates (slices of one volume): alone, the equal partition spreads its codes over every
    # prototype; with a queue of diverse samples they may share one prototype, as they should
    dup = ClusteringAgreementLoss(8, num_prototypes=6, proj_dim=4, hidden_dim=None, queue_size=64)
    dup.train()
    for _ in range(4):
        dup(torch.randn(16, 8) * 3, torch.randn(16, 8) * 3)
    near = torch.randn(1, 8) + 0.01 * torch.randn(8, 8)
    scores = dup.scores(near)
    alone, queued = dup.codes(scores).mean(0), dup.codes(scores, view=0).mean(0)
    assert alone.max() < 0.25 < queued.max()  # near uniform (1/6 each) alone, concentrated with the queue
    with pytest.raises(ValueError, match="queue_size"):
        ClusteringAgreementLoss(8, queue_size=-1)


def test_mask_picks_ten_percent_of_real_slices():
    mm = MaskedSliceModeling(8, 4, mask_ratio=0.1)
    kpm = torch.arange(40)[None] >= torch.tensor([40, 25, 3, 1])[:, None]
    mask = mm.sample_mask(kpm, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [4, 2, 1, 1]  # round(0.1 L), at least one
    assert not (mask & kpm).any()


def test_masked_prediction_loss_counts_only_masked_slices():
    mm = MaskedSliceModeling(6, 4)
    h = torch.randn(2, 7, 4, requires_grad=True)
    y = torch.randn(2, 7, 6)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = mask[1, 0] = True
    loss = mm.loss(h, y, mask)
    expected = torch.stack([(mm.decoder(h[b, i]) - y[b, i]).norm() for b, i in [(0, 2), (1, 0), (1, 5)]]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (h.grad[~mask] == 0).all() and (h.grad[mask].abs().sum(-1) > 0).all()
    h2, y2 = h.detach().clone(), y.clone()
    h2[~mask] = 100.0
    y2[~mask] = -5.0
    torch.testing.assert_close(mm.loss(h2, y2, mask), loss.detach())
    masked = mm.mask_inputs(y, mask)
    assert torch.equal(masked[~mask], y[~mask]) and (masked[mask] == mm.mask_token).all()


@pytest.fixture(scope="module")
def backbone() -> LVMMedHybridBackbone:
    torch.manual_seed(0)
    return LVMMedHybridBackbone(inter_kwargs=SMALL_INTER, slice_chunk=None)


def test_joint_loss_all_terms_with_graph_matching_beside(backbone):
    gm = LVMMedLoss(in_dim=2048, graph_size=4, k=2, local_cost=False)
    crit = Joint3DLoss.for_network(backbone, num_prototypes=8, hidden_dim=None, graph_matching=gm,
                                   weights={"intra": 1.0, "inter": 0.5, "mask": 2.0, "graph_matching": 0.1})
    x = torch.rand(2, 1, 5, 32, 32)
    view_s, view_t = x + 0.05 * torch.randn_like(x), x.flip(-1)
    out = crit(backbone, view_s, view_t, lengths=[5, 3], generator=torch.Generator().manual_seed(0))
    assert set(out.terms) == {"intra", "inter", "mask", "graph_matching"}  # 8 real slices = 2 graphs of 4
    expected = out.terms["intra"] + 0.5 * out.terms["inter"] + 2 * out.terms["mask"] + 0.1 * out.terms["graph_matching"]
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert backbone.encoder.conv1.weight.grad.abs().sum() > 0 and crit.masked.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss terms"):
        crit.weights = {"intra": 1.0, "contrastive": 1.0}


def test_training_stages_set_what_trains(backbone):
    crit = Joint3DLoss.for_network(backbone, num_prototypes=8, hidden_dim=None)
    x = torch.rand(1, 1, 4, 32, 32)
    params = set(map(id, set_training_stage(backbone, crit, 2)))
    backbone.train()
    assert not backbone.encoder.training and backbone.inter.training  # frozen f_intra keeps BN statistics
    assert crit.weights == {"mask": 1.0}
    assert params == {id(p) for m in (backbone.inter, crit.masked) for p in m.parameters()}
    backbone.zero_grad()
    crit(backbone, x, x.flip(-1)).loss.backward()
    assert all(p.grad is None for p in backbone.encoder.parameters())
    assert backbone.inter.stems[0][1].weight.grad.abs().sum() > 0
    params = set(map(id, set_training_stage(backbone, crit, 1)))
    backbone.train()
    assert backbone.encoder.training and params == {
        id(p) for m in (backbone.encoder, crit.intra) for p in m.parameters()}
    params = set_training_stage(backbone, crit, 3, weights={"inter": 1.0, "mask": 0.5})
    assert len(params) == sum(1 for m in (backbone, crit.inter, crit.masked) for _ in m.parameters())
    with pytest.raises(ValueError, match="stage"):
        set_training_stage(backbone, crit, 4)
