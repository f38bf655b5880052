"""python/floodfilling/_kernels.pyi (typed stubs of the compiled extension) against the
bindings: a binding added, removed or changing its parameters without its stub fails here."""

import ast
import re
from pathlib import Path

import pytest

import floodfilling
from floodfilling import kernels as K

PACKAGE = Path(floodfilling.__file__).resolve().parent
STUB = PACKAGE / "_kernels.pyi"
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def stub_functions():
    """{name: [parameter names]} of the functions defined in the .pyi."""
    tree = ast.parse(STUB.read_text(), filename=str(STUB))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            names = [p.arg for p in a.posonlyargs + a.args]
            if a.vararg:
                names.append("*" + a.vararg.arg)
            names += [p.arg for p in a.kwonlyargs]
            if a.kwarg:
                names.append("**" + a.kwarg.arg)
            out[node.name] = names
    return out


def split_top_level(text):
    """Split at the commas outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def binding_parameters(name, func):
    """Parameter names from pybind11's ``name(arg: type, ...) -> type`` first docstring line,
    or None when there is none (e.g. an overloaded function)."""
    first = (func.__doc__ or "").lstrip().split("\n", 1)[0]
    if not first.startswith(name + "("):
        return None
    depth, end = 0, None
    for i, ch in enumerate(first[len(name):], start=len(name)):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            end = i
            break
    assert end is not None, first
    params = []
    for part in split_top_level(first[len(name) + 1:end]):
        if part in ("*", "/"):  # keyword-only / positional-only markers
            continue
        params.append(part.split(":", 1)[0].split("=", 1)[0].strip())
    return params


def test_split_and_signature_parsing():
    def f():
        pass

    f.__doc__ = ('f(a: typing.Annotated[collections.abc.Sequence[int], "FixedSize(3)"], '
                 'b: object, *, c: bool = False, **kwargs) -> tuple\n\nDoc.')
    assert binding_parameters("f", f) == ["a", "b", "c", "**kwargs"]
    f.__doc__ = "f() -> int"
    assert binding_parameters("f", f) == []
    f.__doc__ = "Overloaded function."
    assert binding_parameters("f", f) is None


def test_stub_is_valid_python_and_marker_ships():
    assert STUB.is_file()
    assert (PACKAGE / "py.typed").is_file()
    funcs = stub_functions()
    assert funcs and all(not n.startswith("__") for n in funcs)


@pytest.mark.skipif(not K.HAVE_NATIVE, reason="native extension not built")
def test_every_binding_has_a_stub_with_its_parameters():
    native = K._native()
    exported = {n for n in dir(native) if not n.startswith("__") and callable(getattr(native, n))}
    stubs = stub_functions()
    missing = sorted(exported - set(stubs))
    assert not missing, f"functions of floodfilling._kernels without a stub in {STUB}: {missing}"
    extra = set(stubs) - exported
    assert not extra, f"stubs in {STUB} of functions floodfilling._kernels lacks: {sorted(extra)}"
    checked = 0
    for name in sorted(exported):
        params = binding_parameters(name, getattr(native, name))
        if params is None:
            continue
        checked += 1
        assert stubs[name] == params, (
            f"{name}: the stub's parameters {stubs[name]} differ from the binding's {params}")
    assert checked == len(exported)  # every binding here has a single signature


@pytest.mark.skipif(not CSRC.is_dir(), reason="C++ sources not available")
def test_every_m_def_in_the_sources_has_a_stub():
    """Names from ``m.def("name"``, parameter names from the ``py::arg("...")`` that follow
    it up to the next ``m.def``."""
    stubs = stub_functions()
    text = "\n".join(p.read_text() for p in sorted(CSRC.glob("*.cpp")))
    defs = list(re.finditer(r'm\.def\(\s*"(\w+)"', text))
    assert len(defs) >= 10
    for i, m in enumerate(defs):
        name = m.group(1)
        assert name in stubs, f"csrc binds {name} but {STUB} has no stub for it"
        chunk = text[m.end():defs[i + 1].start() if i + 1 < len(defs) else len(text)]
        chunk = chunk.split("\n}", 1)[0]  # up to the end of the binding function
        args = re.findall(r'py::arg\("(\w+)"\)', chunk)
        if args:  # (no py::arg: no parameters, or unnamed ones; the runtime test checks those)
            assert stubs[name] == args, (
                f"{name}: stub parameters {stubs[name]} vs py::arg names {args} in csrc")
