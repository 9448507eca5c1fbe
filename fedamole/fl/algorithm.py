"""`Algorithm`: what a federated algorithm gives the simulation (the server side), and its state for checkpoints."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedamole.config import MoLEConfig
from fedamole.fl.protocol import ClientResult, ClientTask

__all__ = ["Algorithm", "check_keys", "extra_state"]


class Algorithm:
    """What the runner needs from an algorithm.

    ``mole_config(base)`` -> the layer configuration the clients' model uses; ``setup(model, num_train, seed)``
    once; then per round ``payloads(round)`` -> one `ClientTask` per client, ``aggregate(round, uploads)`` with one
    accepted `ClientResult` (or None) per client, and when ``evaluates_global`` is True, ``eval_payloads()`` ->
    tasks that only evaluate the aggregated model on each client's test set.

    The server's state is the attributes named in ``STATE`` (those that `aggregate` changes; the constructor's
    settings and what `setup` derives from the data are not state: a resumed run rebuilds them from its
    configuration). `state_dict` / `load_state_dict` save and restore it.
    """

    name = "algorithm"
    evaluates_global = False
    STATE: tuple[str, ...] = ()

    def mole_config(self, base: MoLEConfig) -> MoLEConfig:
        raise NotImplementedError

    def setup(self, model, num_train: list[int], seed: int) -> None:
        raise NotImplementedError

    def payloads(self, round_idx: int) -> list[ClientTask]:
        raise NotImplementedError

    def aggregate(self, round_idx: int, uploads: list[ClientResult | None]) -> None:
        raise NotImplementedError

    def eval_payloads(self) -> list[ClientTask]:
        raise NotImplementedError

    def check_state(self) -> None:
        """Raise ValueError, naming the attribute, if the state (restored from a checkpoint) breaks an invariant that
        its shapes alone do not show."""

    def state_dict(self) -> dict:
        """The server's state: ``{attribute: value}`` for every name in ``STATE`` (references, not copies, as
        torch's ``state_dict``: a checkpoint writer copies them)."""
        return {key: getattr(self, key) for key in self.STATE}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a `state_dict` into an algorithm that is set up (`setup`) like the one that saved it.

        All or nothing: the keys must be exactly ``STATE`` (ValueError naming the missing and unexpected ones), and
        when the restored state fails `check_state` the previous state is put back before the error propagates.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise ValueError(f"{where}: state must be a mapping of {list(self.STATE)}, got {type(state).__name__}")
        missing = sorted(set(self.STATE) - set(state))
        unexpected = sorted(set(state) - set(self.STATE), key=str)
        if missing or unexpected:
            raise ValueError(
                f"{where}: state must hold exactly {list(self.STATE)}; missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        previous = {key: getattr(self, key) for key in self.STATE}
        for key in self.STATE:
            setattr(self, key, state[key])
        try:
            self.check_state()
        except Exception:
            for key, value in previous.items():
                setattr(self, key, value)
            raise


def check_keys(where: str, state, expected, subset: bool = False) -> None:
    """Raise ValueError naming `where` unless `state` is a dict whose keys are exactly `expected` (with `subset`: a
    subset of them)."""
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a mapping, got {type(state).__name__}")
    expected = set(expected)
    unexpected = sorted(set(state) - expected, key=str)
    missing = [] if subset else sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(f"{where}: unexpected keys {unexpected[:4]}, missing keys {missing[:4]}")


def extra_state(model) -> dict[str, Tensor]:
    """Initial values of the extra trainable modules (the classification head), float32 CPU copies."""
    params = dict(model.named_parameters())
    out = {}
    for name in getattr(model, "fedamole_extra_trainable", []):
        for key, _ in model.get_submodule(name).named_parameters():
            out[f"{name}.{key}"] = params[f"{name}.{key}"].detach().float().cpu().clone()
    return out
