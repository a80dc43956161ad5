"""LVMMedLoss end to end: ResNet-50 maps, gradients, degenerate inputs, ablations, stats, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet50

from lvmmed_monai.data.views import LVMMedViewsd, pool_coords
from lvmmed_monai.ssl.loss import LVMMedLoss

N, D = 32, 24  # two graphs of 16 nodes; small feature width for the fast tests


def _maps(seed: int = 0, noise: float = 0.3, size: int = 3) -> tuple[torch.Tensor, ...]:
    """Paired view maps (the t view = s view + noise) and random coordinates."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(N, D, size, size, generator=g)
    ft = fs + noise * torch.randn(N, D, size, size, generator=g)
    cs, ct = torch.rand(N, 2, 12, 12, generator=g), torch.rand(N, 2, 12, 12, generator=g)
    return fs.requires_grad_(), ft.requires_grad_(), cs, ct


def test_resnet50_step_reaches_encoder_projector_and_gcn():
    torch.manual_seed(0)
    trunk = nn.Sequential(*list(resnet50(weights=None).children())[:-2])  # no avgpool / fc
    views = LVMMedViewsd("image", size=64, out_channels=3).set_random_state(0)
    batch = [views({"image": torch.rand(1, 80, 72)}) for _ in range(N)]
    x_s, x_t = (torch.stack([b[f"image_{v}"] for b in batch]) for v in "st")
    c_s, c_t = (torch.stack([b[f"coords_{v}"] for b in batch]) for v in "st")
    criterion = LVMMedLoss(in_dim=2048, graph_size=16)
    loss, stats = criterion(trunk(x_s), trunk(x_t), c_s, c_t, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and 0 <= loss.item() <= 2 * 16
    reached = {"encoder conv1": trunk[0].weight, "encoder layer4": trunk[7][2].conv3.weight,
               "projector": criterion.projector[0].weight, "gcn layer 0": criterion.gcn.layers[0].weight,
               "gcn layer 1": criterion.gcn.layers[1].weight}
    for name, p in reached.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert 0 <= float(stats["accuracy"]) <= 1 and 0 <= float(stats["identity_rate"]) <= 1


@pytest.mark.parametrize("forms", [{}, {"edge_form": "paper", "gcn_form": "paper"}], ids=["default", "paper"])
@pytest.mark.parametrize("case", ["zeros", "constant", "duplicates"])
def test_degenerate_batches_stay_finite(case, forms):
    fs, ft, cs, ct = _maps()
    if case == "zeros":
        fs, ft = torch.zeros_like(fs, requires_grad=True), torch.zeros_like(ft, requires_grad=True)
    elif case == "constant":  # a constant image gives the same value at every position and for every sample
        fs, ft = torch.ones_like(fs, requires_grad=True), torch.ones_like(ft, requires_grad=True)
    else:  # every sample appears 4 times in a graph
        fs = fs.detach()[::4].repeat_interleave(4, 0).requires_grad_()
        ft = ft.detach()[::4].repeat_interleave(4, 0).requires_grad_()
        cs, ct = cs[::4].repeat_interleave(4, 0), ct[::4].repeat_interleave(4, 0)
    criterion = LVMMedLoss(in_dim=D, **forms)
    aff = criterion.affinities(fs, ft, cs, ct)
    assert torch.isfinite(aff.c_v).all() and torch.isfinite(aff.c_e).all()
    loss, stats = criterion.match(aff)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    for p in [fs, ft, *criterion.parameters()]:
        assert p.grad is None or torch.isfinite(p.grad).all()


ABLATIONS = [
    {}, {"second_order": False}, {"message_passing": False}, {"gumbel": False}, {"local_cost": False},
    {"num_samples": 2}, {"method": "lap"}, {"gamma": 0.4, "alpha": 0.7}, {"reduction": "sum"},
    {"projector_hidden_dim": 64}, {"edge_form": "paper"}, {"gcn_form": "paper"},
    {"edge_form": "paper", "gcn_form": "paper"},
]


def _name(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "full"


@pytest.mark.parametrize("options", ABLATIONS, ids=_name)
def test_every_switch_runs_and_stats_are_consistent(options):
    fs, ft, cs, ct = _maps()
    criterion = LVMMedLoss(in_dim=D, **options)
    assert (criterion.gcn is None) == (options.get("message_passing") is False)
    loss, stats = criterion(fs, ft, cs, ct, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert fs.grad is not None and torch.isfinite(fs.grad).all()
    acc, ham = float(stats["accuracy"]), float(stats["hamming"])
    assert 0 <= acc <= 1 and 0 <= float(stats["identity_rate"]) <= 1
    if options.get("num_samples", 1) == 1:  # a permutation misses 2 entries per wrongly matched node
        assert ham == pytest.approx(2 * 16 * (1 - acc))
    assert loss.item() == pytest.approx(ham * (2 if options.get("reduction") == "sum" else 1))


def test_identity_objective_matches_eq4_by_hand():
    fs, ft, cs, ct = _maps()
    criterion = LVMMedLoss(in_dim=D)
    aff = criterion.affinities(fs, ft, cs, ct)
    _, stats = criterion.match(aff)
    total = 0.0
    for g in range(2):
        total += float(aff.c_v[g].detach().diagonal().sum())
        for e, (i, j) in enumerate(aff.edges_s[g].tolist()):
            for f, (a, b) in enumerate(aff.edges_t[g].tolist()):
                if i == a and j == b:  # identity matches edge (i, j) with edge (i, j)
                    total += float(aff.c_e[g, e, f].detach())
    assert float(stats["identity_objective"]) == pytest.approx(total / 2, rel=1e-4)


def test_identical_views_are_matched_exactly():
    """Same maps and coordinates in both views, constant noise: the identity is the Eq. 4 optimum."""
    fs, _, cs, _ = _maps(noise=0.0)
    criterion = LVMMedLoss(in_dim=D, gumbel=False)
    loss, stats = criterion(fs, fs.detach().clone(), cs, cs)
    assert float(stats["accuracy"]) == 1.0 and float(stats["identity_rate"]) == 1.0 and loss.item() == 0.0
    assert float(stats["objective"]) == pytest.approx(float(stats["identity_objective"]))


def test_solver_options_reach_the_solver():
    fs, ft, cs, ct = _maps()
    out = LVMMedLoss(in_dim=D, solver_options={"tabu_iters": 20})(fs, ft, cs, ct)
    out.loss.backward()
    assert fs.grad is not None and bool(torch.isfinite(fs.grad).all())
    with pytest.raises(TypeError, match="bogus"):
        LVMMedLoss(in_dim=D, solver_options={"bogus": 1})(fs, ft, cs, ct)


def test_imle_gradient_raises_the_gold_affinities():
    """Algorithm 1 with the Hamming loss: descent on c_v raises the diagonal and lowers wrong matches."""
    fs, ft, cs, ct = _maps(noise=2.0)
    criterion = LVMMedLoss(in_dim=D)
    aff = criterion.affinities(fs, ft, cs, ct)
    aff.c_v.retain_grad()
    loss, stats = criterion.match(aff, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert float(stats["accuracy"]) < 1
    grad = aff.c_v.grad
    assert (grad.diagonal(dim1=1, dim2=2) <= 0).all() and grad.diagonal(dim1=1, dim2=2).sum() < 0
    assert (grad - torch.diag_embed(grad.diagonal(dim1=1, dim2=2)) >= 0).all()


def test_coordinates_at_pixel_or_feature_resolution_agree_and_views_may_differ_in_size():
    fs, ft, cs, ct = _maps()
    criterion = LVMMedLoss(in_dim=D)
    a = criterion.affinities(fs, ft, cs, ct)
    b = criterion.affinities(fs, ft, pool_coords(cs, (3, 3)), pool_coords(ct, (3, 3)))
    torch.testing.assert_close(a.c_v, b.c_v)
    small = torch.randn(N, D, 2, 2)  # a local crop's smaller map
    assert criterion.affinities(fs, small, cs, ct).c_v.shape == (2, 16, 16)


def test_autocast_inputs_give_float32_affinities():
    conv = nn.Conv2d(3, D, 3, stride=4)
    x = torch.rand(N, 3, 12, 12)
    criterion = LVMMedLoss(in_dim=D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = conv(x)
        assert feats.dtype == torch.bfloat16
        aff = criterion.affinities(feats, feats, torch.rand(N, 2, 12, 12), torch.rand(N, 2, 12, 12))
        loss, _ = criterion.match(aff)
    assert aff.c_v.dtype == torch.float32 and aff.c_e.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_bad_inputs_fail_clearly():
    fs, ft, cs, ct = _maps()
    criterion = LVMMedLoss(in_dim=D)
    with pytest.raises(ValueError, match="multiple of graph_size"):
        criterion(fs[:24], ft[:24], cs[:24], ct[:24])
    with pytest.raises(ValueError, match="D=24"):
        criterion(fs[:, :8], ft[:, :8], cs, ct)
    with pytest.raises(ValueError, match="needs coords_s"):
        criterion(fs, ft)
    bad = ft.detach().clone()
    bad[3, 5, 1, 2] = float("nan")  # one position of one channel of one sample
    with pytest.raises(ValueError, match="feats_t"):
        criterion(fs, bad, cs, ct)
    with pytest.raises(ValueError, match="coords_s range"):
        criterion(fs, ft, cs * 64, ct)  # pixel coordinates instead of normalised ones
    with pytest.raises(ValueError, match="k < graph_size"):
        LVMMedLoss(in_dim=D, k=16, graph_size=16)
    with pytest.raises(ValueError, match="edge_form"):
        LVMMedLoss(in_dim=D, edge_form="raw")
    with pytest.raises(ValueError, match="gcn_form"):
        LVMMedLoss(in_dim=D, gcn_form="literal")
    LVMMedLoss(in_dim=D, local_cost=False)(fs, ft)  # no coordinates needed without the local cost


def test_multi_crop_loss_is_the_mean_over_the_global_pair_and_each_local_crop_against_a_global_view():
    """LVMMedPretrainModel with local crops: crop j is matched against view s (even j) or t (odd j) by the same
    criterion, on maps of another size; the loss is the mean of the 1 + m matchings (constant noise here)."""
    from lvmmed_monai.engines import LVMMedPretrainModel

    class Enc(nn.Module):
        feature_dim = D

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, D, 4, stride=4)

        def feature_map(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    torch.manual_seed(0)
    model = LVMMedPretrainModel(Enc(), LVMMedLoss(in_dim=D, gumbel=False, gamma=2), world_size=1)
    g = torch.Generator().manual_seed(1)
    img_s, img_t = torch.rand(N, 3, 16, 16, generator=g), torch.rand(N, 3, 16, 16, generator=g)
    locs = [torch.rand(N, 3, 8, 8, generator=g) for _ in range(3)]
    c_s, c_t, *c_l = (torch.rand(N, 2, s, s, generator=g) for s in (16, 16, 8, 8, 8))
    loss, stats = model(img_s, img_t, c_s, c_t, local_images=locs, local_coords=c_l)
    crit, enc = model.criterion, model.encoder
    f_s, f_t = enc.feature_map(img_s), enc.feature_map(img_t)
    expected = [crit(f_s, f_t, c_s, c_t).loss]
    for j, (im, c) in enumerate(zip(locs, c_l, strict=True)):
        f_g, c_g = (f_s, c_s) if j % 2 == 0 else (f_t, c_t)
        expected.append(crit(f_g, enc.feature_map(im), c_g, c).loss)
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    global_only = model(img_s, img_t, c_s, c_t).loss
    assert global_only.item() == pytest.approx(expected[0].item(), rel=1e-6)
    assert float(stats["hamming"]) == pytest.approx(expected[0].item())  # statistics: the global pair
    loss.backward()
    assert torch.isfinite(enc.conv.weight.grad).all() and enc.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="local crops"):
        model(img_s, img_t, c_s, c_t, local_images=locs, local_coords=c_l[:1])


def test_per_call_overrides_equal_a_criterion_configured_so_and_leave_it_unchanged():
    """match(..., second_order=False, noise_scale=0.0, lam=5.0) is what LVMMedLoss(second_order=False,
    noise_scale=0.0, lam=5.0) computes; the criterion's own settings stay as configured."""
    fs, ft, cs, ct = _maps()
    torch.manual_seed(0)
    crit = LVMMedLoss(in_dim=D, noise_scale=0.5)
    plain = LVMMedLoss(in_dim=D, noise_scale=0.0, second_order=False, lam=5.0)
    plain.load_state_dict(crit.state_dict())
    aff = crit.affinities(fs, ft, cs, ct)
    over = crit.match(aff, torch.Generator().manual_seed(2), second_order=False, noise_scale=0.0, lam=5.0)
    ref = plain.match(aff, torch.Generator().manual_seed(2))
    assert over.loss.item() == ref.loss.item()
    assert all(torch.equal(over.stats[k], ref.stats[k]) for k in ref.stats)
    (g1,) = torch.autograd.grad(over.loss, fs, retain_graph=True)
    (g2,) = torch.autograd.grad(ref.loss, fs)
    torch.testing.assert_close(g1, g2)
    assert (crit.second_order, crit.noise_scale, crit.lam) == (True, 0.5, 80.0)


def test_objective_statistics_equal_the_lawler_form():
    """The stats' objective (from the edge lists) equals x^T K x with K from lawler_from_edges."""
    from lvmmed_monai.ssl.matching import lawler_edges, lawler_from_edges, qap_objective

    fs, ft, cs, ct = _maps()
    crit = LVMMedLoss(in_dim=D)
    aff = crit.affinities(fs, ft, cs, ct)
    out = crit.match(aff, torch.Generator().manual_seed(0))
    K = lawler_from_edges(aff.c_v.detach(), aff.c_e.detach(), aff.edges_s, aff.edges_t)
    eye = torch.eye(16).expand(2, 16, 16)
    xm = _forward_matching(crit, aff)
    assert float(out.stats["objective"]) == pytest.approx(float(qap_objective(K, xm).mean()), rel=1e-5)
    assert float(out.stats["identity_objective"]) == pytest.approx(float(qap_objective(K, eye).mean()), rel=1e-5)
    edge = lawler_edges(aff.c_e.detach(), aff.edges_s, aff.edges_t, 16)
    assert torch.equal(edge + torch.diag_embed(aff.c_v.detach().reshape(2, 256)), K)  # bit for bit


def _forward_matching(crit: LVMMedLoss, aff) -> torch.Tensor:
    """The forward matching the statistics were computed on (same generator seed)."""
    from lvmmed_monai.ssl.imle import imle_qap

    return imle_qap(aff.c_v.detach(), aff.c_e.detach(), aff.edges_s, aff.edges_t, lam=crit.lam,
                    step=crit.imle_step, noise_scale=crit.noise_scale, generator=torch.Generator().manual_seed(0))


def test_local_maps_replace_the_last_stage_in_the_local_cost_only():
    """affinities(..., local_s, local_t): c_v = alpha * global cosine of the (last-stage) pooled embeddings
    + (1 - alpha) * local cost of the given maps at their own grid (vertex_affinity called by hand)."""
    from lvmmed_monai.ssl.affinity import vertex_affinity

    fs, ft, cs, ct = _maps()
    g = torch.Generator().manual_seed(3)
    ms, mt = torch.randn(N, 5, 6, 6, generator=g), torch.randn(N, 5, 6, 6, generator=g)  # finer, other width
    torch.manual_seed(0)
    crit = LVMMedLoss(in_dim=D, gamma=4)
    aff = crit.affinities(fs, ft, cs, ct, ms, mt)
    base = crit.affinities(fs, ft, cs, ct)
    torch.testing.assert_close(aff.c_e, base.c_e)  # the graphs and the edge term come from the last stage
    z = torch.cat([crit.projector(fs.mean((2, 3))), crit.projector(ft.mean((2, 3)))])
    z_hat, _ = crit._graphs(z.view(4, 16, -1))
    grid = {k: pool_coords(c, (6, 6)).flatten(2).transpose(1, 2).reshape(2, 16, 36, 2) for k, c in
            (("s", cs), ("t", ct))}
    maps = {k: m.flatten(2).transpose(1, 2).reshape(2, 16, 36, 5) for k, m in (("s", ms), ("t", mt))}
    expected = vertex_affinity(z_hat[:2], z_hat[2:], maps["s"], maps["t"], grid["s"], grid["t"], alpha=0.8, gamma=4)
    torch.testing.assert_close(aff.c_v, expected)
    assert not torch.allclose(aff.c_v, base.c_v)
    with pytest.raises(ValueError, match="together"):
        crit.affinities(fs, ft, cs, ct, ms, None)
    with pytest.raises(ValueError, match="local_t must be"):
        crit.affinities(fs, ft, cs, ct, ms, mt[:, :3])


def test_local_level_takes_the_local_cost_from_that_resnet_stage():
    """LVMMedPretrainModel(local_level="layer3") on the LVM-Med ResNet-50: the loss is the criterion's on the
    last stage with layer3's maps for the local cost, gradients reach the encoder; a ViT-like encoder and an
    unknown level are refused."""
    from lvmmed_monai.encoders import LVMMedResNet50
    from lvmmed_monai.engines import LVMMedPretrainModel

    torch.manual_seed(0)
    enc = LVMMedResNet50()
    model = LVMMedPretrainModel(enc, LVMMedLoss(in_dim=2048, graph_size=8, k=3, gumbel=False, gamma=4),
                                world_size=1, local_level="layer3")
    g = torch.Generator().manual_seed(1)
    img_s, img_t = torch.rand(16, 3, 64, 64, generator=g), torch.rand(16, 3, 64, 64, generator=g)
    c_s, c_t = torch.rand(16, 2, 64, 64, generator=g), torch.rand(16, 2, 64, 64, generator=g)
    enc.eval()  # BatchNorm statistics of the batch: the same in the model's one pass and the reference's
    loss, _ = model(img_s, img_t, c_s, c_t)
    with torch.no_grad():
        levels = enc(torch.cat([img_s, img_t]))
    f_s, f_t = levels[4].split(16)
    l_s, l_t = levels[3].split(16)
    assert l_s.shape[-2:] == (4, 4) and f_s.shape[-2:] == (2, 2)
    expected = model.criterion(f_s, f_t, c_s, c_t, local_s=l_s, local_t=l_t).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert enc.layer3[0].conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="local_level must be one of"):
        LVMMedPretrainModel(enc, model.criterion, world_size=1, local_level="layer5")

    class OneMap(nn.Module):
        feature_dim = 2048

        def feature_map(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="needs a ResNet encoder"):
        LVMMedPretrainModel(OneMap(), model.criterion, world_size=1, local_level="layer2")


def test_local_cost_on_several_stages_is_the_mean_of_their_local_terms():
    """local_level=["layer2", "layer4"]: c_v = alpha * global + (1 - alpha) * (local(layer2) + local(layer4)) / 2,
    each local term Eq. 3's on that stage; a one-stage list equals the plain form exactly; local_weights make
    it the weighted sum; bad weights are refused."""
    from lvmmed_monai.encoders import LVMMedResNet50
    from lvmmed_monai.engines import LVMMedPretrainModel
    from lvmmed_monai.ssl.affinity import global_affinity, local_affinity

    torch.manual_seed(0)
    enc = LVMMedResNet50().eval()
    crit = LVMMedLoss(in_dim=2048, graph_size=8, k=3, gumbel=False, gamma=4)
    model = LVMMedPretrainModel(enc, crit, world_size=1, local_level=["layer2", "layer4"])
    g = torch.Generator().manual_seed(1)
    img_s, img_t = torch.rand(16, 3, 64, 64, generator=g), torch.rand(16, 3, 64, 64, generator=g)
    c_s, c_t = torch.rand(16, 2, 64, 64, generator=g), torch.rand(16, 2, 64, 64, generator=g)
    loss, _ = model(img_s, img_t, c_s, c_t)
    with torch.no_grad():
        levels = [m.split(16) for m in enc(torch.cat([img_s, img_t]))]
    (f_s, f_t), (l2_s, l2_t) = levels[4], levels[2]
    assert l2_s.shape[-2:] == (8, 8)
    expected = crit(f_s, f_t, c_s, c_t, local_s=[l2_s, f_s], local_t=[l2_t, f_t]).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert enc.layer2[0].conv1.weight.grad.abs().sum() > 0

    with torch.no_grad():
        aff = crit.affinities(f_s, f_t, c_s, c_t, [l2_s, f_s], [l2_t, f_t])
        one = crit.affinities(f_s, f_t, c_s, c_t)  # the last stage alone, as the paper
        z = torch.cat([crit.projector(f_s.mean((2, 3))), crit.projector(f_t.mean((2, 3)))])
        z_hat, _ = crit._graphs(z.view(4, 8, -1))

        def local(ms: torch.Tensor, mt: torch.Tensor) -> torch.Tensor:
            flat = [m.flatten(2).transpose(1, 2).reshape(2, 8, -1, m.shape[1]) for m in (ms, mt)]
            pos = [crit._positions(c, m, 2, 8) for c, m in ((c_s, ms), (c_t, mt))]
            return local_affinity(*flat, *pos, gamma=4)

        glob = global_affinity(z_hat[:2], z_hat[2:])
        by_hand = 0.8 * glob + 0.2 * (local(l2_s, l2_t) + local(f_s, f_t)) / 2
        torch.testing.assert_close(aff.c_v, by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one.c_v, 0.8 * glob + 0.2 * local(f_s, f_t), rtol=1e-5, atol=1e-6)
        assert torch.equal(crit.affinities(f_s, f_t, c_s, c_t, [l2_s], [l2_t]).c_v,
                           crit.affinities(f_s, f_t, c_s, c_t, l2_s, l2_t).c_v)
        # local_weights: the weighted sum of the stages' terms instead of their mean
        weighted = LVMMedLoss(in_dim=2048, graph_size=8, k=3, gumbel=False, gamma=4, local_weights=[1.0, 0.5])
        weighted.load_state_dict(crit.state_dict())
        aff_w = weighted.affinities(f_s, f_t, c_s, c_t, [l2_s, f_s], [l2_t, f_t])
        torch.testing.assert_close(aff_w.c_v, 0.8 * glob + 0.2 * (local(l2_s, l2_t) + 0.5 * local(f_s, f_t)),
                                   rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match=r"one finite weight >= 0 per local level \(2\)"):
            LVMMedLoss(in_dim=2048, graph_size=8, k=3, local_weights=[1.0]).affinities(
                f_s, f_t, c_s, c_t, [l2_s, f_s], [l2_t, f_t])
    for bad in ([1.0, -0.5], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="local_weights must hold"):
            LVMMedLoss(in_dim=2048, graph_size=8, k=3, local_weights=bad)
    with pytest.raises(ValueError, match="same number"):
        crit.affinities(f_s, f_t, c_s, c_t, [l2_s, f_s], [l2_t])
    with pytest.raises(ValueError, match="local_level must be one of"):
        LVMMedPretrainModel(enc, crit, world_size=1, local_level=[])
