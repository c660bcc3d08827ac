"""Tools the tool runner executes: a call is the text of the tool-call stream between silences.

Call syntax: `NAME ARGS...` (the skill tasks write `mul 6 7`) or, for the calculator, a plain
arithmetic expression (`(2 + 3) * 4`). The answer is text for the tool stream; a bad call gives
`error: ...`, which the model reads like any other tool result.
"""

from __future__ import annotations

import ast
import math
import operator

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
       ast.USub: operator.neg, ast.UAdd: operator.pos}
WORDS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "mod": "%", "pow": "**"}
MAX_EXPRESSION = 200
MAX_POWER = 64
MAX_BASE = 10**12
MAX_BITS = 1024  # ~308 digits; results beyond are refused, not computed


class ToolError(ValueError):
    pass


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
        return OPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_POWER or abs(left) > MAX_BASE):
            raise ToolError(f"power {left} ** {right} is out of range "
                            f"(exponent <= {MAX_POWER}, base <= {MAX_BASE:.0e})")
        value = OPS[type(node.op)](left, right)
        if isinstance(value, int) and value.bit_length() > MAX_BITS:  # checked at every step: stays cheap
            raise ToolError(f"result has more than {MAX_BITS} bits")
        return value
    raise ToolError(f"unsupported expression element {type(node).__name__}")


def calculator(expression: str) -> str:
    """Evaluate + - * / // % ** and parentheses over numbers; nothing else is reachable."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r}") from None
    try:
        value = _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except ToolError:
        raise
    except (OverflowError, ValueError) as e:
        raise ToolError(f"out of range: {e}") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("result is not finite")
        if value.is_integer():
            value = int(value)
        else:
            return f"{value:.6g}"
    return str(value)


def run_call(call: str) -> str:
    """`mul 6 7` -> `42`; `calc 2 * (3 + 4)` or `2 * (3 + 4)` -> `14`; anything else -> `error: ...`."""
    words = call.split()
    try:
        if not words:
            raise ToolError("empty call")
        name, args = words[0].lower(), words[1:]
        if name in WORDS:
            if len(args) != 2:
                raise ToolError(f"{name} takes 2 numbers, got {len(args)}")
            return calculator(f"({args[0]}) {WORDS[name]} ({args[1]})")
        if name in ("calc", "calculator"):
            return calculator(" ".join(args))
        return calculator(call)
    except ToolError as e:
        return f"error: {e}"
