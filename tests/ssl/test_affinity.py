"""Vertex and edge affinities (Eq. 2-4) against loops written from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvmmed_monai.ssl.affinity import (
    edge_affinity,
    global_affinity,
    local_affinity,
    num_kept,
    select_top_mean,
    vertex_affinity,
)


def test_global_affinity_is_cosine():
    zs, zt = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    c = global_affinity(zs, zt)
    ref = F.cosine_similarity(zs[:, :, None, :], zt[:, None, :, :], dim=-1)
    torch.testing.assert_close(c, ref)


def test_edge_affinity_matches_loop():
    zs, zt = torch.randn(2, 6, 4) * 3.0, torch.randn(2, 6, 4)
    es = torch.randint(0, 6, (2, 5, 2))
    et = torch.randint(0, 6, (2, 4, 2))
    us, ut = F.normalize(zs, dim=-1), F.normalize(zt, dim=-1)
    for min_norm in (0.0, 0.1, 0.5):
        c = edge_affinity(zs, zt, es, et, min_norm=min_norm)
        assert c.shape == (2, 5, 4)
        for g in range(2):
            for e, (i, j) in enumerate(es[g].tolist()):
                for f, (a, b) in enumerate(et[g].tolist()):
                    d1, d2 = us[g, i] - us[g, j], ut[g, a] - ut[g, b]
                    if min_norm == 0.0:  # the paper's cosine of the differences (of unit embeddings)
                        ref = F.cosine_similarity(d1, d2, dim=0, eps=1e-8) if i != j and a != b else torch.tensor(0.0)
                    else:
                        ref = (d1 / max(d1.norm(), min_norm)) @ (d2 / max(d2.norm(), min_norm))
                    torch.testing.assert_close(c[g, e, f], ref)


def test_edge_affinity_paper_form_is_the_raw_cosine():
    """form="paper": cos(z_i - z_j, z_a - z_b) on the raw embeddings, as Sec. 3.2.3 prints it."""
    torch.manual_seed(3)
    zs, zt = torch.randn(2, 6, 4) * torch.rand(2, 6, 1) * 5, torch.randn(2, 6, 4)
    es, et = torch.randint(0, 6, (2, 5, 2)), torch.randint(0, 6, (2, 4, 2))
    c = edge_affinity(zs, zt, es, et, min_norm=0.1, form="paper")  # min_norm ignored
    for g in range(2):
        for e, (i, j) in enumerate(es[g].tolist()):
            for f, (a, b) in enumerate(et[g].tolist()):
                d1, d2 = zs[g, i] - zs[g, j], zt[g, a] - zt[g, b]
                ref = F.cosine_similarity(d1, d2, dim=0, eps=1e-8) if i != j and a != b else torch.tensor(0.0)
                torch.testing.assert_close(c[g, e, f], ref)
    assert not torch.allclose(c, edge_affinity(zs, zt, es, et, min_norm=0.0))  # not the unit form
    with pytest.raises(ValueError, match="form"):
        edge_affinity(zs, zt, es, et, form="literal")


def test_edge_affinity_scale_free_and_bounded_gradient_for_near_duplicates():
    """c_e does not depend on the embeddings' norms, and a near-duplicate edge (two consecutive slices) has
    an affinity near 0 and a bounded gradient, where the plain cosine's gradient grows as 1 / |z_i - z_j|."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, 16)
    zt = z.clone()
    z[0, 1] = z[0, 0] + 1e-4 * torch.randn(16)  # node 1 is a near-duplicate of node 0, in both views
    zt[0, 1] = zt[0, 0] + 1e-4 * torch.randn(16)
    edges = torch.tensor([[[0, 1], [2, 3]]])
    torch.testing.assert_close(edge_affinity(z * 7.0, z, edges, edges), edge_affinity(z, z, edges, edges))
    grads = {}
    for min_norm in (0.1, 0.0):
        zz = z.clone().requires_grad_(True)
        c = edge_affinity(zz, zt, edges, edges, min_norm=min_norm)
        c[0, 0, 0].backward()  # the near-duplicate edge with itself in the other view
        grads[min_norm] = zz.grad.norm().item()
        if min_norm:
            assert abs(c[0, 0, 0].item()) < 1e-3 and c[0, 1, 1].item() > 0.99
    assert grads[0.1] < 50 < 1e3 < grads[0.0]


def _local_loop(ys, yt, ps, pt, gamma: int) -> float:
    """Appendix A's local_cost for one direction, literally: loops over positions, sorted select_top."""

    def one(dist_fn) -> float:
        pairs = []
        for p in range(ys.shape[0]):
            dists = [dist_fn(p, q) for q in range(yt.shape[0])]
            q = min(range(len(dists)), key=lambda j: (dists[j], j))
            pairs.append((dists[q], p, float(F.cosine_similarity(ys[p], yt[q], dim=0, eps=1e-8))))
        kept = sorted(pairs)[: min(gamma, len(pairs))]
        return sum(c for _, _, c in kept) / len(kept)

    location = one(lambda p, q: float(((ps[p] - pt[q]) ** 2).sum()))
    feature = one(lambda p, q: float(((ys[p] - yt[q]) ** 2).sum()))
    return 0.5 * (location + feature)


