import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raypipe.config import load_config
from raypipe.losses import ofd_distill_loss
from raypipe.distillers.ofd import FrozenTeacher, StageTaps, Student, bn_before_stage_relu
from raypipe.methods.moco import MoCo
from raypipe.models import build_backbone
from raypipe.student import build_distiller


def build_student(cfg, num_classes, teacher_state):
    d = build_distiller(cfg, num_classes, teacher_state)
    return d.student, d.teacher


def small_moco(queue=8, mu=0.9):
    return MoCo({"backbone": "resnet18", "small_stem": True}, proj_hidden=16, proj_dim=4, queue_size=queue, key_momentum=mu, bn_splits=2)


def test_enqueue_wraps_and_moves_pointer():
    m = small_moco(queue=8)
    first, second, third = (torch.full((4, 4), float(v)) for v in (1, 2, 3))
    m.enqueue(first)
    assert int(m.queue_ptr) == 4 and torch.all(m.queue[:4] == 1)
    m.enqueue(second)
    assert int(m.queue_ptr) == 0 and torch.all(m.queue[4:] == 2)
    m.enqueue(third)   # wraps round to the start, overwriting the oldest keys
    assert int(m.queue_ptr) == 4 and torch.all(m.queue[:4] == 3) and torch.all(m.queue[4:] == 2)


def test_enqueue_rejects_batch_not_dividing_queue():
    with pytest.raises(ValueError, match="multiple"):
        small_moco(queue=8).enqueue(torch.zeros(3, 4))


def test_momentum_update_matches_formula_and_keys_get_no_grad():
    m = small_moco(mu=0.9)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in m.encoder_k.parameters()]
    q_params = [p.clone() for p in m.encoder_q.parameters()]
    m.momentum_update()
    for pk, k0, pq in zip(m.encoder_k.parameters(), before_k, q_params):
        assert torch.allclose(pk, 0.9 * k0 + 0.1 * pq, atol=1e-6)
    x = torch.randn(4, 3, 16, 16)
    q, k = m(x, x)
    q.sum().backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert all(not p.requires_grad for p in m.encoder_k.parameters())
    assert not k.requires_grad and torch.allclose(k.norm(dim=1), torch.ones(4), atol=1e-5)


def test_single_worker_shuffle_bn_returns_keys_in_input_order():
    m = small_moco().eval()  # eval: BN uses running stats, so shuffling must not change any key
    x = torch.randn(6, 3, 16, 16)
    keys = m.encode_keys(x)
    direct = F.normalize(m.encoder_k(x), dim=1)
    assert torch.allclose(keys, direct, atol=1e-5)


def test_split_batchnorm_normalises_each_group_and_averages_running_stats():
    from raypipe.methods.moco import SplitBatchNorm2d
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3).train()
    nn.init.uniform_(plain.weight, 0.5, 2.0)
    nn.init.uniform_(plain.bias, -1.0, 1.0)
    split = SplitBatchNorm2d(3, num_splits=2).train()
    split.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 4, 4) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0
    out = split(x)
    refs = [copy.deepcopy(plain) for _ in range(2)]
    for g in range(2):  # group g holds samples g, g + 2, g + 4, ...
        assert torch.allclose(out[g::2], refs[g](x[g::2]), atol=1e-5)
    assert torch.allclose(split.running_mean, (refs[0].running_mean + refs[1].running_mean) / 2, atol=1e-6)
    assert torch.allclose(split.running_var, (refs[0].running_var + refs[1].running_var) / 2, atol=1e-6)
    assert not torch.allclose(out, plain(x), atol=1e-3)   # whole-batch BN differs
    split.eval(), plain.eval()
    plain.load_state_dict(split.state_dict())
    assert torch.allclose(split(x), plain(x))   # eval: plain BatchNorm on the running statistics


