"""A small, safe evaluator for MorpheusML math expressions (the muParser dialect Morpheus uses).

Morpheus attributes such as ``Contact/@value``, ``DirectedMotion/@direction``, ``InitCircle``'s
``Dimensions/@radius`` or ``VolumeConstraint/@target`` are expressions, e.g.
``sign(size.x/2-cell.center.x)*((cell.center.x<size.x*0.4)or(cell.center.x>size.x*0.6)), 0.0, 0.0``.
This module parses them with a recursive-descent parser (no ``eval``) and evaluates them against a dict of
symbol values (``{"size.x": 149.0, "cell.center.x": 12.5, ...}``). Vector expressions are comma-separated
components.

Supported: numbers, ``+ - * / ^``, unary ``- + !``, comparisons ``< <= > >= == !=``, logic ``and or xor``
(also ``&& ||``), the ternary ``c ? a : b``, ``if(c, a, b)`` and the functions ``sign abs sqrt exp ln log
log10 log2 sin cos tan asin acos atan sinh cosh tanh floor ceil rint min max pow mod``. Truth values are
1.0/0.0 as in muParser. An unknown symbol raises :class:`ExprError` naming it.
"""

from __future__ import annotations

import math
import re

__all__ = ["ExprError", "evaluate", "evaluate_vector", "parse", "split_vector", "symbols_of"]


class ExprError(ValueError):
    """A malformed expression or an unknown symbol/function."""


_TOKEN = re.compile(r"""
    (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*)
  | (?P<op>&&|\|\||<=|>=|==|!=|[-+*/^()<>!?:,])
  | (?P<ws>\s+)
""", re.VERBOSE)


def _sign(x):
    return float((x > 0) - (x < 0))


_FUNCS = {
    "sign": (1, _sign), "abs": (1, abs), "sqrt": (1, math.sqrt), "exp": (1, math.exp), "ln": (1, math.log),
    "log": (1, math.log), "log10": (1, math.log10), "log2": (1, math.log2), "sin": (1, math.sin),
    "cos": (1, math.cos), "tan": (1, math.tan), "asin": (1, math.asin), "acos": (1, math.acos),
    "atan": (1, math.atan), "sinh": (1, math.sinh), "cosh": (1, math.cosh), "tanh": (1, math.tanh),
    "floor": (1, math.floor), "ceil": (1, math.ceil), "rint": (1, lambda x: float(round(x))),
    "min": (2, min), "max": (2, max), "pow": (2, math.pow), "mod": (2, math.fmod),
    "if": (3, None),
}
_CONSTS = {"pi": math.pi, "_pi": math.pi, "_e": math.e, "true": 1.0, "false": 0.0}


