"""The command lines reject a bad value with argparse's one-line error naming it and the valid ones, exit code 2
(issue 20 item 11: IndexError, AttributeError, a silent exit 0 or a failure deep in the model before), finish
without matplotlib, and summarize skipped cells by reason."""
from __future__ import annotations

import sys

import pytest

from benchmarks.__main__ import parse as bench_parse
from benchmarks.report import skipped_summary, write_report
from lyfast.profile import profile_memory

BAD_BENCH = [
    (["--algos", "bogus"], "--algos: 'bogus': valid are loha, lokr, boft"),
    (["--algos", "loha,bogus"], "'bogus'"),
    (["--providers", "lyfst"], "--providers: 'lyfst': valid are base, lyfast"),
    (["--dtype", "fp64"], "--dtype: 'fp64' is not a dtype; valid: float32"),
    (["--model", "sdxl,foo"], "--model: 'foo': valid are sdxl"),
    (["--modes", "fwd,x"], "--modes: 'x': valid are fwd, bwd, fwdbwd"),
    (["--threads", "0"], "--threads: '0': expected a positive int"),
    (["--minutes", "-1"], "--minutes: '-1': expected a positive float"),
    (["--budget", "x"], "--budget: 'x': expected a positive float"),
    (["--shapes", "nope"], "--shapes: unknown sdxl shape 'nope'"),
    (["--base", "int3"], "--base: invalid choice: 'int3'"),
]

BAD_PROFILE = [
    (["--providers", "lyfst"], "--providers: 'lyfst': valid are lyfast"),
    (["--dtype", "fp64"], "--dtype: 'fp64' is not a dtype"),
    (["--resolution", "-8"], "--resolution: '-8': expected a positive int"),
    (["--resolution", "1000"], "--resolution: '1000': expected a positive multiple of 16"),
    (["--frames", "0"], "--frames: '0': expected a positive int"),
    (["--settings", "x"], "--settings: 'x': valid are loha-r8"),
    (["--model", "foo"], "--model: 'foo': valid are sdxl"),
    (["--device", "tpu"], "--device: 'tpu' is not a device"),
    (["--base", "nf5"], "--base: invalid choice: 'nf5'"),
]


def _exit_2(fn, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("argv,message", BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_benchmarks_cli_rejects_bad_values(argv, message, capsys):
    assert message in _exit_2(bench_parse, argv, capsys)


@pytest.mark.parametrize("argv,message", BAD_PROFILE, ids=[" ".join(a) for a, _ in BAD_PROFILE])
def test_profile_memory_cli_rejects_bad_values(argv, message, capsys):
    assert message in _exit_2(profile_memory, argv, capsys)


@pytest.mark.parametrize("spelling,name", [("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"),
                                           ("float16", "float16")])
def test_dtype_spellings_are_accepted(spelling, name):
    assert bench_parse(["--dtype", spelling, "--quick"]).dtype == name


def _tiny_report(tmp_path):
    info = {"device": "cpu test", "cuda": False, "dtype": "float32", "threads": 2, "torch": "x", "lyfast": "x",
            "lycoris": "x", "peft": None, "git_sha": "x", "date": "2026-12-03T00:00:00", "command": "test",
            "model": "sdxl"}
    timings = [{"shape": "s", "mode": "fwdbwd", "provider": "base", "setting": None, "median_ms": 1.0},
               {"shape": "s", "mode": "fwdbwd", "provider": "lyfast", "setting": "loha-r8", "median_ms": 1.2,
                "ratio_base": 1.2}]
    return write_report(info, {}, timings, [], [], str(tmp_path))


def test_report_finishes_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = _tiny_report(tmp_path)
    assert [p.rsplit(".", 1)[1] for p in paths] == ["md", "json"]
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out


def test_skipped_cells_are_grouped_by_reason():
    skipped = [{"provider": "peft", "setting": f"boft-b{b}", "shape": f"shape{i}",
                "reason": f"boft-b{b} does not fit shape{i}: no block size"} for i in range(5) for b in (32,)]
    skipped += [{"provider": "lyfast-cuda", "reason": "the extension is not built"}]
    lines = skipped_summary(skipped)
    assert len(lines) == 2
    assert lines[0].startswith("- 5 x boft-b32 does not fit <shape>: no block size (peft boft-b32 shape0;")
    assert "+2 more" in lines[0]
    assert lines[1] == "- 1 x the extension is not built (lyfast-cuda)"


def test_unknown_lyfast_command_is_named(capsys):
    from lyfast.__main__ import main

    assert main(["plan-memory"]) == 2
    assert "unknown command 'plan-memory'; valid: profile-memory" in capsys.readouterr().err