@pytest.mark.parametrize("gamma", [1, 3, 20])
def test_local_affinity_matches_loop(gamma):
    g, n, p, q, d = 2, 3, 4, 6, 5  # P != Q: a global and a local crop
    ys, yt = torch.randn(g, n, p, d, dtype=torch.float64), torch.randn(g, n, q, d, dtype=torch.float64)
    ps, pt = torch.rand(g, n, p, 2, dtype=torch.float64), torch.rand(g, n, q, 2, dtype=torch.float64)
    c = local_affinity(ys, yt, ps, pt, gamma=gamma)
    assert c.shape == (g, n, n) and c.dtype == torch.float32
    for gg in range(g):
        for i in range(n):
            for a in range(n):
                ref = _local_loop(ys[gg, i], yt[gg, a], ps[gg, i], pt[gg, a], gamma)
                ref += _local_loop(yt[gg, a], ys[gg, i], pt[gg, a], ps[gg, i], gamma)  # a -> i
                assert math.isclose(float(c[gg, i, a]), ref, rel_tol=1e-5, abs_tol=1e-5)


def test_local_chunking_equals_single_pass():
    ys, yt = torch.randn(5, 4, 9, 8), torch.randn(5, 4, 9, 8)
    ps, pt = torch.rand(5, 4, 9, 2), torch.rand(5, 4, 9, 2)
    whole = local_affinity(ys, yt, ps, pt, gamma=4)
    chunked = local_affinity(ys, yt, ps, pt, gamma=4, max_elements=2 * 4 * 4 * 81)  # 2 graphs per chunk
    torch.testing.assert_close(whole, chunked)


def test_select_top_keeps_nearest_pairs():
    cos = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4]])
    dist = torch.tensor([[3.0, 1.0], [0.5, 2.0], [4.0, 5.0]])  # p0->q1 (1.0), p1->q0 (0.5), p2->q0 (4.0)
    assert math.isclose(float(select_top_mean(cos, dist, 1)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(select_top_mean(cos, dist, 2)), (0.5 + 0.9) / 2, rel_tol=1e-6)
    assert math.isclose(float(select_top_mean(cos, dist, 3)), (0.5 + 0.9 + 0.3) / 3, rel_tol=1e-6)


def test_num_kept():
    assert num_kept(20, 49) == 20 and num_kept(20, 9) == 9
    assert num_kept(0.4, 49) == 20 and num_kept(0.4, 9) == 4 and num_kept(1.0, 9) == 9
    for bad in (0, -1, 1.5, 0.0, True):
        with pytest.raises(ValueError, match="gamma"):
            num_kept(bad, 9)


def test_identical_views_give_maximal_local_cost():
    """Same features and coordinates in both views: every pairing finds itself, cosine 1, so c^lo = 2."""
    y = torch.randn(1, 3, 4, 6)
    pos = torch.rand(1, 3, 4, 2)
    c = local_affinity(y, y.clone(), pos, pos.clone(), gamma=2)
    torch.testing.assert_close(c.diagonal(dim1=1, dim2=2), torch.full((1, 3), 2.0))
    assert (c <= 2.0 + 1e-6).all() and (c >= -2.0 - 1e-6).all()


def test_vertex_affinity_combines_eq3():
    zs, zt = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    ys, yt = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    ps, pt = torch.rand(2, 4, 9, 2), torch.rand(2, 4, 9, 2)
    c = vertex_affinity(zs, zt, ys, yt, ps, pt, alpha=0.8, gamma=5)
    ref = 0.8 * global_affinity(zs, zt) + 0.2 * local_affinity(ys, yt, ps, pt, gamma=5)
    torch.testing.assert_close(c, ref)
    torch.testing.assert_close(vertex_affinity(zs, zt), global_affinity(zs, zt))  # w/o local
    with pytest.raises(ValueError, match="needs yt"):
        vertex_affinity(zs, zt, ys)


def test_zero_vectors_give_finite_values_and_gradients():
    zs = torch.zeros(1, 4, 8, requires_grad=True)
    zt = torch.ones(1, 4, 8, requires_grad=True)  # identical nodes: all edge differences vanish
    ys = torch.zeros(1, 4, 9, 16, requires_grad=True)  # constant image -> zero feature maps
    yt = torch.randn(1, 4, 9, 16, requires_grad=True)
    pos = torch.rand(1, 4, 9, 2)
    edges = torch.tensor([[[0, 1], [1, 2], [2, 3]]])
    c_v = vertex_affinity(zs, zt, ys, yt, pos, pos, gamma=3)
    c_e = edge_affinity(zs, zt, edges, edges)
    assert torch.isfinite(c_v).all() and torch.isfinite(c_e).all() and (c_e == 0).all()
    (c_v.sum() + c_e.sum()).backward()
    for t in (zs, zt, ys, yt):
        assert torch.isfinite(t.grad).all()


def test_half_precision_inputs_compute_in_float32():
    zs, zt = torch.randn(1, 4, 8).half(), torch.randn(1, 4, 8).bfloat16()
    ys, yt = torch.randn(1, 4, 9, 16).half(), torch.randn(1, 4, 9, 16).half()
    pos = torch.rand(1, 4, 9, 2).half()
    c = vertex_affinity(zs, zt, ys, yt, pos, pos, gamma=3)
    assert c.dtype == torch.float32
    ref = vertex_affinity(zs.float(), zt.float(), ys.float(), yt.float(), pos.float(), pos.float(), gamma=3)
    torch.testing.assert_close(c, ref)


def test_shape_errors():
    with pytest.raises(ValueError, match="zs and zt"):
        global_affinity(torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="pos_s"):
        y = torch.randn(1, 2, 4, 3)
        local_affinity(y, y, torch.rand(1, 2, 5, 2), torch.rand(1, 2, 4, 2))
    with pytest.raises(ValueError, match="edges"):
        edge_affinity(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.zeros(2, 3, 3, dtype=torch.long),
                      torch.zeros(2, 3, 2, dtype=torch.long))
