"""Demos and tiny example classes: Lightning modules, data and runs, kept out of the pure modules.

As Lightning keeps its demos in ``lightning.pytorch.demos``, this package holds what the
``lightning-sens demo`` command, the examples, the tests and the benchmarks train:

- :mod:`lightning_sens.demos.data`: the demo's real images (Fashion-MNIST, the digits, MNIST,
  CIFAR10), their class names, corrupted labels, and the DataModules ``DemoData`` and
  ``DigitsData``;
- :mod:`lightning_sens.demos.models`: ``SmallCNN``, the demo's network;
- :mod:`lightning_sens.demos.run`: ``lightning-sens demo`` itself, and the ``evaluate`` command it
  prints;
- :mod:`lightning_sens.demos.tiny`: a tiny classifier and DataModule (8 × 8 random images) that
  fit in seconds, for tests and benchmarks.

Unlike the core, the flagging and the reporting, this package imports Lightning: nothing pure
imports it.
"""
