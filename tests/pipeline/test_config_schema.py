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


# -- typed groups ------------------------------------------------------------------------------
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from pipeline.config.schema import check_targets  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf"
# Groups whose options are selected with `group=option` (experiment and sweep are global files).
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "sweep", "hydra"))
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]
ERRORS = (ConfigCompositionException, ConfigKeyError, ValidationError)


def _message(error) -> str:
    text, cause = str(error), error.__cause__
    while cause is not None:
        text += "\n" + str(cause)
        cause = cause.__cause__
    return text


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.imp=fused", "imp"),
        ("tokenizer.vocab_sise=100", "vocab_sise"),
        ("loader.micro_batch=4", "micro_batch"),
        ("model.transformer.d_modle=32", "d_modle"),
        ("model.translation_eval.examples=3", "examples"),
        ("model.optimizer.learning_rate=0.1", "learning_rate"),
        ("trainer.acelerator=gpu", "acelerator"),
        ("strategy.stag=2", "stag"),
        ("logger.projet=x", "projet"),
    ],
)
def test_misspelt_group_keys_fail_at_compose_time(compose_config, override, key):
    with pytest.raises(ERRORS) as error:
        compose_config([override])
    assert key in _message(error.value)


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (["sampler.mode=exct"], "sampler.mode", ["exact", "stochastic"]),
        (["loss.impl=fast"], "loss.impl", ["torch", "fused"]),
        (["tokenizer.model_type=unigramm"], "tokenizer.model_type", ["unigram", "bpe", "char", "word"]),
        (["balance=m4", "balance.mode=subsampel"], "balance.mode", ["subsample", "weights"]),
        (["balance=m4", "balance.solver=fast"], "balance.solver", ["streaming", "exact"]),
        (["balance=m4", "balance.on_violation=error"], "balance.on_violation", ["warn", "raise", "ignore"]),
    ],
)
def test_unknown_enum_values_fail_naming_key_and_allowed_values(compose_config, overrides, key, allowed):
    with pytest.raises(ERRORS) as error:
        compose_config(overrides)
    message = _message(error.value)
    assert key in message and all(value in message for value in allowed), message


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes_and_rejects_a_misspelt_key(compose_config, group, option):
    cfg = compose_config([f"{group}={option}"])
    assert cfg[group] is not None
    if group in ("data", "mixture"):
        check_targets(cfg)  # keys that depend on a _target_: checked against its signature
    if group == "data":  # recipe keys: struct mode at compose (no new key), signature in check_targets
        with pytest.raises(ERRORS):
            compose_config([f"{group}={option}", "data.languagez=[deu]"])
        return
    with pytest.raises(ERRORS) as error:
        compose_config([f"{group}={option}", f"{group}.misspelt_key=1"])
    assert "misspelt_key" in _message(error.value)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(compose_config, experiment):
    cfg = compose_config([f"experiment={experiment}"])
    check_targets(cfg)
    assert cfg.experiment_name == experiment


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_every_sweep_preset_composes(compose_config, sweep):
    cfg = compose_config(["experiment=tatoeba_lm", f"+sweep={sweep}"])
    check_targets(cfg)


def test_enum_values_behave_as_their_strings(compose_config):
    cfg = compose_config(["loss=fused", "sampler=stochastic", "balance=m4"])
    assert cfg.loss.impl == "fused" and f"{cfg.sampler.mode}" == "stochastic" and str(cfg.balance.solver) == "streaming"
    assert json.dumps(OmegaConf.to_container(cfg.loss)) == '{"impl": "fused", "label_smoothing": 0.0, "z_loss": 0.0}'
    assert "impl: fused" in OmegaConf.to_yaml(cfg.loss)
    assert cfg.tokenizer.model_type in ("unigram", "bpe")


def test_every_enum_value_of_the_docs_composes(compose_config):
    for value in ("warn", "raise", "ignore"):
        assert compose_config(["balance=m4", f"balance.on_violation={value}"]).balance.on_violation == value
    for value in ("unigram", "bpe", "char", "word"):
        assert compose_config([f"tokenizer.model_type={value}"]).tokenizer.model_type == value


def test_trainer_max_steps_is_added_with_plus(compose_config):
    cfg = compose_config(["+trainer.max_steps=2"])
    assert cfg.trainer.max_steps == 2
    assert "max_steps" not in compose_config([]).trainer


def test_launch_schema_has_signal_seconds(compose_config):
    cfg = compose_config(["launch=slurm"])
    assert cfg.launch.signal_seconds == 120 and cfg.launch.job_name == "mixpipe"
    assert compose_config([]).launch is None


@pytest.fixture
def conf_copy(tmp_path):
    """A copy of conf/ to add files with typos to."""
    target = tmp_path / "conf"
    shutil.copytree(CONF, target)
    return target


def _compose_from(conf_dir: Path, overrides):
    from pipeline.config.compose import compose_config

    return compose_config(overrides, config_dir=conf_dir)


@pytest.mark.parametrize(
    "body, key",
    [
        ("loss: {imp: fused}", "imp"),
        ("sampler: {mode: exct}", "exct"),
        ("tokenizer: {vocab_sise: 100}", "vocab_sise"),
        ("model: {transformer: {n_layer: 3}}", "n_layer"),
        ("strategy: {find_unused: true}", "find_unused"),
    ],
)
def test_typos_in_yaml_files_fail_at_compose_time(conf_copy, body, key):
    (conf_copy / "experiment" / "typo.yaml").write_text(f"# @package _global_\n{body}\n")
    with pytest.raises(ERRORS) as error:
        _compose_from(conf_copy, ["experiment=typo"])
    assert key in _message(error.value)


def test_stage_and_recipe_keys_are_checked_against_their_targets(conf_copy):
    (conf_copy / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nmixture:\n  stages:\n    - _target_: pipeline.mixing.Temperature\n      tua: 2.0\n")
    cfg = _compose_from(conf_copy, ["experiment=typo"])  # list entries cannot be typed by OmegaConf
    with pytest.raises(ValueError, match=r"mixture\.stages\[0\]: unknown key\(s\) \['tua'\].*Temperature"):
        check_targets(cfg)
    (conf_copy / "experiment" / "typo.yaml").write_text("# @package _global_\ndata:\n  localez: [deu]\n")
    cfg = _compose_from(conf_copy, ["experiment=typo"])
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['localez'\]"):
        check_targets(cfg)
    (conf_copy / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nmixture:\n  stages:\n    - _target_: pipeline.mixing.NoSuchStage\n")
    with pytest.raises(ValueError, match="cannot be imported"):
        check_targets(_compose_from(conf_copy, ["experiment=typo"]))
