"""Typed config: defaults, packaged configs, overrides, and errors that name the key."""

import pytest

from kava.cli import main
from kava.config import PACKAGED_CONFIGS, ConfigError, KavaConfig, load_config, save_config


def test_defaults_match_method_md():
    c = KavaConfig()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (128, 32, 0.1)
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (c.latent.num_latents, c.latent.num_iterations, c.rkv.lam) == (24, 3, 0.1)
    assert c.teacher.drop_last_step and c.rkv.order == "position" and c.kv_loss.iterations == "last"
    assert (c.train.global_batch_size, c.train.grad_clip) == (128, 2.0)


def test_method_presets():
    assert load_config(overrides=["method=pccot"]).effective_alpha2 == 0.0
    codi = load_config(overrides=["method=codi"])
    assert codi.effective_alpha2 == 0.0 and codi.effective_iterations == codi.latent.num_latents
    assert load_config().effective_alpha2 == 1.0
    assert not load_config(overrides=["method=cot"]).is_latent


@pytest.mark.parametrize(
    "name, expect",
    [
        (
            "llama1b-gsm8k-aug",
            dict(
                alpha1=10,
                alpha2=1,
                kv="smooth_l1",
                lw=True,
                prj=True,
                lam=0.1,
                lr=8e-4,
                wd=0.1,
                ep=10,
            ),
        ),
        (
            "llama1b-gsm8k-aug-nl",
            dict(alpha1=10, alpha2=1, kv="mse", lw=True, prj=True, lam=0.1, lr=8e-4, wd=0.1, ep=10),
        ),
        (
            "qwen05b-gsm8k-aug",
            dict(
                alpha1=10, alpha2=1, kv="mse", lw=False, prj=True, lam=0.1, lr=5e-4, wd=0.01, ep=10
            ),
        ),
        (
            "qwen05b-gsm8k-aug-nl",
            dict(alpha1=10, alpha2=1, kv="mse", lw=True, prj=True, lam=0.1, lr=8e-4, wd=0.1, ep=10),
        ),
        (
            "llama3b-gsm8k-aug",
            dict(
                alpha1=20,
                alpha2=2,
                kv="smooth_l1",
                lw=False,
                prj=True,
                lam=0.1,
                lr=2e-4,
                wd=0.1,
                ep=5,
            ),
        ),
        (
            "llama3b-gsm8k-aug-nl",
            dict(
                alpha1=20,
                alpha2=2,
                kv="smooth_l1",
                lw=False,
                prj=False,
                lam=0.0,
                lr=2e-4,
                wd=0.1,
                ep=5,
            ),
        ),
    ],
)
def test_table6_configs(name, expect):
    c = load_config(PACKAGED_CONFIGS / f"{name}.yaml")
    got = dict(
        alpha1=c.alpha1,
        alpha2=c.alpha2,
        kv=c.kv_loss.type,
        lw=c.kv_loss.layerwise_std,
        prj=c.latent.use_projection,
        lam=c.rkv.lam,
        lr=c.train.lr,
        wd=c.train.weight_decay,
        ep=c.train.epochs,
    )
    assert got == expect
    assert (
        c.latent.num_latents,
        c.latent.num_iterations,
        c.train.global_batch_size,
        c.train.grad_clip,
    ) == (24, 3, 128, 2.0)
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (128, 32, 0.1)


def test_round_trip(tmp_path):
    c = load_config("demo", ["rkv.lambda=0.3", "kv_loss.type=mse"])
    save_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c
    assert "lambda: 0.3" in (tmp_path / "c.yaml").read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: kava\nbogus: 1\n", "unknown config key bogus"),
        ("kv_loss:\n  typo: mse\n", "unknown config key kv_loss.typo"),
        ("kv_loss: {type: huber}\n", "kv_loss.type: 'huber' is not one of"),
        ("latent: {num_latents: many}\n", "latent.num_latents: expected an integer"),
        ("rkv: {lambda: 2}\n", "rkv.lambda: must be in [0, 1]"),
        ("train: {fused_qkv: 3}\n", "train.fused_qkv: expected true/false"),
        ("eval: {fused_qkv: yes please}\n", "eval.fused_qkv: expected true/false"),
        ("train: {lr: -1}\n", "train.lr: must be > 0"),
        ("latent: [1, 2]\n", "latent: expected a mapping"),
        ("method: kava\n  bad: [indent\n", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
)
def test_bad_config_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and "bad.yaml" in str(e.value)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["alpha1"])
    with pytest.raises(ConfigError, match="unknown config key latent.M"):
        load_config(overrides=["latent.M=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no-such-config")


def test_override_errors_name_the_override_not_the_file(tmp_path):
    demo = str(PACKAGED_CONFIGS / "demo.yaml")
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.lr=abc"])
    assert str(e.value) == "--set train.lr=abc: train.lr: expected a number, got 'abc'"
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["eval.batch_size=2", "train.lrr=1"])
    assert str(e.value).startswith("--set train.lrr=1: unknown config key train.lrr (known:")
    with pytest.raises(ConfigError) as e:  # a list item under the overridden key
        load_config("demo", ["lora.target_modules=[1]"])
    assert str(e.value).startswith("--set lora.target_modules=[1]: lora.target_modules[0]:")
    with pytest.raises(ConfigError) as e:  # a check across keys the override broke
        load_config("demo", ["data.synthetic_min_steps=99"])
    assert str(e.value).startswith("--set data.synthetic_min_steps=99: data.synthetic_max_steps:")
    assert demo not in str(e.value)
    path = tmp_path / "bad.yaml"  # a bad value in the file still names the file
    path.write_text("train: {lr: -1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["eval.batch_size=2"])
    assert str(e.value) == f"{path}: train.lr: must be > 0"
    assert load_config(path, ["train.lr=0.1"]).train.lr == 0.1  # an override may fix the file


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("bogus: 1\n")
    assert main(["train", str(path)]) == 2
    assert "unknown config key bogus" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "solve", "demo"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "forward passes" in capsys.readouterr().out


def test_eval_help_states_the_real_out_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "<checkpoint>/eval" not in out
    for default in (
        "CKPT/eval for a checkpoint folder",
        "RUN/final/eval for a run folder RUN",
        "runs/eval/<Hub id",
        "runs/eval-untrained with --config",
    ):
        assert default in out


def test_demo_refuses_a_folder_that_is_not_a_demo_run(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "not a kava demo run" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_missing_local_model_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {tmp_path}/no-such-model}}\n")
    assert main(["eval", "--config", str(cfg), "--no-progress"]) == 2
    assert "model.name_or_path" in capsys.readouterr().err
