"""Path strings: how a leaf is named when rules are matched against it."""

from jax.tree_util import GetAttrKey, KeyPath, keystr


def path_string(keypath: KeyPath) -> str:
  """Joins a key path with "/", dropping a trailing ``.value``.

  ``nnx.Optimizer`` calls ``init`` on ``nnx.Variable`` leaves and ``update`` on
  plain arrays, and linen stores boxed parameters (``LogicallyPartitioned``)
  the same way; dropping the box's ``value`` attribute gives both the same path.

  Example:
    >>> import jax
    >>> tree = {"params": {"Dense_0": {"kernel": 0.0}}, "layers": [{"w": 0.0}]}
    >>> [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    ['layers/0/w', 'params/Dense_0/kernel']
  """
  if keypath and isinstance(keypath[-1], GetAttrKey) and keypath[-1].name == "value":
    keypath = keypath[:-1]
  return keystr(tuple(keypath), simple=True, separator="/")
