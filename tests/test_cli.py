"""`instaflow-batch`: the dispatcher, job files checked against the jobs' own parsers, and `run` as the module."""

import re
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import generate, reflow_pairs
from jobs.jobfile import JOBS, JobFileError, job_flags, parse_job
from jobs.main import COMMANDS, main
from tests.jobhelpers import data_files, prompt_table


def write_job_file(tmp_path, values: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def parse(argv: list[str]):
    return parse_job("instaflow-batch run", argv, add_options=lambda parser: None)


BASE = {"prompts": "p.parquet", "output": "out/x", "model": "models/instaflow"}


def test_every_subcommand_has_help_with_defaults(capsys):
    assert main([]) == 2 and "commands:" in capsys.readouterr().out
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command.name, "--help"])
        assert exit_info.value.code == 0, command.name
        assert f"usage: instaflow-batch {command.name}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "reflow-pairs", "--help"])
    shown = capsys.readouterr().out
    assert "(default: 32)" in shown and "--teacher-kind {sd,rf}" in shown and "--config FILE" in shown
    assert main(["frobnicate"]) == 2


def test_job_file_keys_take_either_spelling_and_flags_override_them(tmp_path):
    config = write_job_file(tmp_path, BASE | {"batch-size": 8, "rows_per_shard": 16, "seed": 3, "compile": False,
                                              "storage_options": {"anon": True}, "format": "parquet"})
    job = parse(["--config", config, "--seed", "7"])
    assert job.name == "generate"
    args = job.args
    assert (args.batch_size, args.rows_per_shard, args.seed, args.compile) == (8, 16, 7, False)
    assert args.storage_options == {"anon": True} and args.output_format == "parquet"
    # The job file and the flags become the module's own command line, which parses back to the same job.
    again = generate.parser().parse_args(job.argv())
    assert vars(again) == {k: v for k, v in vars(args).items() if k != "config"}
    assert "--no-compile" in job.argv() and "--config" not in job.argv()


def test_job_file_names_the_job(tmp_path):
    config = write_job_file(tmp_path, {"job": "reflow-pairs", "prompts": "p", "output": "o", "teacher": "t"})
    job = parse(["--config", config])
    assert job.name == "reflow-pairs" and job.spec_args()["tasks"] == ("pairs",)
    assert parse(["reflow_pairs", "--config", config]).name == "reflow-pairs"
    with pytest.raises(JobFileError, match="is a reflow-pairs job, but the command line names generate"):
        parse(["generate", "--config", config])
    with pytest.raises(JobFileError, match="unknown job 'generat'"):
        parse(["generat", "--prompts", "p"])


@pytest.mark.parametrize("values, message", [
    ({"heigth": 64}, r"unknown key 'heigth' \(did you mean 'height'\?\)"),
    ({"height": "64"}, "height: expected an integer, got '64'"),
    ({"height": 64.5}, "height: expected an integer, got 64.5"),
    ({"seed": True}, "seed: expected an integer, got True"),
    ({"guidance_scale": "high"}, "guidance_scale: expected a number, got 'high'"),
    ({"prompt_column": 5}, "prompt_column: expected a string, got 5"),
    ({"compile": "yes"}, "compile: expected true or false, got 'yes'"),
    ({"overwrite": 1}, "overwrite: expected true or false, got 1"),
    ({"format": "tar"}, "format: 'tar' is not one of webdataset, parquet"),
    ({"storage_options": [1, 2]}, "storage_options: .*must be a JSON object"),
    ({"seed": None}, "seed: expected an integer, got None"),
    ({"job": "train"}, "job: 'train' is not one of generate, reflow-pairs"),
])
def test_job_file_rejects_keys_and_types_by_name(tmp_path, values, message):
    config = write_job_file(tmp_path, BASE | values)
    with pytest.raises(JobFileError, match=message) as error:
        parse(["--config", config])
    assert config in str(error.value)


