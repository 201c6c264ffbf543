"""The non-finite guard: a bad step is skipped by the fused optimizer itself and reported DELAY batches later."""

import math

import pytest
import torch

from lightning_ldm.training.nonfinite import DELAY, NonFiniteGuard


def model_and_optimizer():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4))
    return weight, torch.optim.AdamW([weight], lr=0.1, fused=True)


def backward(weight, scale: float) -> torch.Tensor:
    loss = (weight * scale).pow(2).sum()
    loss.backward()
    return loss


def test_a_nan_step_is_skipped_on_the_device_and_reported_delay_batches_later():
    weight, optimizer = model_and_optimizer()
    guard = NonFiniteGuard()
    before = weight.detach().clone()
    guard.before_step(optimizer, backward(weight, float("nan")), "diffusion", batch=0)
    optimizer.step()
    optimizer.zero_grad()
    assert torch.equal(weight.detach(), before)  # the update never happened
    assert float(optimizer.state[weight]["step"]) == 0  # nor was it counted (Adam's bias correction)
    for batch in range(1, DELAY):
        assert guard.first_failure(batch) is None  # not read yet: reading it would wait for the GPU
        guard.before_step(optimizer, backward(weight, 1.0), "diffusion", batch=batch)
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(weight.detach(), before)  # finite steps after it do apply
    failed_batch, name, loss = guard.first_failure(DELAY)
    assert (failed_batch, name) == (0, "diffusion") and math.isnan(loss)


def test_finite_loss_with_infinite_gradients_is_caught_too():
    weight, optimizer = model_and_optimizer()
    guard = NonFiniteGuard()
    loss = backward(weight, 1.0)
    weight.grad[0] = float("inf")  # e.g. an overflow in the backward pass
    skip = guard.before_step(optimizer, loss, "generator", batch=5)
    assert float(skip) == 1.0
    assert guard.first_failure(5, everything=True)[:2] == (5, "generator")


def test_finite_steps_are_never_reported():
    weight, optimizer = model_and_optimizer()
    guard = NonFiniteGuard()
    for batch in range(4):
        assert float(guard.before_step(optimizer, backward(weight, 1.0), "g", batch=batch)) == 0.0
        optimizer.step()
        optimizer.zero_grad()
    assert guard.first_failure(10, everything=True) is None


def test_with_a_grad_scaler_only_the_loss_counts_and_the_scaler_keeps_found_inf():
    """fp16 + GradScaler: scaled gradients overflow by design and the scaler skips those steps itself."""
    weight, optimizer = model_and_optimizer()
    guard = NonFiniteGuard()
    loss = backward(weight, 1.0)
    weight.grad[0] = float("inf")
    assert float(guard.before_step(optimizer, loss, "g", batch=0, gradients=False)) == 0.0
    assert getattr(optimizer, "found_inf", None) is None


def test_an_optimizer_that_cannot_skip_on_the_device_is_refused():
    weight = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, foreach=True)
    with pytest.raises(TypeError, match="fused=True"):
        NonFiniteGuard().before_step(optimizer, backward(weight, 1.0), "g", batch=0)
