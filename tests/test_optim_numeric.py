"""Optimizer steps checked number by number against PyTorch's own implementations (mutations such as swapped
betas, a flipped weight-decay sign, another Newton-Schulz polynomial or update scale, or Muon without Nesterov
momentum all change these numbers)."""
from __future__ import annotations

import copy

import pytest
import torch

from chatforge.config import TrainConfig
from chatforge.optim import Muon, build_optimizer, newton_schulz


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(24, 40) * 0.1)
        self.g = torch.nn.Parameter(torch.ones(24) + 0.1 * torch.randn(24))


def grads(step: int, params) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_adamw_matches_torch():
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, beta1=0.8, beta2=0.97, weight_decay=0.3)
    ours, ref = Two(), Two()
    opt = build_optimizer(ours, cfg)
    ref_opt = torch.optim.AdamW([{"params": [ref.w], "weight_decay": 0.3}, {"params": [ref.g], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.8, 0.97))
    for step in range(3):
        grads(step, [ours.w, ours.g])
        grads(step, [ref.w, ref.g])
        opt.step()
        ref_opt.step()
    assert torch.allclose(ours.w, ref.w, atol=1e-6) and torch.allclose(ours.g, ref.g, atol=1e-6)


def _muon_pair(fp32_ns: bool, lr=0.02, wd=0.5, mom=0.9):
    ours, ref = Two(), Two()
    opt = Muon([{"params": [ours.w], "use_muon": True, "weight_decay": wd},
                {"params": [ours.g], "use_muon": False, "weight_decay": 0.0}], lr=lr, momentum=mom, betas=(0.9, 0.95),
               fp32_ns=fp32_ns)
    ref_muon = torch.optim.Muon([ref.w], lr=lr, weight_decay=wd, momentum=mom, nesterov=True,
                                adjust_lr_fn="match_rms_adamw")
    ref_adam = torch.optim.AdamW([ref.g], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return ours, ref, opt, (ref_muon, ref_adam)


@pytest.mark.parametrize("fp32_ns", [False, True])
def test_muon_matches_torch_optim_muon_and_its_adamw_half_matches_adamw(fp32_ns):
    ours, ref, opt, refs = _muon_pair(fp32_ns)
    for step in range(3):
        grads(step, [ours.w, ours.g])
        grads(step, [ref.w, ref.g])
        opt.step()
        for r in refs:
            r.step()
    if fp32_ns:  # torch's Newton-Schulz runs in bf16, ours in fp32: 3 steps of ~2e-2 agree to ~3e-4
        assert torch.allclose(ours.w, ref.w, atol=1e-3), (ours.w - ref.w).abs().max()
        assert not torch.equal(ours.w, ref.w)
    else:  # torch.optim.Muon itself does the step
        assert torch.equal(ours.w, ref.w)
    assert torch.allclose(ours.g, ref.g, atol=1e-6)


def test_muon_state_resumes_across_newton_schulz_precisions_and_follows_the_schedule():
    ours, _, opt, _ = _muon_pair(fp32_ns=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for step in range(2):
        grads(step, [ours.w, ours.g])
        opt.step()
        sched.step()
    # The schedule reaches both inner optimizers through the shared group dicts.
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint gives it: no tensors shared with opt
    other, _, opt2, _ = _muon_pair(fp32_ns=False)
    other.load_state_dict(ours.state_dict())
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)  # built, then loaded, as resume does
    opt2.load_state_dict(state)
    sched2.load_state_dict(sched.state_dict())
    assert torch.equal(opt2.muon.state[other.w]["momentum_buffer"], opt.muon.state[ours.w]["momentum_buffer"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)
    grads(5, [ours.w, ours.g]), grads(5, [other.w, other.g])
    opt.step(), opt2.step()
    assert torch.allclose(ours.w, other.w, atol=1e-3) and torch.allclose(ours.g, other.g, atol=1e-6)
    with pytest.raises(Exception, match="not a Muon state"):
        opt2.load_state_dict(torch.optim.AdamW([other.g]).state_dict())


@pytest.mark.parametrize("shape", [(32, 32), (16, 64), (64, 16)])
def test_newton_schulz_is_near_orthogonal(shape):
    torch.manual_seed(1)
    G = torch.randn(*shape)
    X = newton_schulz(G)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.25, s  # Muon's quintic lands singular values in about [0.7, 1.2]
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)  # and it points where U V^T does
    assert torch.nn.functional.cosine_similarity(X.flatten(), (U @ Vh).flatten(), dim=0) > 0.95