def test_job_file_that_is_not_a_mapping_or_spells_a_key_twice(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- prompts\n- output\n")
    with pytest.raises(JobFileError, match="must be a mapping"):
        parse(["--config", str(listing)])
    twice = tmp_path / "twice.yaml"
    twice.write_text("batch-size: 4\nbatch_size: 8\n")
    with pytest.raises(JobFileError, match="'batch_size' is given twice"):
        parse(["--config", str(twice)])
    with pytest.raises(JobFileError, match="missing.yaml"):
        parse(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("text, message", [
    *((f"compile: {word}\n", f"compile: expected true or false, got '{word}'")
      for word in ("yes", "no", "on", "off", "y", "n", "Yes", "NO", "On")),
    ("allow_pickle: off\n", "allow_pickle: expected true or false, got 'off'"),
    ("height: 64\nheight: 128\n", "line 5, column 1: 'height' is given twice"),
    ("storage_options: {anon: true, anon: false}\n", "line 4, column 31: 'anon' is given twice"),
    ("x: &a 64\nheight: *a\n", "line 5, column 9: key 'height': a YAML alias (*a) is not allowed"),
    ("storage_options: {client_kwargs: &k {region_name: r}, config_kwargs: *k}\n",
     "key 'storage_options.config_kwargs': a YAML alias (*k) is not allowed"),
    ("x: &a batch_size\n*a : 4\n", "line 5, column 1: a key: a YAML alias (*a) is not allowed"),
    ("<<: {height: 64}\n", "line 4, column 1: a YAML merge key (<<) is not allowed in a job file"),
])
def test_job_file_is_read_as_yaml_1_2_without_duplicates_or_aliases(tmp_path, text, message):
    """YAML 1.1's yes/no/on/off are strings, which no switch takes; a key twice never silently keeps one."""
    config = tmp_path / "job.yaml"
    config.write_text("prompts: p\noutput: o\nmodel: m\n" + text)
    with pytest.raises(JobFileError, match=re.escape(message)) as error:
        parse(["--config", str(config)])
    assert str(config) in str(error.value)


def test_job_file_booleans_and_yaml_1_1_words_as_strings(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("prompts: p\noutput: o\nmodel: m\ncompile: True\noverwrite: false\nprompt_column: yes\n"
                      "tiny_decoder: off\n")
    args = parse(["--config", str(config)]).args
    assert (args.compile, args.overwrite, args.prompt_column, args.tiny_decoder) == (True, False, "yes", "off")


def test_required_flags_come_from_the_file_or_the_command_line(tmp_path, capsys):
    config = write_job_file(tmp_path, {"prompts": "p", "output": "o"})
    with pytest.raises(SystemExit) as exit_info:
        parse(["--config", config])
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err
    assert parse(["--config", config, "--model", "m"]).args.model == "m"


def test_flags_added_to_a_job_work_in_job_files_without_edits(tmp_path, monkeypatch):
    original = generate.parser

    def parser_with_a_new_flag(prog=None):
        parser = original(prog)
        parser.add_argument("--sharpness", type=float, default=1.0, help="a flag added later")
        return parser

    monkeypatch.setattr(generate, "parser", parser_with_a_new_flag)
    job = parse(["--config", write_job_file(tmp_path, BASE | {"sharpness": 2})])
    assert job.args.sharpness == 2.0 and job.argv()[-2:] == ["--sharpness", "2.0"]
    with pytest.raises(JobFileError, match="sharpness: expected a number"):
        parse(["--config", write_job_file(tmp_path, BASE | {"sharpness": "x"}, "bad.yaml")])


def test_repeated_flags_take_lists_in_job_files_and_the_command_line_replaces_them(tmp_path):
    """--lora in order, from a file's list or one value; the module gets each as its own flag."""
    job = parse(["--config", write_job_file(tmp_path, BASE | {"lora": ["a.safetensors:0.5", "b.safetensors"]})])
    assert job.args.loras == ["a.safetensors:0.5", "b.safetensors"]
    argv = job.argv()
    at = argv.index("--lora")
    assert argv[at:at + 4] == ["--lora", "a.safetensors:0.5", "--lora", "b.safetensors"] and argv.count("--lora") == 2
    assert generate.parser().parse_args(job.argv()).loras == job.args.loras  # what run and submit hand on
    config = write_job_file(tmp_path, BASE | {"lora": "one.safetensors", "scores": "clip,nsfw"}, "one.yaml")
    assert parse(["--config", config]).args.loras == ["one.safetensors"]
    assert parse(["--config", config, "--lora", "c.safetensors", "--lora", "d.safetensors"]).args.loras == [
        "c.safetensors", "d.safetensors"]  # the command line wins, as for every flag
    assert parse([*sum((["--" + k, v] for k, v in BASE.items()), [])]).args.loras == []
    for value, message in (([1.5], r"lora\[0\]: expected a string"), ({"a": 1}, "lora: expected a string")):
        with pytest.raises(JobFileError, match=message):
            parse(["--config", write_job_file(tmp_path, BASE | {"lora": value}, "bad.yaml")])


def test_every_job_flag_is_a_job_file_key():
    for name, module in JOBS.items():
        parser = module.parser()
        flags = job_flags(parser)
        options = {action.option_strings[0] for action in parser._actions if action.option_strings} - {"-h"}
        assert {"--" + key.replace("_", "-") for key in flags} == options, name
    assert "teacher_kind" in job_flags(reflow_pairs.parser()) and "format" in job_flags(generate.parser())


def test_impossible_values_stop_run_before_anything_starts(tmp_path, capsys):
    output = tmp_path / "out"
    config = write_job_file(tmp_path, BASE | {"output": str(output), "batch_size": 0})
    assert main(["run", "--config", config]) == 2
    assert "batch_size must be a positive integer, got 0" in capsys.readouterr().err
    assert not output.exists()
    assert main(["run", "--config", config, "--batch-size", "4", "--height", "63"]) == 2
    assert "height" in capsys.readouterr().err and not output.exists()


def test_run_is_the_module_entry_point(ray_gpus, tiny_models, tmp_path):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(prompt_table(12), prompts, row_group_size=4)
    shared = {"prompts": str(prompts), "height": 64, "width": 64, "batch-size": 4, "rows-per-shard": 4,
              "num-workers": 2, "no-progress": True}
    config = write_job_file(tmp_path, shared | {"model": str(tiny_models["instaflow"]), "output": "ignored"})
    via_cli = tmp_path / "via-cli"
    via_module = tmp_path / "via-module"
    assert main(["run", "generate", "--config", config, "--output", str(via_cli)]) == 0
    assert generate.main([
        "--prompts", str(prompts), "--output", str(via_module), "--model", str(tiny_models["instaflow"]),
        "--height", "64", "--width", "64", "--batch-size", "4", "--rows-per-shard", "4", "--num-workers", "2",
        "--no-progress",
    ]) == 0
    local = fsspec.filesystem("file")
    cli_files, module_files = data_files(local, str(via_cli)), data_files(local, str(via_module))
    assert len(cli_files) == 6 and cli_files == module_files  # 3 shards of tar + parquet, byte for byte


def test_tiny_writes_the_models(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "models")]) == 0
    printed = capsys.readouterr().out
    for name in ("sd15", "instaflow", "2rf"):
        assert (tmp_path / "models" / name / "model_index.json").exists() and f"{name}:" in printed


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["instaflow-batch"] == "jobs.main:main"
    assert any(dep.startswith("pyyaml") for dep in project["dependencies"])
