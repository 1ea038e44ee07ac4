"""The raylab command: exit codes and messages for user errors (no Ray). The first test runs
`python -m raylab` in a subprocess; the rest call the same entry point in this process
(conftest.cli_here: the same exit code, stdout and stderr, without a Python start and
raylab's imports, ~4 s of a CI core, per command)."""

from __future__ import annotations

import textwrap

import pytest

from conftest import cli_here, run_cli


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_validate_reports_misspelled_wrong_type_and_missing_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        data:
          sources: [{type: jsonl, path: x.jsonl}]
        model: {method: lora}
        train: {lrr: 0.001, epochs: three}
        """))
    proc = run_cli("validate", str(path))
    assert_user_error(
        proc, "3 problems", "train.lrr: unknown key (did you mean train.lr?)", "train.epochs:",
        "model.name_or_path: missing required key",
    )


def test_validate_ok_and_print(tmp_path):
    proc = cli_here("validate", "configs/quickstart.yaml", "--print", "train.lr=5e-4")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.0005" in proc.stdout
    assert "configs/quickstart.yaml: ok" in proc.stderr


def test_flags_and_config_anywhere():
    proc = cli_here("validate", "train.lr=5e-4", "--config", "configs/quickstart.yaml", "--print")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.0005" in proc.stdout


def test_version(capsys):
    from raylab import __version__
    from raylab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"raylab {__version__}"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["validate"], ["a CONFIG file is required"]),
        (["validate", "missing.yaml"], ["config file not found: missing.yaml"]),
        (["validate", "configs/quickstart.yaml", "extra"], ["unexpected argument 'extra'"]),
        (["validate", "configs/quickstart.yaml", "train.lr"], ["unexpected argument 'train.lr'"]),
        (["validate", "configs/quickstart.yaml", "--bogus"], ["unrecognized argument: --bogus"]),
        (["frobnicate"], ["invalid choice"]),
        ([], ["required"]),
        (["doctor", "train.lr=1"], ["need a CONFIG"]),
        (["api", "configs/quickstart.yaml"], ["api.enabled", "--standalone"]),  # the service lives in the ingress
        (["deploy", "m/2", "--for", "10m"], ["--for applies to a canary: add --canary PCT"]),
        (["deploy", "m/2", "--canary", "150", "--for", "10m"], ["--canary 150"]),
        (["deploy", "m/2", "--canary", "10", "--for", "soon"], ["--for: 'soon' is not a duration"]),
    ],
)
def test_usage_errors_exit_2_without_traceback(args, needles):
    assert_user_error(cli_here(*args), *needles)


def test_empty_and_broken_yaml(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_user_error(cli_here("validate", str(empty)), "the config is empty")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmodel: {name_or_path: x\n")
    assert_user_error(cli_here("validate", str(broken)), "broken.yaml:3:", "YAML syntax error")


def test_plan_that_cannot_fit_is_refused_before_ray_starts():
    proc = cli_here("validate", "configs/quickstart.yaml", "train.num_workers=8", "train.cpus_per_worker=1", "ray.num_cpus=4")
    assert_user_error(
        proc, "the resource plan does not fit", "train needs 8.25 CPUs", "the cluster has 4 CPUs",
        "lower train.num_workers",
    )
    proc = cli_here("validate", "configs/quickstart.yaml", "train.gpus_per_worker=1", "ray.num_gpus=0")
    assert_user_error(proc, "2 GPUs", "the cluster has 4 CPUs and 0 GPUs")


def test_unset_secret_is_a_warning_not_an_error(tmp_path):
    path = tmp_path / "sql.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        data:
          sources: [{type: sql, url: "${env:RAYLAB_TEST_UNSET_URL}", query: "select 1"}]
        model: {name_or_path: preset:tiny-llama}
        """))
    proc = cli_here("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "data.sources.0.url references ${env:RAYLAB_TEST_UNSET_URL}" in proc.stderr


def test_the_shipped_cluster_config_needs_keys_to_serve_but_not_to_validate():
    # The keys' variable is set where the endpoint runs (a cluster, a submitted job), so
    # validating without it is a warning; without api_keys_env the 0.0.0.0 host is refused.
    proc = cli_here("validate", "configs/cluster.yaml", env={"RAYLAB_API_KEYS": ""})
    assert proc.returncode == 0, proc.stderr
    assert "serve.api_keys_env names $RAYLAB_API_KEYS, which is not set here" in proc.stderr
    assert "serve.api_keys_env" not in cli_here("validate", "configs/cluster.yaml", env={"RAYLAB_API_KEYS": "k"}).stderr
    open_ = cli_here("validate", "configs/cluster.yaml", "serve.api_keys_env=null")
    assert_user_error(open_, "serve.host: serving on '0.0.0.0'", "serve.allow_unauthenticated: true")
    proc = cli_here("validate", "configs/cluster.yaml", "serve.api_keys_env=null", "serve.allow_unauthenticated=true")
    assert proc.returncode == 0, proc.stderr
