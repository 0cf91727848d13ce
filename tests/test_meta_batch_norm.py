"""A user's model with ``nn.BatchNorm2d`` given to MAML: a clear error naming the fix in train mode,
and ``convert_batch_norm`` turning it into MAML's batch-statistics BatchNorm, which adapts (loop
and vmap alike) and computes what the original computes in train mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metarobust.meta as meta
from metarobust.errors import ConfigError
from metarobust.meta import MAML, convert_batch_norm, functional_forward, params_of
from metarobust.models.layers import TaskBatchNorm2d


def user_model(affine: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=affine), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    with torch.no_grad():  # BatchNorm weights away from their (1, 0) initialisation
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 1, 8, 8, generator=g), torch.arange(3).repeat(2)


def test_maml_on_a_train_mode_batch_norm_model_names_the_fix():
    model = user_model()
    x, y = task()
    for maml in (MAML(model, 0.1, 1), MAML(functional_forward(model), 0.1, 1)):
        with pytest.raises(ConfigError, match=r"BatchNorm layers in train mode \(1, 3\.1\).*convert_batch_norm"):
            maml.adapt(params_of(model), x, y)
    fast = MAML(model.eval(), 0.1, 1).adapt(params_of(model), x, y)  # frozen running statistics work
    assert set(fast) == set(params_of(model))


def test_convert_batch_norm_keeps_what_the_model_computes_in_train_mode_and_adapts():
    original = user_model()
    x, y = task()
    converted = convert_batch_norm(copy.deepcopy(original))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert isinstance(converted[1], TaskBatchNorm2d) and isinstance(converted[3][1], TaskBatchNorm2d)
    torch.testing.assert_close(converted[1].weight, original[1].weight)
    # float32 round-off of two ways of computing the same batch statistics
    torch.testing.assert_close(converted.train()(x), original.train()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted.eval()(x), converted.train()(x))  # batch statistics in eval too

    maml = MAML(converted, 0.1, 2)
    params = params_of(converted)
    fast = maml.adapt(params, x, y)
    before = F.cross_entropy(maml.forward(params, x), y)
    after = F.cross_entropy(maml.forward(fast, x), y)
    assert after < before  # the inner loop learns, BatchNorm weights included
    assert not torch.equal(fast["1.weight"], params["1.weight"])
    xs, ys = torch.stack([task(s)[0] for s in range(3)]), torch.stack([task(s)[1] for s in range(3)])
    batched = torch.func.vmap(lambda xt, yt: maml.adapt(params, xt, yt)["5.weight"])(xs, ys)
    looped = torch.stack([maml.adapt(params, xs[t], ys[t])["5.weight"] for t in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


def test_convert_batch_norm_freezes_a_layer_without_affine_weights_and_refuses_1d():
    converted = convert_batch_norm(user_model(affine=False))
    assert "1.weight" not in params_of(converted) and "3.1.weight" in params_of(converted)
    with pytest.raises(ConfigError, match=r"1 \(BatchNorm1d\).*model\.eval\(\)"):
        convert_batch_norm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def test_the_meta_package_exports_its_public_names():
    assert {"MAML", "convert_batch_norm", "functional_forward", "params_of", "LogisticProbe",
            "meta_backward", "run_tasks", "head_names"} <= set(meta.__all__)
    assert all(hasattr(meta, name) for name in meta.__all__)
