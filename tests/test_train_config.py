"""`torchrun -m hscr_fast.train`'s flags (TrainConfig parsed by HfArgumentParser) and the training objective built
once from them."""
import dataclasses
import typing

import pytest

from hscr_fast import HscrError
from hscr_fast.training.config import TrainConfig
from hscr_fast.training.objective import Objective


def _other_value(name: str, kind, default):
    """A value of the field's type that differs from its default, as the command line would give it."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, __import__("types").UnionType):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return (default or 0.0) + 0.25
    if typing.get_origin(kind) is list:
        return ["image-dispreference=0.1"]
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    choices = field.metadata.get("choices")
    return next(choice for choice in choices if choice != default) if choices else f"some-{name}"


def _flags(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + name.replace("_", "-")] if name in ("explicit", "implicit") else [flag, "false"]
    if isinstance(value, list):
        return [flag, *value]
    return [flag, str(value)]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_flag_parses_to_its_annotated_type(field):
    hints = typing.get_type_hints(TrainConfig)
    default = getattr(TrainConfig(), field)
    value = _other_value(field, hints[field], default)
    config = TrainConfig.from_args(_flags(field, value))
    parsed = getattr(config, field)
    assert parsed == value and type(parsed) is type(value), (field, parsed, value)
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig) if f.name != field} == \
        {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig) if f.name != field}


def test_no_flags_is_the_default_config_and_kind_weight_repeats():
    assert TrainConfig.from_args([]) == TrainConfig()
    config = TrainConfig.from_args(["--kind-weight", "a=1", "b=2", "--kind-weight", "c=0.5"])
    assert config.kind_weight == ["a=1", "b=2", "c=0.5"]
    assert Objective.from_config(config).kind_weights == (("a", 1.0), ("b", 2.0), ("c", 0.5))


def test_the_objective_carries_only_the_loss_settings_and_the_run_identity_keys_are_unchanged():
    config = TrainConfig(loss="dpo", gamma=0.2, explicit=False, token_kl_weight=0.01, token_kl_scope="marked",
                         kind_weight=["image-dispreference=0.1"], learning_rate=1.0)
    objective = Objective.from_config(config)
    assert objective == Objective(loss="dpo", gamma=0.2, explicit=False, implicit=True, token_kl_weight=0.01,
                                  token_kl_lambda=0.5, token_kl_scope="marked",
                                  kind_weights=(("image-dispreference", 0.1),))
    assert objective.kind_weight("image-dispreference") == 0.1 and objective.kind_weight(None) == 1.0
    # Checkpoints written before the objective existed recorded these keys and values (the MLPO terms came later and
    # default to both on for those checkpoints: loop.RUN_IDENTITY_DEFAULTS).
    assert objective.run_identity() == {"loss": "dpo", "explicit": False, "implicit": True,
                                        "kind_weights": {"image-dispreference": 0.1},
                                        "token_kl": [0.01, 0.5, "marked"]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        objective.loss = "mlpo"


@pytest.mark.parametrize("entry", ["image-dispreference", "=0.1", "kind=heavy"])
def test_a_malformed_kind_weight_is_one_error(entry):
    with pytest.raises(HscrError, match="--kind-weight expects KIND=WEIGHT"):
        Objective.from_config(TrainConfig(kind_weight=[entry]))
