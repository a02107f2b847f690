"""Theory made checkable: toy landscapes, flatness (Hessian spectrum), and the paper's bounds.

- :mod:`theory.landscapes`: toy problems with known minima (quadratics, logistic regression,
  Rosenbrock, Beale, Rastrigin, and valley landscapes after the paper's Figure 1).
- :mod:`theory.flatness`: top Hessian eigenvalue (Lanczos / power iteration on
  Hessian-vector products) and Hutchinson's trace estimate.
- :mod:`theory.bounds`: the admissible α interval and the computable quantities of the
  paper's two convergence theorems.

``theory/README.md`` states the theorems, proves the one-buffer identity, and separates what
is proven from what is observed. This package imports :mod:`adaptor`, never ``lab``.
"""

from theory import bounds, flatness, landscapes

__all__ = ["bounds", "flatness", "landscapes"]