def test_single_worker_split_bn_in_both_encoders_in_train_mode():
    """MoCo's single-GPU recipe: queries AND keys normalised per group; keys from a shuffled batch,
    returned in input order. A query encoder with whole-batch BN fails the first check."""
    from raypipe.methods.moco import SplitBatchNorm2d
    m = small_moco().train()   # bn_splits=2
    reference = copy.deepcopy(m)
    for bn in reference.modules():   # the reference normalises whatever batch it is given
        if isinstance(bn, SplitBatchNorm2d):
            bn.num_splits = 1
    n = 8
    x = torch.randn(n, 3, 16, 16)
    q = m.encoder_q(x)
    for g in range(2):
        assert torch.allclose(q[g::2], copy.deepcopy(reference.encoder_q)(x[g::2]), atol=1e-4)
    torch.manual_seed(5)
    keys = m.encode_keys(x)
    torch.manual_seed(5)
    perm = torch.randperm(n)            # the permutation encode_keys drew
    for g in range(2):
        members = perm[g::2]            # positions g, g+2, ... of the shuffled batch form group g
        direct = F.normalize(copy.deepcopy(reference.encoder_k)(x[members]), dim=1)
        assert torch.allclose(keys[members], direct, atol=1e-4)


def test_contrastive_step_uses_the_queue_before_enqueueing_the_batch():
    from raypipe.losses import margin_nce_loss
    from raypipe.loop import Runtime
    from raypipe.methods.moco import MoCoMargin
    cfg = load_config(overrides=["teacher.moco.proj_hidden=16", "teacher.moco.proj_dim=4", "teacher.moco.queue_size=8",
                                 "teacher.batch_size=4", "teacher.moco.margin=0.4", "teacher.moco.temperature=0.2"])
    method = MoCoMargin(cfg)
    m = method.model.eval()  # eval: deterministic keys, so q and k can be recomputed
    queue_before = m.queue.clone()
    x = torch.randn(4, 3, 16, 16)
    rt = Runtime(torch.device("cpu"), None, False, 1, 0)
    loss, metrics = method.training_step(m, [x, x], rt)
    k = m.queue[:4].clone()             # this batch's keys were enqueued at the pointer (0)
    assert int(m.queue_ptr) == 4 and torch.equal(m.queue[4:], queue_before[4:])
    with torch.no_grad():
        q = F.normalize(m.encoder_q(x), dim=1)
    expected = margin_nce_loss((q * k).sum(1), q @ queue_before.t(), 0.4, 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["neg_sim"].item() == pytest.approx((q @ queue_before.t()).mean().item(), abs=1e-5)
    assert metrics["pos_sim"].item() == pytest.approx((q * k).sum(1).mean().item(), abs=1e-5)
    after = margin_nce_loss((q * k).sum(1), q @ m.queue.t(), 0.4, 0.2)   # enqueue-first gives another loss
    assert abs(after.item() - expected.item()) > 1e-3


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_stage_taps_give_pre_relu_outputs(arch):
    net, _ = build_backbone(arch, small_stem=True)
    outputs = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(net, name).register_forward_hook(lambda mod, i, o, name=name: outputs.__setitem__(name, o))
    taps = StageTaps(net)
    net.train()
    net(torch.randn(2, 3, 16, 16))
    feats = taps.pop()
    for f, name in zip(feats, ("layer1", "layer2", "layer3", "layer4")):
        assert (f < 0).any(), "pre-ReLU features must keep negative values"
        assert torch.allclose(F.relu(f), outputs[name])
    chans = [bn.num_features for bn in bn_before_stage_relu(net)]
    assert chans == [f.shape[1] for f in feats]


def identity_connectors(student: Student) -> None:
    for conn in student.connectors:
        conv, bn = conn
        nn.init.zeros_(conv.weight)
        conv.weight.data[:, :, 0, 0] = torch.eye(conv.weight.shape[0])
        bn.eval()
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)


