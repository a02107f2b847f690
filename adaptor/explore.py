"""The explored optimizer: ``explore(grad_estimator, base_update)`` and ``E(base)``.

At every step (the paper's Algorithm 5):

1. gradient estimation — the estimator leaves ``g_k`` in ``p.grad``;
2. gradient replacement — ``a_k = β·a_{k-1} + (1-β)·(g_k - g_{k-1})``, ``g̃_k = g_k + α·a_k``,
   in place on ``p.grad`` with one buffer per parameter (:mod:`adaptor.replacement`);
3. base update — ``base.step()`` with no closure, so the base sees ``g̃_k``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adaptor import fastpath
from adaptor.estimators import Autograd, Closure, GradEstimator, check_estimator
from adaptor.precision import (
    SKIPS_KEY,
    check_flag,
    check_state_dtype,
    resolve_state_dtype,
    skip_count,
)
from adaptor.replacement import (
    check_alpha_beta,
    fused_supported,
    replace_foreach_,
    replace_fused_,
)
from adaptor.shards import local, prepare_sharded_step
from adaptor.telemetry import Telemetry

ALPHA_KEY = "explore_alpha"
BETA_KEY = "explore_beta"
BUFFER_KEY = "explore_buffer"
ESTIMATOR_KEY = "explore_estimator"
# What GradScaler hands an optimizer with _step_supports_amp_scaling (set on the base
# around its step when the adaptor has consumed them).
_AMP_ATTRIBUTES = ("grad_scale", "found_inf")
# Per-parameter state that belongs to the adaptor (the rest of an entry is the base's).
_OWN_KEYS = (BUFFER_KEY, SKIPS_KEY)
# Keys an optimizer of this library creates lazily: a state dict without them still loads.
_LAZY_KEYS = frozenset({"kahan_comp", SKIPS_KEY})
_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _hashable(key: object) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _shape_of(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_own_state(index: int, p: Tensor, own: dict[str, Any]) -> None:
    """The adaptor's buffer has the parameter's shape; the skip counter is one number."""
    buffer = own.get(BUFFER_KEY)
    if BUFFER_KEY in own and (
        not isinstance(buffer, Tensor) or tuple(buffer.shape) != tuple(p.shape)
    ):
        raise ValueError(
            f"state_dict explore buffer of parameter {index} has shape {_shape_of(buffer)}, "
            f"the parameter has {tuple(p.shape)} (key '{BUFFER_KEY}')"
        )
    skips = own.get(SKIPS_KEY)
    if SKIPS_KEY in own and (not isinstance(skips, Tensor) or skips.numel() != 1):
        raise ValueError(
            f"state_dict '{SKIPS_KEY}' of parameter {index} must be a one-element tensor, "
            f"got shape {_shape_of(skips)}"
        )


def _check_base_entry(
    index: int, base_name: str, entry: dict[str, Any], expected: dict[str, Any]
) -> None:
    """The base's part of one parameter's state against what the base itself creates."""
    unknown = sorted(str(k) for k in entry if k not in expected)
    if unknown:
        raise ValueError(
            f"state_dict state of parameter {index} has key(s) {unknown} that {base_name} "
            f"does not keep (it keeps {sorted(map(str, expected))})"
        )
    missing = sorted(str(k) for k in expected if k not in entry and k not in _LAZY_KEYS)
    if missing:
        raise ValueError(
            f"state_dict state of parameter {index} lacks key(s) {missing} that {base_name} "
            f"keeps (it has {sorted(map(str, entry))})"
        )
    for key, shape in expected.items():
        value = entry.get(key)
        if shape is None or key not in entry:
            continue
        if isinstance(value, Tensor):
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"state_dict state of parameter {index}, key '{key}', has shape "
                    f"{tuple(value.shape)}; {base_name} keeps shape {shape} there"
                )
        elif len(shape) > 0:  # a number where a tensor is kept (e.g. an old float 'step')
            raise ValueError(
                f"state_dict state of parameter {index}, key '{key}', is a "
                f"{type(value).__name__}; {base_name} keeps a tensor of shape {shape} there"
            )


def _needs_own_closure(base: Optimizer) -> bool:
    """True for bases such as L-BFGS whose ``step`` must re-evaluate the loss itself."""
    if isinstance(base, torch.optim.LBFGS):
        return True
    try:
        parameter = inspect.signature(base.step).parameters.get("closure")
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _already_explores(base: Optimizer) -> bool:
    """Whether ``base`` already does the adaptor's replacement (ALTO, or an E).

    Recognised by the class attribute ``explores = True`` (the library's convention), by
    the adaptor's α/β keys among the base's *defaults* (a user may put ``explore_alpha`` in
    the groups it passes to a plain base: that is per-group α for E, not a second adaptor),
    or by an ``explore_buffer`` already in the base's state.
    """
    if isinstance(base, ExploredOptimizer) or getattr(base, "explores", False) is True:
        return True
    defaults = getattr(base, "defaults", {})
    if ALPHA_KEY in defaults or BETA_KEY in defaults:
        return True
    return any(isinstance(entry, dict) and BUFFER_KEY in entry for entry in base.state.values())


def _check_composable(base: Optimizer) -> None:
    """Refuse, before anything is modified, bases the adaptor cannot drive correctly."""
    name = type(base).__name__
    if _already_explores(base):
        raise TypeError(
            f"base_update {name} already explores (it applies the adaptor's replacement "
            "itself, e.g. ALTO = E(Lamb), or it is an explored optimizer): wrapping it again "
            "would apply the replacement twice and both would keep an explore_buffer; use "
            f"{name} alone, or E over its plain base (E(Lamb(...)) instead of E(ALTO(...)))"
        )
    if isinstance(base, torch.optim.SparseAdam):
        raise TypeError(
            "base_update SparseAdam takes sparse gradients, which the adaptor's dense "
            "replacement does not support; use SparseAdam without the adaptor, or a dense "
            "base (E(torch.optim.Adam(...)))"
        )
    for index, group in enumerate(base.param_groups):
        _check_not_differentiable(group, f"param group {index}")


def _check_not_differentiable(group: dict[str, Any], where: str) -> None:
    if group.get("differentiable", False):
        raise ValueError(
            f"base_update has differentiable=True ({where}): the adaptor replaces the "
            "gradient in place under no_grad, so gradients through the step would be wrong; "
            "differentiable bases are not supported (build the base with differentiable=False)"
        )


class _StateEntry(MutableMapping):
    """One parameter's state as ``E.state[p]`` shows it: the adaptor's keys over the base's.

    Reads look in the adaptor's own entry first (``explore_buffer``, its
    ``nonfinite_skips``), then in ``base.state[p]``; so a key both keep (a base of this
    library with ``skip_nonfinite`` counts its own ``nonfinite_skips``) reads as the
    adaptor's. A write goes to the entry that holds the key already; a new key goes to the
    adaptor's own entry (as before the merge, hooks that write ``state[p]["note"]`` write
    there). Iterating lists the adaptor's keys, then the base's others: this is what
    ``torch.distributed.checkpoint`` reads when it rebuilds a flattened state dict
    (``_unflatten_optim_state_dict`` keeps only the keys of ``optimizer.state[p]``).
    ``copy``/``pickle`` of an entry give a plain ``dict``.
    """

    __slots__ = ("_param", "_state")

    def __init__(self, state: ExploredState, param: Tensor) -> None:
        self._state = state
        self._param = param

    def _own(self) -> dict[Any, Any] | None:
        return self._state._own.get(self._param)

    def _base(self) -> dict[Any, Any] | None:
        entry = self._state._base.state.get(self._param)
        return entry if isinstance(entry, dict) else None

    def __getitem__(self, key: Any) -> Any:
        own = self._own()
        if own is not None and key in own:
            return own[key]
        base = self._base()
        if base is not None and key in base:
            return base[key]
        raise KeyError(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        own = self._own()
        base = self._base()
        if (own is None or key not in own) and key not in _OWN_KEYS and (
            base is not None and key in base
        ):
            base[key] = value
        else:
            self._state._own[self._param][key] = value

    def __delitem__(self, key: Any) -> None:
        own = self._own()
        if own is not None and key in own:
            del own[key]
            return
        base = self._base()
        if base is not None and key in base:
            del base[key]
            return
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        own, base = self._own(), self._base()
        return (own is not None and key in own) or (base is not None and key in base)

    def __iter__(self) -> Iterator[Any]:
        own = self._own() or {}
        yield from list(own)
        yield from [key for key in (self._base() or {}) if key not in own]

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


class ExploredState(MutableMapping):
    """``E.state``: per parameter, the adaptor's own state merged with the base's.

    ``state[p]`` (any tensor key, created on first write as torch's ``defaultdict``) is a
    :class:`_StateEntry` view over ``E``'s own entry (``explore_buffer``,
    ``nonfinite_skips``) and ``base.state[p]``; other keys (what hooks store, e.g.
    ``state["test"] = 1``) are the adaptor's own. Iteration and ``len`` cover every
    parameter that has state in either, so ``if optimizer.state`` is true once the base
    has state (``torch.distributed.checkpoint`` then skips its dry-run step). Assigning
    ``state[p] = mapping`` makes the merged entry equal ``mapping`` (each key written to
    its owner, keys left out removed from both). ``state_dict()``/``load_state_dict()``
    keep torch's layout: this is only how the live state is seen.
    """

    __slots__ = ("_base", "_own")

    def __init__(self, own: defaultdict[Any, Any], base: Optimizer) -> None:
        self._own = own
        self._base = base

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, Tensor):
            return _StateEntry(self, key)
        return self._own[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if not (isinstance(key, Tensor) and isinstance(value, Mapping)):
            self._own[key] = value
            return
        value = dict(value)  # it may be a view of this very entry
        base = self._base.state.get(key)
        base = base if isinstance(base, dict) else None
        to_base = {
            k: v for k, v in value.items()
            if base is not None and k in base and k not in _OWN_KEYS
        }
        if base is not None:
            for k in [k for k in base if k not in to_base]:
                del base[k]
            base.update(to_base)
        self._own[key] = {k: v for k, v in value.items() if k not in to_base}

    def __delitem__(self, key: Any) -> None:
        found = key in self._own
        self._own.pop(key, None)
        if isinstance(key, Tensor) and isinstance(self._base.state.get(key), dict):
            del self._base.state[key]
            found = True
        if not found:
            raise KeyError(key)

    def _base_params(self) -> list[Any]:
        return [
            key for key, entry in self._base.state.items()
            if isinstance(key, Tensor) and isinstance(entry, dict) and key not in self._own
        ]

    def __contains__(self, key: object) -> bool:
        if key in self._own:
            return True
        return isinstance(key, Tensor) and isinstance(self._base.state.get(key), dict)

    def __iter__(self) -> Iterator[Any]:
        yield from list(self._own)
        yield from self._base_params()

    def __len__(self) -> int:
        return len(self._own) + len(self._base_params())

    def __repr__(self) -> str:
        return repr({key: self[key] for key in self})

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, ({key: self[key] for key in self},))


class ExploredOptimizer(Optimizer):
    r"""A ``torch.optim.Optimizer`` that explores: the base optimizer fed ``g̃ = g + α·a``.

    .. math::
        a_k = β a_{k-1} + (1-β)(g_k - g_{k-1}),\quad \tilde g_k = g_k + α a_k,\quad
        θ_{k+1} = ψ(θ_k, \tilde g_k, …)

    Build it with :func:`explore` or :func:`E`. It shares the base's ``param_groups`` (the
    same list and dicts), so LR schedulers, ``add_param_group`` and per-group α/β work; α
    and β live in each group under ``explore_alpha`` and ``explore_beta`` and may be
    changed between steps (``|α| < 1/(1-β)``, ``0 <= β < 1``, checked at every step before
    anything is modified). Changing β mid-run applies to the buffer formed under the old β.

    After ``step()`` each ``p.grad`` holds ``g̃`` (the replacement is in place), except a
    parameter the fast path took (:mod:`adaptor.fastpath`): its kernel keeps ``g̃`` in
    registers and ``p.grad`` keeps the raw gradient. Parameters
    whose ``grad`` is ``None`` are skipped and their state is untouched. The adaptor keeps
    exactly one buffer per parameter, ``state[p]["explore_buffer"]``; ``state[p]`` also
    shows the base's state of ``p`` (``state[p]["exp_avg"]``: a merged view, see
    :class:`ExploredState`), as ``torch.distributed.checkpoint`` expects of an optimizer.

    Args:
        grad_estimator: how ``g_k`` is obtained (:class:`Autograd`, ``backends.SPSA``, ...).
        base_update: any ``torch.optim.Optimizer`` whose ``step()`` works without a closure.
        alpha: scaling factor α; negative explores (flatter minima), positive exploits.
        beta: persistence factor β of the EMA of gradient differences.
        fused: run the replacement as one compiled pass per large tensor (``torch.compile``;
            the first step compiles for some seconds). ``None`` (default) fuses on CUDA and
            uses foreach ops elsewhere. Over torch's ``SGD``, ``Adam`` and ``AdamW``, fusing
            also runs the base's update in the same kernel, on the base's own state
            (:mod:`adaptor.fastpath`, which lists what falls back to the two-step path).
        telemetry: record, per step and as device tensors (no host sync), ``‖g‖``, ``‖a‖``
            and ``‖α·a‖/‖g‖`` in :attr:`telemetry`. Off by default; free when off.
        state_dtype: dtype of the buffer. ``None`` (default): float32 for bf16/fp16
            parameters, the parameter's dtype otherwise. The replacement computes in the
            buffer's dtype (at least float32) and writes ``g̃`` into ``p.grad`` with one
            rounding. A bf16 buffer is biased (the one-buffer form's fixed point
            ``-(1-β)·EMA(g)`` cannot be tracked in 8 bits): keep the default.
        skip_nonfinite: skip a step whose gradients hold NaN/±Inf (default off, as torch),
            decided on the device: the buffers keep their bits, the base's step is undone
            or skipped (see below) and :attr:`skipped_steps` counts it.

    How a step is skipped (with ``skip_nonfinite=True``, or when GradScaler found an inf):

    * bases that skip on the device (``_step_supports_amp_scaling``: torch's Adam, AdamW,
      SGD and Adagrad with ``fused=True``, this library's optimizers): the base gets
      ``grad_scale=None`` (E already unscaled) and ``found_inf`` = the skip flag around its
      step; no copy, no host read.
    * every other base: E snapshots the parameters and the base's state tensors, runs the
      base, and restores them where the flag is set (``torch.where``; state the skipped
      step created is zeroed, which torch's optimizers treat as fresh). Costs a temporary
      copy of parameters and state per step. State tensors kept on another device than
      the flag (torch's non-fused, non-capturable optimizers keep ``step`` on the CPU for
      CUDA parameters) are restored with the flag copied to that device: one
      device→host copy per step there (none for CPU training; on ``meta`` they are left).
      Python numbers in the base's state cannot be restored.

    GradScaler: the explored optimizer declares ``_step_supports_amp_scaling``: it
    unscales the gradients itself (before the replacement) with the scaler's
    ``grad_scale`` and folds its ``found_inf`` into the skip flag, so ``scaler.step(opt)``
    reads nothing on the host (over bases of the second kind, see the copy above).
    """

    def __init__(
        self,
        grad_estimator: GradEstimator,
        base_update: Optimizer,
        *,
        alpha: float = -5.0,
        beta: float = 0.99,
        fused: bool | None = None,
        telemetry: bool = False,
        state_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        estimator = check_estimator(grad_estimator)
        if not isinstance(base_update, Optimizer):
            raise TypeError(
                "base_update must be a torch.optim.Optimizer instance, got "
                f"{type(base_update).__name__}"
            )
        _check_composable(base_update)
        if _needs_own_closure(base_update):
            raise TypeError(
                f"{type(base_update).__name__} needs a closure inside its own step() to "
                "re-evaluate the loss; the adaptor calls base.step() without one (passing it "
                "on would recompute the gradients and drop α·a), so this base is not supported"
            )
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be True, False or None, got {fused!r}")
        check_alpha_beta(alpha, beta)
        state_dtype = check_state_dtype(state_dtype, "explore")
        skip_nonfinite = check_flag("explore", "skip_nonfinite", skip_nonfinite)
        # Whether the base can skip a step on the device given a found_inf tensor.
        self._base_skips_on_device = bool(
            getattr(base_update, "_step_supports_amp_scaling", False)
        )

        self.base = base_update
        self.state_dtype = state_dtype
        self.skip_nonfinite = skip_nonfinite
        # Read by torch.amp.GradScaler.step: hand us grad_scale/found_inf (no host read).
        self._step_supports_amp_scaling = True
        self.estimator = estimator
        self.fused = fused
        self._telemetry = Telemetry() if telemetry else None
        self._initializing = True
        defaults = {**base_update.defaults, ALPHA_KEY: float(alpha), BETA_KEY: float(beta)}
        # Optimizer.__init__ wires hooks and the step profiler; the param groups it builds
        # are the base's own dicts, read through the property below.
        super().__init__(base_update.param_groups, defaults)
        self._initializing = False

    # -- the state: the adaptor's own, seen merged with the base's --------------------------

    @property  # type: ignore[override]
    def state(self) -> ExploredState:
        """Per parameter, the adaptor's buffer merged with the base's state (a view, see
        :class:`ExploredState`): ``state[p]["explore_buffer"]`` and ``state[p]["exp_avg"]``."""
        return self._state_view

    @state.setter
    def state(self, value: Mapping[Any, Any]) -> None:
        # Optimizer.__init__ assigns defaultdict(dict); the adaptor keeps its own entries
        # there and shows them through the view.
        if isinstance(value, ExploredState):
            value = value._own
        own = value if isinstance(value, defaultdict) else defaultdict(dict, value)
        self.__dict__["_own_state"] = own
        self.__dict__["_state_view"] = ExploredState(own, self.base)

    # -- the base's param groups, shared -------------------------------------------------

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if getattr(self, "_initializing", False):
            return  # Optimizer.__init__ resets the list; ours is the base's.
        self.base.param_groups = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base; it gets the adaptor's α and β unless it names its own."""
        if self._initializing:  # Optimizer.__init__ passes the base's own groups
            index = next(i for i, g in enumerate(self.param_groups) if g is param_group)
            self._set_group_defaults(param_group, f"param group {index}")
        else:
            self._set_group_defaults(param_group, "new param group")
            self.base.add_param_group(param_group)

    def _set_group_defaults(self, group: dict[str, Any], where: str) -> tuple[float, float]:
        """Fill in the adaptor's α and β and check them; ``where`` names the group in errors."""
        _check_not_differentiable(group, where)
        group.setdefault(ALPHA_KEY, self.defaults[ALPHA_KEY])
        group.setdefault(BETA_KEY, self.defaults[BETA_KEY])
        return check_alpha_beta(group[ALPHA_KEY], group[BETA_KEY], where=where)

    # -- stepping ------------------------------------------------------------------------

    def _params_with_grad(self, group: dict[str, Any]) -> Iterator[Tensor]:
        for p in group["params"]:
            if p.grad is not None:
                yield p

    def _check_grads(self) -> None:
        for index, group in enumerate(self.param_groups):
            for p in self._params_with_grad(group):
                if p.grad.is_sparse:
                    raise ValueError(
                        f"explore does not support sparse gradients (param group {index}); "
                        "use a dense gradient or torch.optim.SparseAdam without the adaptor"
                    )

    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """Estimate the gradient, replace it in place, then run ``base.step()``.

        With an estimator that offers ``estimate_deferred`` (SPSA) and the fast path on, the
        estimator's last pass over the fast path's parameters (SPSA's restore and gradient
        write) runs inside the fast path's kernel (:class:`adaptor.estimators.DeferredRestore`).

        ``closure`` is evaluated by the estimator (for :class:`Autograd`: under
        ``enable_grad``, and it must call ``backward``). Returns the estimator's loss.

        An estimator that needs a closure (SPSA) raises ``ValueError`` without one, except
        for the dry step ``torch.distributed.checkpoint`` makes to create the state of an
        optimizer that has none (every ``lr`` 0, zero gradients): that one creates the
        state without calling the estimator (:meth:`_init_state`), so
        ``get/set_optimizer_state_dict`` work on a fresh ``explore(SPSA(...), base)``.
        """
        if closure is None and getattr(self.estimator, "requires_closure", False):
            if self._is_state_init_call():
                return self._init_state()
            raise ValueError(
                f"{type(self.estimator).__name__} needs a closure: pass "
                "step(closure) with a closure that returns the loss"
            )
        # Everything that can fail is checked before anything is modified.
        hparams = [
            self._set_group_defaults(group, f"param group {i}")
            for i, group in enumerate(self.param_groups)
        ]
        pending = None
        if self._may_defer():
            loss, pending = self.estimator.estimate_deferred(closure, self.param_groups)
        else:
            loss = self.estimator.estimate(closure, self.param_groups)
        try:
            self._update(hparams, pending)
        finally:
            if pending is not None:  # on an error: no parameter is left perturbed
                pending.finish()
        return loss

    def _may_defer(self) -> bool:
        """Whether the estimator may leave its last pass to the fast path
        (:class:`adaptor.estimators.DeferredRestore`): only when nothing reads the
        gradients before the fast path's kernels (no non-finite check, no GradScaler, no
        telemetry), outside a torch.compile trace, and when ``estimate_deferred`` comes
        from the class that defines ``estimate`` (a subclass that overrides ``estimate``
        alone must have it called)."""
        mro = type(self.estimator).__mro__
        defines_estimate = next((c for c in mro if "estimate" in c.__dict__), None)
        defines_deferred = next((c for c in mro if "estimate_deferred" in c.__dict__), None)
        return (
            defines_deferred is not None
            and defines_deferred is defines_estimate
            and self._fast_path_on()
            and not self.skip_nonfinite
            and getattr(self, "grad_scale", None) is None
            and getattr(self, "found_inf", None) is None
            and not torch.compiler.is_compiling()
        )

    def _fast_path_on(self) -> bool:
        """Whether :mod:`adaptor.fastpath` may take parameters: never with telemetry or
        ``fused=False`` (its own eligibility rules then apply per parameter)."""
        return (
            self._telemetry is None
            and self.fused is not False
            and getattr(self, "_fast_path", True)  # off only for benchmarks
        )

    def _update(self, hparams: list[tuple[float, float]], pending: Any) -> None:
        """Steps 2 and 3 (replacement, base update) once the gradients are estimated;
        ``pending``: the estimator's deferred last pass, or None."""
        self._check_grads()
        groups = self.param_groups
        if groups and ESTIMATOR_KEY in groups[0]:
            del groups[0][ESTIMATOR_KEY]  # left by the dry step (_init_state) for a load
        grads = [p.grad for group in self.param_groups for p in self._params_with_grad(group)]
        with torch.no_grad():
            # Unscales for GradScaler; the flag (1.0 = skip) is None when nothing can skip.
            skip = prepare_sharded_step(self, grads, skip_nonfinite=self.skip_nonfinite)
            # Parameters the fast path takes (replacement + torch's SGD/Adam update in one
            # kernel, see adaptor.fastpath; the skip flag masks its writes); never with
            # telemetry.
            fast = fastpath.plan(self, hparams, BUFFER_KEY, skip) if self._fast_path_on() else []
            exclude = {id(p) for *_, params in fast for p in params}
            if pending is not None:  # what the fast path does not take is finished now
                pending.finish(keep=exclude)
            self._replace(hparams, skip, exclude)
            if skip is not None:
                self._count_skips(skip)
            if fast:
                fastpath.run(self, fast, BUFFER_KEY, skip, pending)
        with self._grads_hidden(exclude):
            if skip is None:
                self._step_base()
            elif self._base_skips_on_device:
                self._step_base_skipping(skip)
            else:
                self._step_base_restoring(skip)

    def _is_state_init_call(self) -> bool:
        """Whether a closure-less ``step()`` is the dry step that creates empty state.

        ``torch.distributed.checkpoint.state_dict`` (``_init_optim_state``, run by
        ``get_optimizer_state_dict`` and ``set_optimizer_state_dict``) steps an optimizer
        that has no state once, with zero gradients on every trainable parameter, every
        group's ``lr`` set to 0 and ``closure=None``, so that the state exists to load
        into. Recognised by exactly that: no state (neither the adaptor's nor the base's),
        a gradient on every parameter that requires one, and ``lr == 0`` in every group (a
        number, or a CPU tensor as torch makes it). Host-side checks only: no device read.
        """
        if self.state:
            return False
        for group in self.param_groups:
            lr = group.get("lr")
            if isinstance(lr, Tensor):
                if lr.device.type != "cpu" or lr.numel() != 1 or lr.item() != 0:
                    return False
            elif not isinstance(lr, (int, float)) or lr != 0:
                return False
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    return False
        return True

    def _init_state(self) -> None:
        """The dry step without the estimator (see :meth:`_is_state_init_call`).

        The estimator is not called (no closure to evaluate; SPSA neither perturbs the
        parameters nor advances its step); the zero gradients torch set go through the
        replacement (``c = 0``: ``c ← ((β+αs)·0 − s²·0)/(1+αs) = 0``, ``g̃ = 0``) and the
        base's step with ``lr = 0``, which creates the base's state as torch assumes of any
        optimizer. The estimator's state is put in the first live group under
        ``explore_estimator``: torch's flattened load (``flatten_optimizer_state_dict``)
        rebuilds the groups from the live groups' keys, and this is how SPSA's seed and
        step come back; the load takes the key out again.
        """
        estimator_state = self.estimator.state_dict()
        if estimator_state and self.param_groups:
            self.param_groups[0][ESTIMATOR_KEY] = dict(estimator_state)
        hparams = [
            self._set_group_defaults(group, f"param group {i}")
            for i, group in enumerate(self.param_groups)
        ]
        with torch.no_grad():
            self._replace(hparams)
        self._step_base()

    @contextlib.contextmanager
    def _grads_hidden(self, exclude: set[int]) -> Iterator[None]:
        """Around the base's step: the parameters the fast path took are hidden from it.

        Their gradients are set to ``None`` (so the base skips them and leaves their state
        alone) and put back afterwards (the raw gradients: the fast path writes no ``g̃``).
        """
        hidden = [
            (p, p.grad) for group in self.param_groups for p in group["params"]
            if id(p) in exclude
        ]
        for p, _ in hidden:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in hidden:
                p.grad = grad

    def _step_base_skipping(self, skip: Tensor) -> None:
        """A base with ``_step_supports_amp_scaling`` skips on the device itself."""
        # The base skips on the device: the gradients are already unscaled, found_inf is
        # the flag. Its own attributes (if any) are put back afterwards.
        base = self.base
        saved = {name: base.__dict__[name] for name in _AMP_ATTRIBUTES if name in base.__dict__}
        base.grad_scale, base.found_inf = None, skip
        try:
            self._step_base()
        finally:
            for name in _AMP_ATTRIBUTES:
                base.__dict__.pop(name, None)
            base.__dict__.update(saved)

    @torch.no_grad()
    def _step_base_restoring(self, skip: Tensor) -> None:
        """Run any base, then put back its parameters and state where ``skip`` is 1.

        ``θ ← where(skip, θ_before, θ)`` for the parameters with a gradient and every
        tensor of their base state, matched by key (a base may rebind a state tensor);
        state the step created is zeroed where skipped. See the class docstring for the
        cost and for state kept on another device.
        """
        base = self.base
        meta = skip.device.type == "meta"
        keeps: dict[torch.device, Tensor] = {}

        def keep_on(device: torch.device) -> Tensor:
            keep = keeps.get(device)
            if keep is None:
                keep = keeps[device] = skip.to(device, non_blocking=True) > 0
            return keep

        def restorable(t: Tensor) -> bool:
            return not meta or t.device.type == "meta"  # no data to restore off meta

        before = []
        for group in self.param_groups:
            for p in self._params_with_grad(group):
                entry = base.state.get(p)
                entry = entry if isinstance(entry, dict) else {}
                saved = {
                    k: v.clone()
                    for k, v in entry.items()
                    if isinstance(v, Tensor) and restorable(v)
                }
                before.append((p, p.detach().clone(), saved, set(entry)))
        self._step_base()
        for p, saved_p, saved, existed in before:
            p.copy_(torch.where(keep_on(p.device), saved_p, p))
            entry = base.state.get(p)
            if not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                if not isinstance(value, Tensor) or not restorable(value):
                    continue
                keep = keep_on(value.device)
                old = saved.get(key)
                if old is not None and old.shape == value.shape:
                    value.copy_(torch.where(keep, old.to(value.dtype), value))
                elif key not in existed:
                    value.copy_(torch.where(keep, torch.zeros_like(value), value))

    def _count_skips(self, skip: Tensor) -> None:
        """``state[p]["nonfinite_skips"] += skip`` for every parameter with a gradient."""
        counters: dict[torch.device, list[Tensor]] = {}
        for group in self.param_groups:
            for p in self._params_with_grad(group):
                state = self._own_state[p]
                counter = state.get(SKIPS_KEY)
                if counter is None:
                    counter = state[SKIPS_KEY] = torch.zeros(
                        (), dtype=torch.float32, device=p.device
                    )
                counters.setdefault(counter.device, []).append(counter)
        for device, bucket in counters.items():
            # The list overload: the 0-d-tensor overload reads the scalar on the host.
            flag = skip.to(device, non_blocking=True)
            torch._foreach_add_(bucket, [flag] * len(bucket))

    @property
    def skipped_steps(self) -> Tensor | None:
        """Steps skipped for non-finite gradients (a 0-d float32 device tensor), or ``None``
        before any step could skip (no ``skip_nonfinite``, no GradScaler)."""
        return skip_count(self)

    def _step_base(self) -> None:
        """``base.step()`` without a second round of torch's *global* optimizer hooks.

        ``torch.optim.optimizer.register_optimizer_step_pre_hook``/``_post_hook`` hooks
        already fired for this (user-visible) step around :meth:`step`; the base's class
        ``step`` is wrapped by torch with the same hooks, so the base's unwrapped ``step`` is
        called instead. Hooks registered on the *base instance*
        (``base.register_step_pre_hook``) still run, around the base's update, with the base
        as their optimizer: its pre-hooks see ``g̃`` in ``p.grad``. A per-instance ``step``
        the user patched onto the base is called as it is (global hooks then fire twice).
        """
        base = self.base
        patched = base.__dict__.get("step")
        if patched is not None:
            if not getattr(patched, "_wrapped_by_lr_sched", False):
                base.step()
                return
            base._opt_called = True  # what the scheduler's wrapper records, then bypassed
        class_step = type(base).step
        raw = getattr(class_step, "__wrapped__", None)
        if raw is None or not getattr(class_step, "hooked", False):
            base.step()  # not wrapped by torch's profile_hook_step: no global hooks inside
            return
        args: tuple[Any, ...] = (base,)
        kwargs: dict[str, Any] = {}
        for pre_hook in getattr(base, "_optimizer_step_pre_hooks", {}).values():
            result = pre_hook(base, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"{type(base).__name__} step pre-hook must return None or a tuple "
                        f"(new_args, new_kwargs), got {result!r}"
                    )
                args, kwargs = result
        if torch.compiler.is_compiling():  # dynamo ignores (and warns about) the profiler
            raw(*args, **kwargs)
        else:
            with torch.autograd.profiler.record_function(
                f"Optimizer.step#{type(base).__name__}.step"
            ):
                raw(*args, **kwargs)
        base._optimizer_step_code()
        for post_hook in getattr(base, "_optimizer_step_post_hooks", {}).values():
            post_hook(base, args, kwargs)

    def _replace(
        self,
        hparams: list[tuple[float, float]],
        skip: Tensor | None = None,
        exclude: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        telemetry = self._telemetry
        if telemetry is not None:
            telemetry.begin()
        for group, (alpha, beta) in zip(self.param_groups, hparams):
            # Buckets of one device, gradient dtype and buffer dtype. Grouped here rather than
            # with Optimizer._group_tensors_by_device_and_dtype, which returns the key
            # (None, None) and unsorted lists under torch.compile.
            buckets: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
            for p in self._params_with_grad(group):
                if id(p) in exclude:  # the fast path replaces it inside its kernel
                    continue
                state = self._own_state[p]
                buffer = state.get(BUFFER_KEY)
                if buffer is None:
                    # c_1 = 0 (g_0 = a_0 = 0): allocated once, on the parameter's device.
                    buffer = state[BUFFER_KEY] = torch.zeros_like(
                        p, dtype=self._buffer_dtype(p), memory_format=torch.preserve_format
                    )
                # FSDP2: the replacement is element-wise, so it runs on the local shards
                # (shared storage; no DTensor dispatch, and ops such as _foreach_copy_ that
                # have no DTensor sharding rule are fine).
                grad, buffer = local(p.grad), local(buffer)
                key = (grad.device, grad.dtype, buffer.dtype)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = ([], [])
                bucket[0].append(grad)
                bucket[1].append(buffer)
            for (device, _, _), (bucket_grads, bucket_buffers) in buckets.items():
                if telemetry is not None:
                    telemetry.observe(bucket_grads, bucket_buffers, alpha, beta)
                fused = self.fused if self.fused is not None else device.type == "cuda"
                if fused and fused_supported(device):
                    replace_fused_(bucket_grads, bucket_buffers, alpha, beta, skip)
                else:
                    replace_foreach_(bucket_grads, bucket_buffers, alpha, beta, skip)
        if telemetry is not None:
            telemetry.end()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as the base does (``set_to_none`` as in torch)."""
        self.base.zero_grad(set_to_none=set_to_none)

    @property
    def telemetry(self) -> dict[str, Tensor] | None:
        """``{"grad_norm", "accel_norm", "ratio"}`` of the last step, or ``None`` when off.

        ``grad_norm`` = ‖g_k‖, ``accel_norm`` = ‖a_k‖, ``ratio`` = ‖α·a_k‖/‖g_k‖ (= |α|·‖a‖/‖g‖
        when all groups share α), each a 0-d tensor on the parameters' device.
        """
        return None if self._telemetry is None else self._telemetry.last

    # -- checkpoints ---------------------------------------------------------------------

    def _indexed_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base's state dict (torch's layout) with each parameter's ``explore_buffer``.

        The estimator's state (e.g. SPSA's random state) goes under ``explore_estimator``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base.state_dict()
        packed = dict(state_dict["state"])
        index_of: dict[int, int] = {}
        for index, p in enumerate(self._indexed_params()):
            index_of.setdefault(id(p), index)
        # Everything in the adaptor's own state travels, as torch's state_dict() does: the
        # buffers and skip counters, and whatever a pre-hook put there (any key, any value).
        for key, value in self._own_state.items():
            if isinstance(key, Tensor):
                index = index_of.get(id(key))
                if index is None:
                    continue  # a tensor that is no longer optimised
                # A new dict: the base's entries are its live state objects.
                packed[index] = {**packed.get(index, {}), **value}
            else:
                packed[key] = value
        state_dict["state"] = packed
        estimator_state = self.estimator.state_dict()
        if estimator_state:
            state_dict[ESTIMATOR_KEY] = estimator_state
            # A copy in the first group too: torch.distributed.checkpoint keeps only "state"
            # and "param_groups" (and "state" may only name parameters), so this is how the
            # estimator's state (SPSA's seed and step, integers) travels through DCP.
            if state_dict["param_groups"]:
                first = dict(state_dict["param_groups"][0])
                first[ESTIMATOR_KEY] = dict(estimator_state)
                state_dict["param_groups"] = [first, *state_dict["param_groups"][1:]]
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hooked = post_hook(self, state_dict)
            if hooked is not None:
                state_dict = hooked
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` produced (a plain base state dict also loads).

        As torch's ``Optimizer.load_state_dict``, the saved groups' ``params`` lists are
        matched to the current parameters in order, so ``state`` may be keyed by integer
        index or by any other id the saved groups use (e.g. parameter names, as
        ``torch.distributed.checkpoint`` writes them). Keys that name no parameter and
        non-dict values are kept as they are.

        Everything is checked before anything is loaded; a bad state dict raises
        ``ValueError`` naming the parameter index, the key and the shapes, and leaves the
        optimizer (base state, buffers, groups, estimator) exactly as it was. The base's
        part is checked against the state the base itself creates: one dry-run step of an
        empty copy of the base on ``meta`` tensors (no data, no compute) gives the keys and
        shapes it keeps for each parameter (skipped for bases that cannot step on ``meta``).
        A state dict without the base's part (E's buffers only) or without the buffers (a
        plain base state dict: the buffers restart from ``c_1 = 0``) loads.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"state_dict must be a dict with 'state' and 'param_groups', got "
                f"{type(state_dict).__name__}"
            )
        state_dict = dict(state_dict)  # shallow copy, as torch's (the hooks may edit it)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            if hooked is not None:
                state_dict = hooked
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        params = self._indexed_params()
        saved_groups = state_dict["param_groups"]
        index_of_id = self._match_saved_groups(saved_groups, params)

        base_state: dict[Any, Any] = {}
        own_state: dict[int, dict[str, Tensor]] = {}
        unowned: dict[Any, Any] = {}
        expected = None
        for key, entry in state_dict["state"].items():
            index = index_of_id.get(key) if _hashable(key) else None
            if index is None:
                if isinstance(entry, dict) and (
                    isinstance(key, int) or any(k in entry for k in _OWN_KEYS)
                ):
                    raise ValueError(
                        f"state_dict has state for parameter index {key!r} (keys "
                        f"{sorted(map(str, entry))}), but the saved param groups name no such "
                        f"parameter (the optimizer has {len(params)} parameters)"
                    )
                # As torch: state that names no parameter is kept as it is, in the adaptor's
                # own state (hooks on the explored optimizer wrote it there).
                unowned[key] = entry
                continue
            if not isinstance(entry, dict):
                raise ValueError(
                    f"state_dict state of parameter {index} must be a dict, got "
                    f"{type(entry).__name__}"
                )
            p = params[index]
            entry = dict(entry)
            own = {k: entry.pop(k) for k in _OWN_KEYS if k in entry}
            _check_own_state(index, p, own)
            if own:
                own_state[index] = own
            if entry:
                if expected is None:
                    expected = self._expected_base_state(params, saved_groups)
                if expected is not False:
                    _check_base_entry(index, type(self.base).__name__, entry, expected[index])
                # A copy: torch's load keeps uncast tensors as they are, so the optimizer
                # would share them with the dict (and with any optimizer loaded from it).
                base_state[index] = copy.deepcopy(entry)
        for index, group in enumerate(saved_groups):
            check_alpha_beta(
                group.get(ALPHA_KEY, self.defaults[ALPHA_KEY]),
                group.get(BETA_KEY, self.defaults[BETA_KEY]),
                where=f"state_dict param group {index}",
            )
            _check_not_differentiable(group, f"state_dict param group {index}")
        estimator_state = state_dict.get(ESTIMATOR_KEY)
        if estimator_state is None:  # through DCP: the copy in the first group
            estimator_state = saved_groups[0].get(ESTIMATOR_KEY, {}) if saved_groups else {}
        if not estimator_state and own_state and self.estimator.state_dict():
            # An explored optimizer's state dict (it has the buffers) without the estimator's
            # state, which E's state_dict() always writes: torch's flattened load into an
            # optimizer that already had state rebuilds the groups from the live groups'
            # keys and leaves it out (a fresh optimizer gets it, see _init_state).
            warnings.warn(
                f"the state dict has the adaptor's buffers but no state for the estimator "
                f"{type(self.estimator).__name__} (torch.distributed.checkpoint's "
                "flatten_optimizer_state_dict=True drops it when loading into an optimizer "
                "that already has state: load into a fresh optimizer, or save "
                "optimizer.estimator.state_dict() beside it); the estimator keeps its "
                "current state",
                UserWarning,
                stacklevel=2,
            )
        # The base sees integer indices whatever ids the saved groups use, and not the
        # estimator's copy (it would stay in the live groups).
        base_groups, start = [], 0
        for group in saved_groups:
            count = len(group["params"])
            clean = {k: v for k, v in group.items() if k != ESTIMATOR_KEY}
            base_groups.append({**clean, "params": list(range(start, start + count))})
            start += count

        # The estimator checks its state as it loads: load it first, and put it back if
        # the base then refuses its part, so that nothing is half-loaded.
        previous_estimator_state = self.estimator.state_dict()
        self.estimator.load_state_dict(estimator_state)
        try:
            self.base.load_state_dict(
                {**state_dict, "state": base_state, "param_groups": base_groups}
            )
        except Exception:
            self.estimator.load_state_dict(previous_estimator_state)
            raise
        for index, group in enumerate(self.param_groups):  # a base-only state dict: no α/β
            group.pop(ESTIMATOR_KEY, None)  # the dry step's copy (_init_state), if any
            self._set_group_defaults(group, f"param group {index}")
        # The adaptor's state is replaced, never merged: a plain base state dict restarts
        # every buffer from c_1 = 0 (a buffer kept from before would not match the base).
        live = self._own_state
        live.clear()
        live.update(unowned)
        for index, own in own_state.items():
            p = params[index]
            for key, value in own.items():
                dtype = self._buffer_dtype(p) if key == BUFFER_KEY else value.dtype
                live[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _buffer_dtype(self, p: Tensor) -> torch.dtype:
        return resolve_state_dtype(p.dtype, self.state_dtype)

    def _match_saved_groups(
        self, saved_groups: object, params: list[Tensor]
    ) -> dict[Any, int]:
        """Check the saved groups against the optimizer's; map each saved id to an index."""
        groups = self.param_groups
        if not isinstance(saved_groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups
        ):
            raise ValueError("state_dict['param_groups'] must be a list of dicts with 'params'")
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                f"{len(groups)}"
            )
        for index, (saved, group) in enumerate(zip(saved_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict param group {index} has {len(saved['params'])} parameters, "
                    f"the optimizer's has {len(group['params'])} (a different model?): the "
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group"
                )
        ids = [i for g in saved_groups for i in g["params"]]
        if not all(_hashable(i) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("state_dict param groups must list distinct, hashable parameter ids")
        return {saved_id: index for index, saved_id in enumerate(ids)}

    def _expected_base_state(
        self, params: list[Tensor], saved_groups: list[dict[str, Any]]
    ) -> list[dict[str, Any]] | bool:
        """Per parameter index, ``{key: shape or None}`` of the state the base creates.

        One step of an empty shallow copy of the base on ``meta`` tensors, with the saved
        groups' settings (they decide e.g. Adam's ``amsgrad`` buffer). ``False`` when the
        base cannot step there (it reads values on the host, or needs a real device): then
        only the adaptor's own part is checked.
        """
        base = self.base
        metas = {id(p): torch.empty_like(p, device="meta") for p in params}
        for meta in metas.values():
            meta.grad = torch.zeros_like(meta)
        clone = type(base).__new__(type(base))
        skip = {"state", "param_groups", "step", *_HOOK_DICTS}
        # Containers are copied so that the dry run cannot add to the base's own.
        clone.__dict__.update(
            {
                k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                for k, v in base.__dict__.items()
                if k not in skip
            }
        )
        for name in _HOOK_DICTS:
            clone.__dict__[name] = OrderedDict()
        clone.__dict__["state"] = defaultdict(dict)
        clone.param_groups = [
            {
                **group,
                **{k: v for k, v in saved.items() if k != "params"},
                **({"fused": False} if group.get("fused") else {}),  # no fused kernels on meta
                "params": [metas[id(p)] for p in group["params"]],
            }
            for group, saved in zip(base.param_groups, saved_groups)
        ]
        class_step = type(base).step
        raw = class_step.__wrapped__ if getattr(class_step, "hooked", False) else class_step
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw(clone)
        except Exception:
            return False
        expected = []
        for p in params:
            entry = clone.state.get(metas[id(p)], {})
            expected.append(
                {k: tuple(v.shape) if isinstance(v, Tensor) else None for k, v in entry.items()}
            )
        return expected

    # What travels in copy.deepcopy and pickle: as torch's Optimizer, the defaults and the
    # state (the param groups are the base's, which carries its own), plus the adaptor's
    # base, estimator and configuration. Per-instance step wrappers (an LR scheduler's) and
    # hook dicts stay behind: they close over the original optimizer.
    _PICKLED = (
        "defaults",
        "state",
        "base",
        "estimator",
        "fused",
        "_telemetry",
        "state_dtype",
        "skip_nonfinite",
        "_step_supports_amp_scaling",
        "_base_skips_on_device",
    )

    def __getstate__(self) -> dict[str, Any]:
        # "state" is the adaptor's own entries (a defaultdict, as before the merged view):
        # the view is rebuilt over the copied base.
        state = {name: self.__dict__[name] for name in self._PICKLED if name in self.__dict__}
        state["state"] = self._own_state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled/copied optimizer; hooks start empty, as torch's Optimizer does."""
        state = dict(state)
        state.pop("param_groups", None)  # the base's (a property here)
        own = state.pop("state", None)
        self.__dict__.update(state)
        self.state = own if own is not None else defaultdict(dict)
        self._initializing = False
        for name in _HOOK_DICTS:
            self.__dict__.setdefault(name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{g.get(ALPHA_KEY)}/{g.get(BETA_KEY)}" for g in self.param_groups
        )
        return (
            f"{type(self).__name__}(estimator={self.estimator!r}, "
            f"alpha/beta per group=[{groups}], base={self.base!r})"
        )


def explore(
    grad_estimator: GradEstimator,
    base_update: Optimizer,
    *,
    alpha: float = -5.0,
    beta: float = 0.99,
    fused: bool | None = None,
    telemetry: bool = False,
    state_dtype: torch.dtype | None = None,
    skip_nonfinite: bool = False,
) -> ExploredOptimizer:
    """Adapt ``base_update`` with the exploration adaptor E and the given gradient estimator.

    ``g̃_k = g_k + α·a_k`` with ``a_k = β·a_{k-1} + (1-β)·(g_k - g_{k-1})`` is fed to the
    unchanged ``base_update.step()``. See :class:`ExploredOptimizer` for the arguments.
    """
    return ExploredOptimizer(
        grad_estimator,
        base_update,
        alpha=alpha,
        beta=beta,
        fused=fused,
        telemetry=telemetry,
        state_dtype=state_dtype,
        skip_nonfinite=skip_nonfinite,
    )


def E(
    base_update: Optimizer,
    alpha: float = -5.0,
    beta: float = 0.99,
    *,
    fused: bool | None = None,
    telemetry: bool = False,
    state_dtype: torch.dtype | None = None,
    skip_nonfinite: bool = False,
) -> ExploredOptimizer:
    """``explore(Autograd(), base_update, ...)``: the paper's E for a backprop optimizer."""
    return explore(
        Autograd(),
        base_update,
        alpha=alpha,
        beta=beta,
        fused=fused,
        telemetry=telemetry,
        state_dtype=state_dtype,
        skip_nonfinite=skip_nonfinite,
    )
