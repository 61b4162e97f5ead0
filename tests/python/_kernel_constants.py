"""Numbers the CPU emulators of the CUDA kernels take from the C++/CUDA sources themselves.

The emulators (test_gemm_kernel_model.py, test_attention_decode_model.py) transcribe the kernels'
index math; their tile sizes and byte counts come from here, read out of csrc/, so a change of a
kernel constant cannot leave them green while they check the old design. Anything that cannot be
found or evaluated raises KernelConstantError (fails the module's import, so every test of it).

Understood: `[static] constexpr <int type> kName = <expr>;` lines, where <expr> is integer
arithmetic (+ - * / % << >> parentheses, casts like int64_t(x)) over literals and constants
defined earlier in the same list of files; and `using Name = TileConfig<a, b, ...>;` lines.
"""
from __future__ import annotations

import ast
import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"

_CONSTEXPR = re.compile(
    r"^[ \t]*(?:static[ \t]+)?constexpr[ \t]+(?:int|int64_t|int32_t|unsigned|uint32_t|size_t)[ \t]+"
    r"(k\w+)[ \t]*=[ \t]*([^;]+);",
    re.M,
)
_CASTS = {"int", "int64_t", "int32_t", "unsigned", "uint32_t", "size_t"}


class KernelConstantError(LookupError):
    pass


def read_source(rel_path: str) -> str:
    """The text of csrc/<rel_path> (tests monkeypatch this to feed the parser altered sources)."""
    path = CSRC / rel_path
    if not path.is_file():
        raise KernelConstantError(f"kernel source {path} not found")
    return path.read_text()


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _eval(expr: str, known: dict):
    """Integer value of a C++ constant expression, or None if it uses anything else."""
    expr = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", expr.strip())  # 65535LL -> 65535
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in known:
                raise KeyError(node.id)
            return known[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CASTS:
            if len(node.args) == 1 and not node.keywords:
                return ev(node.args[0])
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            op = type(node.op)
            if op in (ast.Div, ast.Mod):  # C++ integer division truncates toward zero
                q = abs(a) // abs(b)
                q = q if (a >= 0) == (b >= 0) else -q
                return q if op is ast.Div else a - b * q
            ops = {ast.Add: a.__add__, ast.Sub: a.__sub__, ast.Mult: a.__mul__, ast.LShift: a.__lshift__,
                   ast.RShift: a.__rshift__}
            if op in ops:
                return ops[op](b)
        raise ValueError(ast.dump(node))

    try:
        return ev(tree)
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def constants(*rel_paths: str) -> dict:
    """name -> value of the constexpr integer constants of the given csrc files, read in order (a
    header's constants can be used by the files after it). A name defined twice with different
    values is ambiguous and raises; constants whose value is not plain arithmetic are left out."""
    known, where = {}, {}
    for rel in rel_paths:
        for name, expr in _CONSTEXPR.findall(_strip_comments(read_source(rel))):
            value = _eval(expr, known)
            if value is None:
                continue
            if name in known and known[name] != value:
                raise KernelConstantError(
                    f"{name} is {known[name]} in {where[name]} but {value} in {rel}: ambiguous for the emulator")
            known[name], where[name] = value, rel
    return known


def require(table: dict, *names: str, source: str = "") -> tuple:
    """The values of `names` from a constants() table; raises naming every missing one."""
    missing = [n for n in names if n not in table]
    if missing:
        raise KernelConstantError(f"constants {missing} not found (or not plain integer arithmetic) in {source}")
    return tuple(table[n] for n in names)


def tile_configs(rel_path: str) -> dict:
    """name -> template arguments of every `using Name = TileConfig<...>;` in csrc/<rel_path>."""
    src = _strip_comments(read_source(rel_path))
    found = re.findall(r"using\s+(\w+)\s*=\s*TileConfig<([^<>]*)>\s*;", src)
    if not found:
        raise KernelConstantError(f"no `using Name = TileConfig<...>;` found in {rel_path}")
    out = {}
    for name, args in found:
        vals = [a.strip() for a in args.split(",")]
        if not all(re.fullmatch(r"\d+", v) for v in vals):
            raise KernelConstantError(f"TileConfig {name} in {rel_path} has non-literal arguments {vals}")
        out[name] = tuple(int(v) for v in vals)
    return out
