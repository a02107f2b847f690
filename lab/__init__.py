"""The lab: what a researcher runs to see what the adaptor does to an optimizer.

Command line ``explore`` (also ``python -m lab``):

- ``explore demo``: the paper's Figure 1 on 2-D valley landscapes (trajectories + table);
- ``explore compare``: optimizers × seeds on real data (scikit-learn's digits) or a synthetic
  task, with large-batch options; mean ± std table, CSV, JSON and a loss-curve plot;
- ``explore flatness``: α ∈ {-5, 0, 0.5} against the top Hessian eigenvalue;
- ``explore optimizers``: the selectable names (``sgd``, ``adamw``, ``lamb``, ``alto``, ...,
  and ``e-<name>`` for the adaptor over each).

Modules: :mod:`lab.registry` (names → optimizers), :mod:`lab.tasks`, :mod:`lab.train`,
:mod:`lab.compare`, :mod:`lab.demo`, :mod:`lab.flatness`, :mod:`lab.plots`, :mod:`lab.cli`.
"""
