import math

import pytest
import torch
import torch.nn.functional as F

from raypipe.losses import contrastive_logits, margin_nce_loss, ofd_distill_loss, ofd_margins, partial_l2


def info_nce(q, k, queue, tau):
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def test_margin_zero_is_infonce_exactly():
    g = torch.Generator().manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 16, generator=g), dim=1) for n in (8, 8, 32))
    l_pos, l_neg = contrastive_logits(q, k, queue)
    assert torch.equal(margin_nce_loss(l_pos, l_neg, 0.0, 0.2), info_nce(q, k, queue, 0.2))


def test_larger_margin_larger_loss():
    g = torch.Generator().manual_seed(1)
    l_pos, l_neg = torch.rand(6, generator=g), torch.rand(6, 20, generator=g)
    losses = [margin_nce_loss(l_pos, l_neg, m, 0.2).item() for m in (0.0, 0.2, 0.4, 0.8)]
    assert losses == sorted(losses) and len(set(losses)) == 4


def test_hand_computed_2x3():
    l_pos = torch.tensor([0.9, 0.5])
    l_neg = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, -0.5]])
    m, tau = 0.4, 0.5
    expected = 0.0
    for i in range(2):
        pos = math.exp((l_pos[i].item() - m) / tau)
        neg = sum(math.exp(v / tau) for v in l_neg[i].tolist())
        expected += -math.log(pos / (pos + neg)) / 2
    assert margin_nce_loss(l_pos, l_neg, m, tau).item() == pytest.approx(expected, rel=1e-6)


def test_loss_falls_within_20_sgd_steps():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    x = torch.randn(16, 32)
    x_aug = x + 0.1 * torch.randn_like(x)
    queue = F.normalize(torch.randn(16, 64), dim=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(20):
        q, k = F.normalize(net(x), dim=1), F.normalize(net(x_aug), dim=1).detach()
        loss = margin_nce_loss(*contrastive_logits(q, k, queue), 0.4, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_ofd_margins_closed_form_and_fallback():
    from statistics import NormalDist
    nd = NormalDist()
    gamma = torch.tensor([1.0, 2.0, -0.5, 1.0])   # sign of gamma is irrelevant (|weight|)
    beta = torch.tensor([0.0, 1.0, -0.3, 5.0])     # last: cdf(-5) < 1e-3 -> -3 * gamma
    m = ofd_margins(gamma, beta)
    for i in range(3):
        g, b = abs(gamma[i].item()), beta[i].item()
        expected = b - g * nd.pdf(b / g) / nd.cdf(-b / g)
        assert m[i].item() == pytest.approx(expected, rel=1e-5)
    assert m[3].item() == pytest.approx(-3.0)
    assert m[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-5)  # E[x | x<0], N(0,1)


def test_partial_l2_four_sign_cases():
    s = torch.tensor([-2.0, -0.5, 1.0, -1.0, 2.0])
    t = torch.tensor([-1.0, -1.0, 0.5, 0.5, -1.0])
    # s<=t & t<=0 -> 0 ; s>t & t<=0 -> (s-t)^2 ; s>t & t>0 -> sq ; s<=t & t>0 -> sq ; s>t, t<0 -> sq
    assert partial_l2(s, t).tolist() == [0.0, 0.25, 0.25, 2.25, 9.0]


def test_distill_loss_weights_stages_and_divides_by_batch():
    feats = [torch.ones(2, 3, 2, 2) for _ in range(4)]
    zeros = [torch.zeros(2, 3, 2, 2) for _ in range(4)]
    margins = [torch.full((3,), -1.0) for _ in range(4)]
    # every element: (1 - 0)^2 = 1; 24 elements per stage; weights 1/8+1/4+1/2+1; / batch 2
    assert ofd_distill_loss(feats, zeros, margins).item() == pytest.approx(24 * (1 / 8 + 1 / 4 + 1 / 2 + 1) / 2)
    # a teacher below its margin is lifted to the margin: student at the margin costs nothing
    low = [torch.full((2, 3, 2, 2), -5.0) for _ in range(4)]
    at_margin = [torch.full((2, 3, 2, 2), -1.0) for _ in range(4)]
    assert ofd_distill_loss(at_margin, low, margins).item() == 0.0


def test_distill_loss_weights_each_stage_and_applies_per_channel_margins():
    """Stages of different sizes and values, so swapped stage weights or a margin broadcast over the
    wrong axis give another number than the explicit sum."""
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 3, 4, 4), (2, 5, 2, 2), (2, 4, 2, 2), (2, 6, 1, 1)]
    students = [torch.randn(*sh, generator=g) for sh in shapes]
    teachers = [torch.randn(*sh, generator=g) * 2 for sh in shapes]
    margins = [-torch.rand(sh[1], generator=g) for sh in shapes]   # one margin per channel
    expected = 0.0
    for w, s, t, m in zip((1 / 8, 1 / 4, 1 / 2, 1.0), students, teachers, margins):
        for idx in torch.cartesian_prod(*[torch.arange(d) for d in s.shape]).tolist():
            target = max(t[tuple(idx)].item(), m[idx[1]].item())
            sv = s[tuple(idx)].item()
            if not (sv <= target and target <= 0):
                expected += w * (sv - target) ** 2
    expected /= 2   # batch size
    assert ofd_distill_loss(students, teachers, margins).item() == pytest.approx(expected, rel=1e-5)
    swapped = ofd_distill_loss(students, teachers, margins, stage_weights=(1.0, 1 / 2, 1 / 4, 1 / 8)).item()
    assert swapped != pytest.approx(expected, rel=1e-3)