def _tokens(text: str):
    pos, out = 0, []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExprError(f"cannot parse expression {text!r} at {text[pos:pos + 10]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        val = m.group(kind)
        if kind == "name" and val in ("and", "or", "xor", "not"):
            kind, val = "op", {"and": "&&", "or": "||", "xor": "xor", "not": "!"}[val]
        out.append((kind, val))
    return out


class _Parser:
    # precedence climbing: ?: < || < xor < && < comparisons < +- < */ < unary < ^
    def __init__(self, text):
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self, val=None):
        tok = self.peek()
        if tok[0] is None or (val is not None and tok[1] != val):
            raise ExprError(f"expected {val or 'a token'} in expression {self.text!r}")
        self.i += 1
        return tok

    def parse(self):
        node = self.ternary()
        if self.i != len(self.toks):
            raise ExprError(f"unexpected {self.peek()[1]!r} in expression {self.text!r}")
        return node

    def ternary(self):
        cond = self.binary(0)
        if self.peek() == ("op", "?"):
            self.take("?")
            a = self.ternary()
            self.take(":")
            b = self.ternary()
            return ("if", cond, a, b)
        return cond

    _LEVELS = (("||",), ("xor",), ("&&",), ("<", "<=", ">", ">=", "==", "!="), ("+", "-"), ("*", "/"))

    def binary(self, level):
        if level == len(self._LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while self.peek()[0] == "op" and self.peek()[1] in self._LEVELS[level]:
            op = self.take()[1]
            node = ("bin", op, node, self.binary(level + 1))
        return node

    def unary(self):
        tok = self.peek()
        if tok == ("op", "-"):
            self.take()
            return ("neg", self.unary())
        if tok == ("op", "+"):
            self.take()
            return self.unary()
        if tok == ("op", "!"):
            self.take()
            return ("not", self.unary())
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == ("op", "^"):
            self.take()
            return ("bin", "^", base, self.unary())  # right-associative
        return base

    def atom(self):
        kind, val = self.take()
        if kind == "num":
            return ("num", float(val))
        if kind == "name":
            if self.peek() == ("op", "("):
                self.take("(")
                args = [self.ternary()]
                while self.peek() == ("op", ","):
                    self.take(",")
                    args.append(self.ternary())
                self.take(")")
                if val not in _FUNCS:
                    raise ExprError(f"unknown function {val!r} in expression {self.text!r}")
                if len(args) != _FUNCS[val][0] and not (val in ("min", "max") and len(args) >= 2):
                    raise ExprError(f"function {val!r} takes {_FUNCS[val][0]} arguments in {self.text!r}")
                if val == "if":
                    return ("if", *args)
                return ("call", val, args)
            return ("sym", val)
        if val == "(":
            node = self.ternary()
            self.take(")")
            return node
        raise ExprError(f"unexpected {val!r} in expression {self.text!r}")


def parse(text: str):
    """Parse one scalar expression into a tuple tree."""
    return _Parser(str(text)).parse()


def _eval(node, env):
    tag = node[0]
    if tag == "num":
        return node[1]
    if tag == "sym":
        name = node[1]
        if name in env:
            return float(env[name])
        if name in _CONSTS:
            return _CONSTS[name]
        raise ExprError(f"unknown symbol {name!r}")
    if tag == "neg":
        return -_eval(node[1], env)
    if tag == "not":
        return float(not _eval(node[1], env))
    if tag == "if":
        return _eval(node[2], env) if _eval(node[1], env) else _eval(node[3], env)
    if tag == "call":
        f = _FUNCS[node[1]][1]
        return float(f(*[_eval(a, env) for a in node[2]]))
    op, a, b = node[1], _eval(node[2], env), _eval(node[3], env)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b if b != 0 else (math.copysign(math.inf, a) if a != 0 else math.nan)
    if op == "^":
        return a ** b
    if op == "<":
        return float(a < b)
    if op == "<=":
        return float(a <= b)
    if op == ">":
        return float(a > b)
    if op == ">=":
        return float(a >= b)
    if op == "==":
        return float(a == b)
    if op == "!=":
        return float(a != b)
    if op == "&&":
        return float(bool(a) and bool(b))
    if op == "||":
        return float(bool(a) or bool(b))
    if op == "xor":
        return float(bool(a) != bool(b))
    raise ExprError(f"unknown operator {op!r}")  # pragma: no cover


def evaluate(text: str, env: dict | None = None) -> float:
    """Evaluate a scalar expression. ``env`` maps symbol names (``"size.x"``) to numbers."""
    return _eval(parse(text), env or {})


def split_vector(text: str) -> list[str]:
    """Split a vector expression ``"a, b, c"`` at its top-level commas (not those inside function calls)."""
    parts, depth, cur = [], 0, []
    for ch in str(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def evaluate_vector(text: str, env: dict | None = None, n: int = 3) -> list[float]:
    """Evaluate a vector expression with ``n`` comma-separated components (missing ones are 0)."""
    comps = split_vector(text)
    if len(comps) > n:
        raise ExprError(f"vector expression {text!r} has {len(comps)} components, expected at most {n}")
    vals = [evaluate(c, env) for c in comps]
    return vals + [0.0] * (n - len(vals))


def symbols_of(text: str) -> set[str]:
    """Names of the symbols an expression (scalar or vector) refers to."""
    out = set()

    def walk(node):
        if node[0] == "sym":
            if node[1] not in _CONSTS:
                out.add(node[1])
        elif node[0] in ("neg", "not"):
            walk(node[1])
        elif node[0] == "if":
            for n in node[1:]:
                walk(n)
        elif node[0] == "call":
            for n in node[2]:
                walk(n)
        elif node[0] == "bin":
            walk(node[2])
            walk(node[3])

    for comp in split_vector(text):
        walk(parse(comp))
    return out
