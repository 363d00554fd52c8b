import pytest

from mtnlg.config import Config, apply_overrides, parse_value
from mtnlg.errors import ConfigError


def test_defaults_validate():
    cfg = Config().validate()
    assert cfg.model.num_layers == 4 and cfg.data.corpus == "poems:0.1,zh:0.9" and cfg.model.vocab_size is None


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_layers: 3\ntrain:\n  lr: 0.01\n")
    cfg = Config.load(p, ["--train.lr=3e-4", "parallel.pp_layers=[1,2]", "--serve.api_key=12345",
                          "--checkpoint.dir=none"])
    assert cfg.model.num_layers == 3
    assert cfg.train.lr == 3e-4
    assert cfg.parallel.pp_layers == [1, 2]
    assert cfg.serve.api_key == "12345"
    assert cfg.checkpoint.dir is None


@pytest.mark.parametrize("override,pattern", [
    ("--train.stpes=3", r"unknown key 'train.stpes'; did you mean 'train.steps'"),
    ("--trian.steps=3", r"unknown key 'trian.steps'.*did you mean 'train.steps'"),
    ("--model.hidden_size=abc", r"model.hidden_size: expected int, got 'abc'"),
    ("--train.compile=maybe", r"train.compile: expected bool"),
    ("--model.num_heads=7", r"divisible by model.num_heads=7"),
    ("--model.activation=swish", r"model.activation='swish' is not supported"),
    ("--parallel.pp_schedule=1f1x", r"did you mean '1f1b'"),
    ("--data.split=1,2", r"data.split"),
    ("--train.seq_len=4096", r"exceeds model.max_seq_len"),
    ("--train.long_seq_len=1024", r"train.long_seq_len=1024 must be .* at most model.max_seq_len=512"),
    ("--train.long_seq_len=200", r"train.long_seq_len=200 must be a multiple .* of train.seq_len=128"),
    ("--train.long_seq_len=128", r"train.long_seq_len=128 must be a multiple \(2x or more\)"),
    ("--train.long_seq_every=-1", r"train.long_seq_every must be >= 0"),
    ("--sft.multi_turn=1.5", r"sft.multi_turn must be in \[0, 1\], got 1.5"),
    ("--sft.max_turns=0", r"sft.max_turns must be >= 1, got 0"),
    ("steps=3", r"must name a section"),
])
def test_override_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config.load(None, [override])


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_layer'.*did you mean 'model.num_layers'"):
        Config.load(p)
    p.write_text("modle:\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean 'model'"):
        Config.load(p)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        Config.load("/nonexistent.yaml")


def test_parse_value():
    assert parse_value("1e-3") == 1e-3
    assert parse_value("true") is True
    assert parse_value("poems") == "poems"
    assert parse_value("[0.7, a, 0.3, b]") == [0.7, "a", 0.3, "b"]


def test_int_accepted_for_float():
    cfg = apply_overrides(Config(), ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_parallel_output_and_loss_parallel_are_one_setting():
    from mtnlg.config import Config

    c = Config().validate()
    assert c.parallel.loss_parallel is True and c.model.parallel_output is True
    c = Config.from_dict({"model": {"parallel_output": False}}).validate()
    assert c.parallel.loss_parallel is False
    c = Config.from_dict({"parallel": {"loss_parallel": False}}).validate()
    assert c.model.parallel_output is False and c.parallel.loss_parallel is False


def test_pre_process_first_and_post_process_last_change_the_pipeline_split():
    from mtnlg.config import Config
    from mtnlg.parallel.pipeline import stage_layer_counts, uniform_split

    assert uniform_split(7, 2) == [3, 4]
    assert uniform_split(7, 2, pre_process_first=True) == [3, 4]  # 8 units: [4, 4], the embedding is one
    assert uniform_split(7, 2, post_process_last=True) == [4, 3]
    assert uniform_split(6, 2, pre_process_first=True) == [2, 4]
    assert uniform_split(8, 4, True, True) == [1, 2, 3, 2]  # 10 units: [2, 2, 3, 3], minus one at both ends
    for pre, post, want in [(False, False, [3, 3]), (True, False, [2, 4]), (False, True, [3, 3]), (True, True, [3, 3])]:
        c = Config.from_dict({"model": {"num_layers": 6, "pre_process_first": pre, "post_process_last": post},
                              "parallel": {"pp": 2}}).validate()
        assert stage_layer_counts(c.model, c.parallel, 16) == want, (pre, post)
    with pytest.raises(ConfigError, match="model.pre_process_first=True"):
        Config.from_dict({"model": {"num_layers": 2, "pre_process_first": True}, "parallel": {"pp": 2}}).validate()
    with pytest.raises(ConfigError, match="= 4 stages but model.num_layers=2"):  # neither flag is to blame
        Config.from_dict({"model": {"num_layers": 2}, "parallel": {"pp": 4}}).validate()


def test_long_steps_resolve_from_the_model_and_turn_off():
    """train.long_seq_len none = the longest multiple of seq_len within model.max_seq_len (512 / 128: four
    sequences packed into one); off with long_seq_every=0 or when no two sequences fit."""
    assert Config.load(None, []).long_span() == 4
    assert Config.load(None, ["--train.long_seq_len=256"]).long_span() == 2
    assert Config.load(None, ["--parallel.pp=2", "--model.num_layers=4"]).long_span() == 4
    assert Config.load(None, ["--train.seq_len=48"]).long_span() == 10  # 480 of the 512 positions: the most
    assert Config.load(None, ["--model.max_seq_len=200"]).long_span() == 1  # nothing to pack: none
    for off in (["--train.long_seq_every=0"], ["--model.max_seq_len=128"]):
        assert Config.load(None, off).long_span() == 1, off
