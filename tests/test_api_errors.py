"""Errors at the API's edges teach (issue 9, items 10 and 11): failing passes inside a pipeline,
static arguments to ``trace``, passes applied to functions, where warnings point, the CLI."""

import functools
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import maas_jax
from maas_jax import PassError, SelectionError, TraceError, UnusedRuleWarning, cli, passes
from maas_jax.cli import tour


def _f(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


def _params():
    return {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}


@pytest.fixture
def prog():
    return maas_jax.trace(_f, _params(), jnp.ones((2, 3)))


# ---- 1. a pass that raises inside a pipeline ------------------------------------------------


def test_exception_in_user_pass_becomes_pass_error_with_context(prog):
    def lookup_pass(program):
        return {}["missing"]

    with pytest.raises(PassError, match=r"pass lookup_pass .*passes run before it: dce\.") as info:
        maas_jax.pipeline(passes.dce(), lookup_pass)(prog)
    assert "it raised KeyError: 'missing'" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)  # raise ... from e keeps the original


def test_library_error_in_pass_keeps_its_type_and_gains_context(prog):
    def selecting_pass(program):
        maas_jax.select(program, 3.5, pass_name="selecting_pass")
        return program

    with pytest.raises(SelectionError, match=r"pass selecting_pass .*before it: dce") as info:
        maas_jax.pipeline(passes.dce(), selecting_pass)(prog)
    assert isinstance(info.value, PassError)
    assert "cannot select with a float (3.5)" in str(info.value)
    assert type(info.value.__cause__) is SelectionError


def test_pass_error_from_library_pass_is_not_wrapped_twice(prog):
    fq = passes.fake_quant("int8")(prog)
    with pytest.raises(PassError, match=r"after fake_quant") as info:
        maas_jax.pipeline(passes.dce(), passes.clip_weights(0.5))(fq)
    assert type(info.value) is PassError
    assert "passes run before it" not in str(info.value)


# ---- 2. static arguments to trace; passes applied to functions ------------------------------


def _flagged(p, x, train):
    return x @ p["w"] if train else x


def test_python_bool_positional_argument_says_partial_or_keyword():
    with pytest.raises(
        TraceError,
        match=r"'args/1' is a bool \(True\).*positional argument 3 of _flagged.*"
        r"keyword.*functools\.partial\(_flagged, train=True\)",
    ):
        maas_jax.trace(_flagged, {"w": jnp.ones((3, 3))}, jnp.ones(3), True)
    # The fix the message gives works.
    fixed = maas_jax.trace(
        functools.partial(_flagged, train=True), {"w": jnp.ones((3, 3))}, jnp.ones(3)
    )
    np.testing.assert_array_equal(fixed({"w": jnp.ones((3, 3))}, jnp.ones(3)), jnp.full(3, 3.0))


def test_python_str_positional_argument_says_partial_or_keyword():
    with pytest.raises(
        TraceError, match=r"'args/1' is a str \('relu'\).*functools\.partial\(_act, act='relu'\)"
    ):
        maas_jax.trace(_act, {"w": jnp.ones(3)}, jnp.ones(3), "relu")


def _act(p, x, act):
    return x


def test_python_bool_inside_params_is_refused_but_bool_arrays_are_data():
    with pytest.raises(TraceError, match=r"'train' is a bool.*functools\.partial"):
        maas_jax.trace(lambda p, x: x, {"w": jnp.ones(2), "train": False}, jnp.ones(2))
    prog = maas_jax.trace(lambda p, x, m: jnp.where(m, x, 0.0), {}, jnp.ones(2), jnp.asarray(True))
    assert prog.roles[-1].dtype == np.dtype(bool)


def test_pass_on_a_plain_function_says_trace_it_first():
    hint = r"was given the function '_f', not a Program.*maas_jax\.trace\(fn, params, \*inputs\)"
    with pytest.raises(TypeError, match=r"dce\(\) " + hint):
        passes.dce()(_f)
    with pytest.raises(
        TypeError, match=r"pipeline\(clip_weights\(max_abs=1\.0\), dce\(\)\) " + hint
    ):
        maas_jax.pipeline(passes.clip_weights(1.0), passes.dce())(_f)
    with pytest.raises(TypeError, match=r"was given a ndarray"):
        maas_jax.pipeline()(np.ones(2))


# ---- 3. UnusedRuleWarning points at the user's line -----------------------------------------


@pytest.mark.parametrize("how", ["direct", "pipeline", "nested pipeline"])
def test_unused_rule_warning_points_at_the_callers_line(prog, how):
    clip = passes.clip_weights(1.0, where=["w", "no_such_weight"])
    run = {
        "direct": clip,
        "pipeline": maas_jax.pipeline(passes.dce(), clip),
        "nested pipeline": maas_jax.pipeline(maas_jax.pipeline(clip)),
    }[how]
    with pytest.warns(UnusedRuleWarning, match="no_such_weight") as record:
        run(prog)
    assert [w.filename for w in record] == [__file__]


# ---- 4. the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tour", "--sentences", "0"], r"argument --sentences: must be between 1 and 72.*got 0"),
        (["tour", "--sentences", "ten"], r"argument --sentences: expected a whole number"),
        (
            ["tour", "--clip-quantile", "2"],
            r"argument --clip-quantile: must be a quantile in \(0, 1\]",
        ),
        (["tour", "--clip-quantile", "0"], r"argument --clip-quantile: .*got 0\.0"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
    ],
)
def test_cli_rejects_bad_arguments_with_exit_code_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: maas-jax" in err
    assert re.search(message, err), err


def test_cli_sentence_bound_is_the_bundled_sentence_count():
    from maas_jax.models.sentences import SENTENCES

    assert tour._N_SENTENCES == len(SENTENCES)


def test_cli_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip().startswith(f"maas_jax {maas_jax.__version__}, jax ")


def test_python_dash_m_maas_jax_runs_the_cli():
    res = subprocess.run(
        [sys.executable, "-m", "maas_jax", "version"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"maas_jax {maas_jax.__version__}")


def test_pipeline_summary_is_one_short_line_per_pass():
    pipe = maas_jax.pipeline(
        passes.clip_weights(1.0), maas_jax.pipeline(passes.fake_quant("int8", act="int8"))
    )
    lines = tour._pipeline_summary(pipe).splitlines()
    assert lines[0] == "pipeline of 2 passes:"
    assert lines[1].split() == ["1.", "clip_weights", "clip_weights(max_abs=1.0)"]
    assert lines[2].split()[:3] == ["2.", "fake_quant", "fake_quant(rules=(QuantRule(where=None,"]
    assert lines[2].endswith(" ...)") and all(len(line) <= 120 for line in lines)
    assert len(repr(pipe)) > 200  # the one long line the demo printed before