def test_distill_term_zero_for_identical_student_and_grows_when_perturbed():
    cfg = load_config(overrides=["student.backbone=resnet18"])
    teacher_net, _ = build_backbone("resnet18", True)
    state = teacher_net.state_dict()
    student, teacher = build_student(cfg, 4, state)
    identity_connectors(student)
    student.net.eval()
    teacher.bn_train_mode = False
    teacher.eval()
    x = torch.randn(3, 3, 16, 16)
    _, feats = student(x)
    assert ofd_distill_loss(feats, teacher(x), teacher.margins).item() == pytest.approx(0.0, abs=1e-3)
    with torch.no_grad():
        for p in student.net.layer4.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _, feats = student(x)
    assert ofd_distill_loss(feats, teacher(x), teacher.margins).item() > 1.0


def test_student_starts_from_teacher_and_teacher_stays_frozen():
    cfg = load_config(overrides=["student.backbone=resnet18", "student.mode=distill"])
    teacher_net, _ = build_backbone("resnet18", True)
    state = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    student, teacher = build_student(cfg, 4, state)
    for k, v in teacher.net.state_dict().items():
        if k.startswith("fc"):
            continue
        assert torch.equal(student.net.state_dict()[k], v), k
    assert student.net is not teacher.net
    assert not any(p.requires_grad for p in teacher.parameters())
    params_before = {k: p.clone() for k, p in teacher.named_parameters()}
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    student.train()
    teacher.train()
    for _ in range(3):
        x = torch.randn(4, 3, 16, 16)
        logits, feats = student(x)
        loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + 1e-4 * ofd_distill_loss(feats, teacher(x), teacher.margins)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, p in teacher.named_parameters():
        assert torch.equal(p, params_before[k]), k
    assert not torch.equal(student.net.layer1[0].conv1.weight, params_before["net.layer1.0.conv1.weight"])


def test_teacher_bn_mode_switch():
    net, _ = build_backbone("resnet18", True)
    assert FrozenTeacher(copy.deepcopy(net), bn_train_mode=True).train().net.layer1[0].bn1.training
    assert not FrozenTeacher(copy.deepcopy(net), bn_train_mode=False).train().net.layer1[0].bn1.training


def test_ce_only_warmup_zeroes_lambda():
    cfg = load_config(overrides=["student.ofd.ce_only_epochs=3", "student.ofd.distill_weight=0.01",
                                 "student.backbone=resnet18"])
    state = build_backbone("resnet18", True)[0].state_dict()
    assert [build_distiller(cfg, 4, state).weight_at(e) for e in range(5)] == [0, 0, 0, 0.01, 0.01]
    sup = cfg.with_overrides({"student.mode": "finetune"})
    assert build_distiller(sup, 4, state).weight_at(10) == 0.0


def test_stem_stride_two_halves_every_stage_and_keeps_the_weights_shape():
    wide, _ = build_backbone("resnet18", small_stem=True)
    strided, _ = build_backbone("resnet18", small_stem=True, stem_stride=2)
    x = torch.randn(1, 3, 32, 32)
    sizes = []
    for net in (wide, strided):
        taps = StageTaps(net)
        net.eval()(x)
        sizes.append([f.shape[-1] for f in taps.pop()])
    assert sizes == [[32, 16, 8, 4], [16, 8, 4, 2]]
    strided.load_state_dict(wide.state_dict())  # same parameters: only the stride differs


def test_mixup_mixes_images_and_targets_with_one_weight():
    from raypipe.student import mixed_batch
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    logits = torch.randn(6, 4)
    plain, ce = mixed_batch(x, y, load_config(overrides=["student.label_smoothing=0.1"]))
    assert plain is x and ce(logits).item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item())
    cfg = load_config(overrides=["student.mixup_alpha=0.4"])
    torch.manual_seed(3)
    mixed, ce = mixed_batch(x, y, cfg)
    torch.manual_seed(3)   # the same draws, by hand
    mix = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(6)
    assert 0 < mix < 1 and torch.allclose(mixed, mix * x + (1 - mix) * x[perm])
    expected = mix * F.cross_entropy(logits, y) + (1 - mix) * F.cross_entropy(logits, y[perm])
    assert ce(logits).item() == pytest.approx(expected.item())
