"""Bundled training factories, usable as ``--train <entry>`` or through :data:`EXAMPLES`.

Each entry is a ``module:factory`` string for
:func:`chaos_worker.training.trainspec.load_trainspec`:

- ``digits``: a 64-64-10 MLP on scikit-learn's 8x8 digits (SGD with momentum).
- ``chartransformer``: a 2-layer character-level transformer on a bundled public-domain
  corpus (Adam).
- ``bigstate``: the digits MLP with a large frozen table (``CHAOS_STATE_MB``), for the
  scale-out benchmark: big state, small gradient.
- ``mlp``: 4 x Linear(w, w) + GELU sized by ``CHAOS_MLP_PARAMS`` (AdamW, synthetic data),
  for the throughput benchmark.
"""

EXAMPLES: dict[str, str] = {
    "digits": "chaos_worker.examples.digits:factory",
    "chartransformer": "chaos_worker.examples.chartransformer:factory",
    "bigstate": "chaos_worker.examples.bigstate:factory",
    "mlp": "chaos_worker.examples.mlp:factory",
}
