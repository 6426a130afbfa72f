"""Checkpoints of a metaste optimizer wrapper (docs/design.md §5): ``state_dict()`` is the base
optimizer's own plus ``"metaste"``, the wrapper's state (step counters, history, schedules,
hyper-optimizer state) with its kind, its base optimizer and the settings that define the
trajectory; ``load_state_dict`` validates all of it before anything is loaded and rolls back a
load that fails. The mixin :class:`WrapperCheckpoint` is part of
:class:`~metaste.optim.core.wrapper.OptimizerWrapper`.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["WrapperCheckpoint"]


class WrapperCheckpoint:
    """``state_dict`` / ``load_state_dict`` of a wrapper over ``self.optimizer``; a wrapper adds
    its own state with :meth:`_wrapper_state_dict` / :meth:`_load_wrapper_state_dict` and its
    trajectory-defining constructor arguments in :attr:`SETTINGS`."""

    optimizer: Optimizer

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` (which holds the per-parameter wrapper state)
        plus ``"metaste"``: the wrapper's own state. The first param group holds the same object
        under ``"metaste"`` (``torch.save`` stores it once): ``torch.distributed.checkpoint``'s
        ``get_state_dict`` / ``set_state_dict`` keep only ``state`` and ``param_groups``."""
        sd = self.optimizer.state_dict()
        own = {**self._wrapper_identity(), **self._settings(), **self._wrapper_state_dict()}
        sd["metaste"] = own
        if sd["param_groups"]:
            sd["param_groups"] = [{**sd["param_groups"][0], "metaste": own}, *sd["param_groups"][1:]]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of the same kind of wrapper. The whole dict is validated first
        (wrapper kind, base optimizer, the settings that define the trajectory — a mismatch with
        the constructor raises ``ValueError`` naming each one, :meth:`_check_wrapper_state_dict`);
        a load that fails changes nothing."""
        sd = dict(state_dict)
        wrapper_sd = sd.pop("metaste", None)
        if isinstance(sd.get("param_groups"), list):  # the copy in the first group (DCP keeps only it)
            groups = [dict(g) if isinstance(g, dict) else g for g in sd["param_groups"]]
            in_group = [g.pop("metaste", None) for g in groups if isinstance(g, dict)]
            sd["param_groups"] = groups
            if wrapper_sd is None and in_group:
                wrapper_sd = in_group[0]
        if wrapper_sd is None:
            raise ValueError(
                f"state_dict has no 'metaste' entry: it was not saved by {type(self).__name__}; "
                "load a bare optimizer's state with wrapper.optimizer.load_state_dict(...)"
            )
        self._check_wrapper_state_dict(wrapper_sd)
        old_state, old_groups = self.optimizer.state, self.optimizer.param_groups
        try:
            old_wrapper: dict[str, Any] | None = self._wrapper_state_dict()
        except Exception:  # a method that has not stepped yet may not have all its state
            old_wrapper = None
        try:
            # torch builds new state and group objects: the old ones stay intact for a roll-back
            self.optimizer.load_state_dict(sd)
            self.state = self.optimizer.state  # rebound by load_state_dict: share it again
            self.param_groups = self.optimizer.param_groups
            self._load_wrapper_state_dict(wrapper_sd)
        except BaseException:
            self.optimizer.state, self.optimizer.param_groups = old_state, old_groups
            self.state, self.param_groups = old_state, old_groups
            if old_wrapper is not None:
                self._load_wrapper_state_dict(old_wrapper)
            raise

    def _wrapper_state_dict(self) -> dict[str, Any]:
        return {}

    def _load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        pass

    SETTINGS: tuple[str, ...] = ()  # the attributes that define the trajectory

    def _settings(self) -> dict[str, Any]:
        """The constructor settings a checkpoint must match (saved in ``state_dict()["metaste"]``)."""
        return {k: getattr(self, k) for k in self.SETTINGS}

    def _wrapper_identity(self) -> dict[str, Any]:
        """What ``state_dict()["metaste"]`` records about the wrapper kind and base optimizer."""
        return {"wrapper": type(self).__name__, "optimizer": type(self.optimizer).__name__}

    def _check_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (before anything is loaded) if ``state`` was saved by another kind
        of wrapper or over another base optimizer. Subclasses add their settings."""
        who = type(self).__name__
        if not isinstance(state, dict):
            raise ValueError(
                f"state_dict['metaste'] must be a dict saved by {who}, got {type(state).__name__}"
            )
        kind = state.get("wrapper") or (
            "HyperSTE" if "method_name" in state else "FOGZO" if "seed" in state else None
        )
        if kind != who:
            raise ValueError(
                f"this state_dict was saved by {kind or 'an unknown wrapper'}, not by {who}: a wrapper "
                f"loads only its own kind's state_dict; build a {kind or 'matching wrapper'} to resume it, "
                f"or load just the base optimizer's state with {who}.optimizer.load_state_dict(sd) "
                "after removing sd['metaste']"
            )
        base = state.get("optimizer")
        if base is not None and base != type(self.optimizer).__name__:
            raise ValueError(
                f"this state_dict was saved over torch.optim.{base}; this {who} wraps "
                f"{type(self.optimizer).__name__}"
            )
        self._check_settings(who, state, self._settings())

    @staticmethod
    def _check_settings(who: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming every setting whose saved value differs from the
        constructor's (the checkpoint's trajectory cannot be continued with other settings)."""
        diff = [
            f"{k}={saved[k]!r} (constructor: {now[k]!r})" for k in now if k in saved and saved[k] != now[k]
        ]
        if diff:
            raise ValueError(
                f"this state_dict was saved by a {who} with other settings: {', '.join(diff)}. The "
                f"constructor's settings are kept and must match the checkpoint's: build the {who} "
                "with the saved values to resume it (docs/design.md §5)"
            )
