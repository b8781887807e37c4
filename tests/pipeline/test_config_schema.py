import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError


def test_shipped_config_composes_with_typed_blocks(compose_config):
    cfg = compose_config(["experiment=demo"])
    assert cfg.run.total_steps == 600 and cfg.sources.kinds == ["mono"]
    assert cfg.sampler.mode == "exact" and cfg.mixture.stages[0]["_target_"].endswith("Cooldown")


@pytest.mark.parametrize(
    "override, key",
    [
        ("run.total_step=5", "total_step"),
        ("loader.max_lenght=64", "max_lenght"),
        ("sampler.seed=3", "seed"),
        ("run.total_steps=ten", "total_steps"),
    ],
)
def test_misspelt_or_mistyped_keys_fail_at_compose_time(compose_config, override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as error:
        compose_config([override])
    assert key in str(error.value) + str(error.value.__cause__)
