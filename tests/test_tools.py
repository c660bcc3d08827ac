"""The tool runner's calculator: named calls, plain expressions, and every refusal as `error: ...`."""

import subprocess
import sys

import pytest

from ms_ray.tools import MAX_EXPRESSION, MAX_POWER, ToolError, calculator, run_call


@pytest.mark.parametrize("call, expected", [
    ("mul 6 7", "42"),
    ("add 2 3", "5"),
    ("sub 2 3", "-1"),
    ("div 7 2", "3.5"),
    ("div 8 2", "4"),  # an integral float comes out as an int
    ("mod 17 5", "2"),
    ("pow 2 10", "1024"),
    ("MUL 3 4", "12"),  # the name is case-insensitive
    ("  mul   6   7  ", "42"),
    ("add -2 5", "3"),
    ("mul 1.5 2", "3"),
    ("calc (2+3)*4", "20"),
    ("calc (2 + 3) * 4", "20"),
    ("calculator 2 ** 3", "8"),
    ("2*(3+4)", "14"),
    ("(2 + 3) * 4", "20"),
    ("7 // 2", "3"),
    ("-3 + +5", "2"),
    ("1/3", "0.333333"),  # floats: 6 significant digits
    ("2/3", "0.666667"),
    ("1e-7 * 1", "1e-07"),
    ("0.1 + 0.2", "0.3"),
])
def test_run_call_answers(call, expected):
    assert run_call(call) == expected


@pytest.mark.parametrize("call, mentions", [
    ("div 1 0", "division by zero"),
    ("mod 1 0", "division by zero"),
    ("1 // 0", "division by zero"),
    ("calc 1/0", "division by zero"),
    ("__import__('os')", "Call"),
    ("calc __import__('os').system('true')", ""),
    ("(1).real", "Attribute"),
    ("x + 1", "Name"),
    ("os.system", "Attribute"),
    ("[1, 2]", "List"),
    ("'a' * 3", "Constant"),
    ("True + 1", "Constant"),  # booleans are not numbers here
    ("lambda: 1", "Lambda"),
    ("2 ** 100000", f"exponent <= {MAX_POWER}"),
    ("pow 2 65", f"exponent <= {MAX_POWER}"),
    ("pow 10 -65", f"exponent <= {MAX_POWER}"),
    ("1" * (MAX_EXPRESSION + 1), f"longer than {MAX_EXPRESSION}"),
    ("calc " + "1+" * 150 + "1", f"longer than {MAX_EXPRESSION}"),
    ("", "empty call"),
    ("   ", "empty call"),
    ("mul 6", "2 numbers"),
    ("mul 6 7 8", "2 numbers"),
    ("mul six seven", "Name"),
    ("2 +", "cannot parse"),
    ("calc", "cannot parse"),
])
def test_run_call_refusals_are_error_text(call, mentions):
    out = run_call(call)
    assert out.startswith("error:"), out
    assert mentions in out


def test_chained_small_exponents_still_answer():
    assert run_call("(2 ** 8) ** 8") == str(2 ** 64)
    assert run_call("(2 ** 31) ** 32") == str(2 ** 992)  # under MAX_BITS (1024)
    assert run_call("(2 ** 64) ** 64").startswith("error: power")  # refused, not computed
    assert run_call("(2 ** 36) ** 32").startswith("error: result has more than")


def test_result_over_int_digit_limit_is_error_text():
    out = run_call("((9 ** 64) ** 64) ** 2")  # every exponent <= MAX_POWER, 7816 digits
    assert out.startswith("error:")


def test_nested_powers_are_refused_quickly():
    call = "((((9**64)**64)**64)**64)"  # 9 ** (64 ** 4): about 16 million digits
    code = f"from ms_ray.tools import run_call; print(run_call({call!r}))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run_call({call!r}) still computing after 3 s")
    assert done.stdout.startswith("error:"), done.stderr[-300:]


def test_float_overflow_is_an_error_not_inf():
    out = run_call("1e308 * 10")
    assert out == "error: result is not finite"


def test_calculator_raises_tool_error_and_run_call_never_raises():
    with pytest.raises(ToolError, match="division by zero"):
        calculator("1/0")
    with pytest.raises(ToolError):
        calculator("open('x')")
    for call in ("mul a b", "calc (", "\x00", "1" * 10_000, "pow 9 9 9", "import os"):
        assert run_call(call).startswith("error:")


def test_exact_boundary_lengths_and_powers():
    assert run_call("1" * MAX_EXPRESSION) == "1" * MAX_EXPRESSION
    assert run_call(f"pow 2 {MAX_POWER}") == str(2 ** MAX_POWER)
    assert run_call(f"pow 2 -{MAX_POWER}") == f"{2 ** -MAX_POWER:.6g}"
