"""binary_mask and binarize_model."""

import jax
import numpy as np
import optax
from flax import nnx

import lab_optax
from lab_optax.nnx import BinaryConv, BinaryLinear, binarize_model, binary_mask


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = BinaryConv(3, 4, (3, 3), rngs=rngs)
    self.fp = BinaryLinear(4, 4, binarize_kernel=False, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)


def test_binary_mask_selects_binary_params_for_pure_and_variable_states():
  model = Net(nnx.Rngs(0))
  mask = binary_mask(model)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat == {
    "['conv']['bias']": False,
    "['conv']['kernel']": True,
    "['fp']['bias']": False,
    "['fp']['kernel']": False,
    "['out']['bias']": False,
    "['out']['kernel']": False,
  }
  tx = lab_optax.lab(0.1, mask=mask)
  for params in (nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(model, nnx.Param))):
    latent = optax.tree.get(tx.init(params), "latent")
    binarized = [
      jax.tree_util.keystr(k)
      for k, v in jax.tree_util.tree_leaves_with_path(
        latent, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
      )
      if not isinstance(v, optax.MaskedNode)
    ]
    assert [b.replace(".value", "") for b in binarized] == ["['conv']['kernel']"]


def test_binarize_model_applies_the_first_projection():
  model = Net(nnx.Rngs(0))
  kernel = np.asarray(model.conv.kernel.get_value())
  for tx, alpha in (
    (lab_optax.lab(0.1, mask=binary_mask(model)), np.mean(np.abs(kernel))),
    (lab_optax.binary_connect(0.1, mask=binary_mask(model)), 1.0),
  ):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    binarize_model(model, optimizer)
    np.testing.assert_allclose(
      model.conv.kernel.get_value(), alpha * np.where(kernel >= 0, 1.0, -1.0), rtol=1e-6
    )
    np.testing.assert_array_equal(
      optax.tree.get(nnx.as_pure(optimizer.opt_state), "latent")["conv"]["kernel"], kernel
    )
    assert len(np.unique(np.asarray(model.fp.kernel.get_value()))) > 2
