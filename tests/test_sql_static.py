"""No SQL text is built from values: a static check over ``flowfix/`` and ``alembic/``.

The rule. The SQL handed to ``text()``, ``execute()``, ``exec_driver_sql()``,
``op.execute()``, ``context.execute()``, ``fetch*()`` or ``static_output()`` must be one of:

- a string literal, or a name bound to a module-level constant (checked by the same rule
  where it is defined);
- a composition (f-string, ``+``, ``%``, ``.format()``, ``.replace()``, ``str.join()``,
  a conditional) of such constants only;
- ``quote()`` or ``sql_literal()`` (flowfix.revision_helpers) of anything: an identifier
  quoted by PostgreSQL's rules, for names read from the catalog, or a string literal,
  for the DO blocks and ``--sql`` output that take no bind parameters;
- a local variable (or loop variable) whose every assignment obeys the same rule;
- a parameter of a function of the same module whose every call passes such a value, or a
  parameter of flowfix's SQL wrappers (``execute``, ``outside_transaction``,
  ``in_batches``, ``run_or_undo``: their callers are checked instead);
- the return value of a function of the same module that obeys the rule, given such
  arguments; a name imported from a flowfix module is checked where it is defined;
- the return value of a method of a *SQL record* class (``SQL_RECORDS``: a frozen
  dataclass of SQL pieces, such as :class:`flowfix.walk.Walk`), checked in its module
  with ``self``'s fields taken as safe, given such arguments: every construction of the
  class in ``flowfix/`` and ``alembic/`` is checked by the same rule instead.

Values are always bind parameters (``:name``). Anything else, a function parameter, an
attribute, a call, spliced into SQL text, fails this test with its file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: calls whose first argument is SQL text
SINKS = {"text", "execute", "exec_driver_sql", "fetch", "fetchval", "fetchrow", "executemany"}
#: flowfix's wrappers that run text arguments as SQL (their callers are checked): the name
#: and which positional arguments are SQL (and the keyword ``undo``)
WRAPPERS = {
    "outside_transaction": slice(1, None),
    "in_batches": slice(1, 3),
    "run_or_undo": slice(0, 1),
    "admin": slice(1, None),
    "statement": slice(1, 2),
}
#: the quoting functions of flowfix.sql (and their names in flowfix.revision_helpers): an
#: identifier, and a string literal (for DO blocks and --sql output, which take no parameters)
QUOTERS = {"quote_ident", "quote_qualified", "quote_literal", "quote", "sql_literal"}
COMPOSERS = {
    "format",
    "replace",
    "join",
    "strip",
    "rstrip",
    "lstrip",
    "lower",
    "upper",
    "items",
    "values",
    "keys",
    "splitlines",
}
PURE = {"zip", "enumerate", "sorted", "tuple", "list", "str"}
#: SQL record classes (name -> module): their fields are checked where they are built
SQL_RECORDS = {"Walk": "flowfix.walk"}
#: calls whose result is a number or a truth value: nothing to splice, whatever their argument
NOT_TEXT = {"bool", "int", "float", "len"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: SQL built from {self.what}"


_CHECKERS: dict[Path, Checker] = {}


def checker(path: Path) -> Checker:
    if path not in _CHECKERS:
        _CHECKERS[path] = Checker(path)
    return _CHECKERS[path]


def _module_path(module: str) -> Path | None:
    if not module.startswith("flowfix"):
        return None
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


class Checker:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.module_constants: dict[str, list[ast.expr]] = {}
        self.functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        self.classes = {n.name for n in self.tree.body if isinstance(n, ast.ClassDef)}
        self.imported: dict[str, tuple[str, str | None]] = {}  # local name -> (module, name or None)
        for node in self.tree.body:
            for target, value in _assignments(node):
                self.module_constants.setdefault(target, []).append(value)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if _module_path(f"{node.module}.{alias.name}"):
                        self.imported[alias.asname or alias.name] = (f"{node.module}.{alias.name}", None)
                    else:
                        self.imported[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = (alias.name, None)
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(self.tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent

    def violations(self) -> Iterator[Violation]:
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if name in SINKS and node.args:
                args: list[ast.expr] = [node.args[0]]
            elif name in WRAPPERS:
                args = [*node.args[WRAPPERS[name]], *(k.value for k in node.keywords if k.arg in ("undo", "sql"))]
            else:
                continue
            for arg in args:
                for problem in self.check(arg, self._function(node), set()):
                    yield Violation(str(self.path.relative_to(ROOT)), node.lineno, problem)

    def _function(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        cur: ast.AST | None = node
        while cur is not None and not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef)):
            cur = self.parents.get(cur)
        return cur

    def check(self, expr: ast.expr, scope: ast.AST | None, seen: frozenset[str] | set[str]) -> list[str]:
        """The reasons ``expr`` is not constants-only SQL (empty: it is)."""
        seen = frozenset(seen)
        if isinstance(expr, ast.Constant):
            return []
        if isinstance(expr, ast.Name):
            return self._name_ok(expr.id, scope, seen)
        if isinstance(expr, ast.JoinedStr):
            return [p for v in expr.values for p in self.check(v, scope, seen)]
        if isinstance(expr, ast.FormattedValue):
            return self.check(expr.value, scope, seen)
        if isinstance(expr, ast.BinOp):
            return self.check(expr.left, scope, seen) + self.check(expr.right, scope, seen)
        if isinstance(expr, ast.IfExp):
            return self.check(expr.body, scope, seen) + self.check(expr.orelse, scope, seen)
        if isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
            return [p for e in expr.elts for p in self.check(e, scope, seen)]
        if isinstance(expr, ast.Await):
            return self.check(expr.value, scope, seen)
        if isinstance(expr, ast.Starred):
            return self.check(expr.value, scope, seen)
        if isinstance(expr, ast.Dict):
            return [p for e in expr.values for p in self.check(e, scope, seen)]
        if isinstance(expr, (ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp)):
            # a loop variable used as it is is followed to what it iterates over (_local_assignments)
            elt = expr.value if isinstance(expr, ast.DictComp) else expr.elt
            return self.check(elt, scope, seen)
        if isinstance(expr, ast.Subscript):  # one of a constant's items: the constant is checked
            return self.check(expr.value, scope, seen)
        if isinstance(expr, ast.Call):
            return self._call_ok(expr, scope, seen)
        if isinstance(expr, ast.Attribute):
            if isinstance(expr.value, ast.Name) and expr.value.id in self.imported:
                module, name = self.imported[expr.value.id]
                path = _module_path(module if name is None else f"{module}.{name}")
                if path is not None:
                    return checker(path)._name_ok(expr.attr, None, frozenset())
            return self.check(expr.value, scope, seen)  # an attribute of a checked value
        return [f"an expression ({type(expr).__name__})"]

    def _call_ok(self, expr: ast.Call, scope: ast.AST | None, seen: frozenset[str]) -> list[str]:
        name = _name(expr.func)
        if name in QUOTERS or (name in NOT_TEXT and isinstance(expr.func, ast.Name)):
            return []
        if name == "text" and expr.args:
            return self.check(expr.args[0], scope, seen)
        if name == "bindparams" and isinstance(expr.func, ast.Attribute):  # values bound, not spliced
            return self.check(expr.func.value, scope, seen)
        if isinstance(expr.func, ast.Name) and name in self.classes:  # a record of checked values
            return [p for e in [*expr.args, *(k.value for k in expr.keywords)] for p in self.check(e, scope, seen)]
        if isinstance(expr.func, ast.Name) and name in self.imported and name not in self.functions:
            module, original = self.imported[name]
            path = _module_path(module)
            if path is not None and original is not None:
                other = checker(path)
                function = other.functions.get(original)
                if function is None:
                    return [] if original in other.classes else [f"a call of {original}()"]
                problems = []
                for ret in ast.walk(function):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        found = other.check(ret.value, function, frozenset({f"fn:{original}"}))
                        problems += self._given(expr, function, found, scope, seen)
                return problems
        method = self._record_method(expr, scope)
        if method is not None:
            owner, function = method
            problems = []
            for ret in ast.walk(function):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    found = owner.check(ret.value, function, frozenset({f"fn:{function.name}"}))
                    problems += self._given(expr, function, found, scope, seen, method=True)
            return problems
        if name in COMPOSERS and isinstance(expr.func, ast.Attribute):
            parts = [expr.func.value, *expr.args, *(k.value for k in expr.keywords)]
            return [p for e in parts for p in self.check(e, scope, seen)]
        if name in PURE and isinstance(expr.func, ast.Name):
            return [p for e in expr.args for p in self.check(e, scope, seen)]
        if isinstance(expr.func, ast.Name) and name in self.functions:
            # a helper of this module that returns SQL: its returns, and the arguments given here
            function = self.functions[name]
            problems: list[str] = []
            if f"fn:{name}" in seen:
                return problems
            for ret in ast.walk(function):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    problems += self._given(
                        expr, function, self.check(ret.value, function, seen | {f"fn:{name}"}), scope, seen
                    )
            return problems
        return [f"a call of {ast.unparse(expr.func)}()"]

    def _given(
        self,
        call: ast.Call,
        function: ast.FunctionDef | ast.AsyncFunctionDef,
        problems: list[str],
        scope: ast.AST | None,
        seen: frozenset[str],
        *,
        method: bool = False,
    ) -> list[str]:
        """``problems`` of what ``function`` returns, where "the parameter p" is replaced by
        the check of the argument ``call`` gives for p (``method``: ``self`` is not given)."""
        positional = [a.arg for a in [*function.args.posonlyargs, *function.args.args]][1 if method else 0 :]
        out: list[str] = []
        for problem in problems:
            if not problem.startswith("the parameter '"):
                out.append(problem)
                continue
            param = problem.split("'")[1]
            given = [k.value for k in call.keywords if k.arg == param]
            if param in positional and positional.index(param) < len(call.args):
                given.append(call.args[positional.index(param)])
            defaults = function.args.defaults
            if not given and param in positional and positional.index(param) >= len(positional) - len(defaults):
                given.append(defaults[positional.index(param) - (len(positional) - len(defaults))])
            for k, d in zip(function.args.kwonlyargs, function.args.kw_defaults, strict=True):
                if not given and k.arg == param and d is not None:
                    given.append(d)
            out += [p for value in given for p in self.check(value, scope, seen)] if given else [problem]
        return out

    def _name_ok(self, name: str, scope: ast.AST | None, seen: frozenset[str]) -> list[str]:
        key = f"{id(scope)}:{name}"
        if key in seen:
            return []  # a cycle: its other values are checked
        local = list(_local_assignments(scope, name)) if scope is not None else []
        if local:
            return [p for value in local for p in self.check(value, scope, seen | {key})]
        if scope is not None and name in _parameters(scope):
            return self._parameter_ok(scope, name)
        enclosing = self._function(self.parents[scope]) if scope is not None and scope in self.parents else None
        if enclosing is not None:  # a closure's variable
            return self._name_ok(name, enclosing, seen)
        if scope is None:
            comprehended = [
                g.iter
                for g in ast.walk(self.tree)
                if isinstance(g, ast.comprehension)
                and self._function(g) is None
                and any(isinstance(t, ast.Name) and t.id == name for t in ast.walk(g.target))
            ]
            if comprehended and name not in self.module_constants:
                return [p for value in comprehended for p in self.check(value, None, seen | {key})]
        if name in self.module_constants:
            return [p for value in self.module_constants[name] for p in self.check(value, None, seen | {key})]
        if name in self.imported:
            module, original = self.imported[name]
            path = _module_path(module)
            if path is not None and original is not None:
                return checker(path)._name_ok(original, None, frozenset())
        return [f"the name '{name}'"]

    def _record_method(
        self, call: ast.Call, scope: ast.AST | None
    ) -> tuple[Checker, ast.FunctionDef | ast.AsyncFunctionDef] | None:
        """The method of a SQL record class that ``call`` calls, if its receiver is such a
        record: ``self`` in one of the class's methods, a parameter annotated with the
        class, or a module constant built by the class."""
        if not isinstance(call.func, ast.Attribute) or not isinstance(call.func.value, ast.Name):
            return None
        receiver = call.func.value.id
        for cls in SQL_RECORDS:
            if (receiver == "self" and self._record_class(scope) == cls) or self._annotated(scope, receiver) == cls:
                owner = checker(_module_path(SQL_RECORDS[cls]) or self.path)
                found = owner.method(cls, call.func.attr)
                if found is not None:
                    return owner, found
        return None

    def _annotated(self, scope: ast.AST | None, name: str) -> str | None:
        """The annotation of parameter ``name`` of ``scope`` or of a function enclosing it."""
        while isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = scope.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                if arg.arg == name:
                    return ast.unparse(arg.annotation).split(".")[-1] if arg.annotation is not None else None
            scope = self._function(self.parents[scope]) if scope in self.parents else None
        return None

    def _record_class(self, scope: ast.AST | None) -> str | None:
        parent = self.parents.get(scope) if scope is not None else None
        if isinstance(parent, ast.ClassDef) and parent.name in SQL_RECORDS:
            return parent.name
        return None

    def method(self, cls: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        for node in self.tree.body:
            if isinstance(node, ast.ClassDef) and node.name == cls:
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                        return item
        return None

    def constructions(self, cls: str) -> Iterator[Violation]:
        """Each argument of each ``cls(...)`` here that is not constants-only."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and _name(node.func) == cls:
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    for problem in self.check(arg, self._function(node), set()):
                        yield Violation(str(self.path.relative_to(ROOT)), node.lineno, f"{problem} (a {cls} field)")

    def _parameter_ok(self, scope: ast.AST, name: str) -> list[str]:
        """A parameter is SQL-safe if the function is a SQL wrapper (its callers are
        checked), or if every call of it in this module passes a safe value."""
        assert isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))
        if self._record_class(scope) is not None:  # a SQL record's method
            # self: its fields, checked where it is built; another parameter: the caller's
            return [] if name == "self" else [f"the parameter '{name}' of {scope.name}()"]
        if scope.name in SINKS or scope.name in WRAPPERS:
            return []
        if self.path.name != "revision_helpers.py" and scope.name in self.functions:
            args = scope.args
            positional = [a.arg for a in [*args.posonlyargs, *args.args]]
            problems: list[str] = []
            calls = 0
            for call in ast.walk(self.tree):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == scope.name:
                    calls += 1
                    given = [k.value for k in call.keywords if k.arg == name]
                    if name in positional and positional.index(name) < len(call.args):
                        given.append(call.args[positional.index(name)])
                    for value in given:
                        problems += self.check(value, self._function(call), frozenset({f"fn:{scope.name}"}))
            if calls:
                return problems
        return [f"the parameter '{name}' of {scope.name}()"]


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _assignments(node: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    if isinstance(node, ast.Assign):
        for target in node.targets:
            if isinstance(target, ast.Name):
                yield target.id, node.value
            elif isinstance(target, ast.Tuple):
                for element in target.elts:
                    if isinstance(element, ast.Name):
                        yield element.id, node.value
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) and node.value:
        yield node.target.id, node.value


def _local_assignments(scope: ast.AST, name: str) -> Iterator[ast.expr]:
    for node in ast.walk(scope):
        for target, value in _assignments(node):
            if target == name:
                yield value
        if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            iterated = node.iter
            if isinstance(iterated, ast.Call) and _name(iterated.func) in ("enumerate", "sorted", "list", "tuple"):
                iterated = iterated.args[0] if iterated.args else iterated
            target = node.target
            if isinstance(target, ast.Tuple) and isinstance(iterated, ast.Call) and _name(iterated.func) == "zip":
                # for a, b in zip(x, y): a is an item of x, b of y
                for element, source in zip(target.elts, iterated.args, strict=False):
                    if isinstance(element, ast.Name) and element.id == name:
                        yield source
                continue
            for t in ast.walk(target):
                if isinstance(t, ast.Name) and t.id == name:
                    yield node.iter


def _parameters(scope: ast.AST) -> set[str]:
    if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return set()
    a = scope.args
    every = [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]
    return {x.arg for x in every}


def all_violations() -> list[Violation]:
    files = sorted([*(ROOT / "flowfix").rglob("*.py"), *(ROOT / "alembic").rglob("*.py")])
    found = [v for f in files for v in checker(f).violations()]
    return found + [v for f in files for cls in SQL_RECORDS for v in checker(f).constructions(cls)]


def test_no_sql_text_is_built_from_values() -> None:
    found = all_violations()
    assert not found, "\n" + "\n".join(str(v) for v in found)


def test_the_check_catches_what_it_names(tmp_path: Path) -> None:
    """The checker itself: each way of splicing a value is found, each constant form passes."""
    bad = ROOT / "flowfix" / "_static_probe.py"
    bad.write_text(
        "from sqlalchemy import text\n"
        "from flowfix.revision_helpers import quote\n"
        "TABLE = 'data_imports'\n"
        "QUERY = f'SELECT * FROM {TABLE} WHERE id = :id'\n"
        "def ok(conn, name):\n"
        "    conn.execute(text(QUERY))\n"
        "    conn.execute(text(f'SELECT 1 FROM {quote(name)}'))\n"
        "    sql = 'SELECT ' + TABLE\n"
        "    conn.exec_driver_sql(sql)\n"
        "def bad(conn, schema, row):\n"
        "    conn.execute(text(f'SET search_path TO {schema}'))\n"
        "    conn.exec_driver_sql('SET lock_timeout = %s' % row.timeout)\n"
        "    conn.execute(text('ALTER TABLE t ADD CONSTRAINT c {}'.format(row['definition'])))\n"
        "    stmt = 'DROP TABLE ' + schema\n"
        "    conn.execute(stmt)\n"
    )
    try:
        found = list(Checker(bad).violations())
    finally:
        bad.unlink()
    assert sorted({v.line for v in found}) == [11, 12, 13, 15], found


def test_the_check_follows_sql_records() -> None:
    """A SQL record (flowfix.walk.Walk): a field built from a value, or a method given a
    value for its SQL, is found; constants and the catalog's quoted names pass."""
    probe = ROOT / "flowfix" / "_static_probe_record.py"
    probe.write_text(
        "from sqlalchemy import text\n"
        "from flowfix.sql import quote_qualified\n"
        "from flowfix.walk import Walk\n"
        "GOOD = Walk(table='t', work='UPDATE {table} r SET x = 1 WHERE {slice}', needs='r.x IS NULL')\n"
        "def built(needs):\n"
        "    return Walk(table='t', work='SELECT 1', needs=needs)\n"
        "def run(conn, spec: Walk, leaf, relation):\n"
        "    conn.execute(text(spec.by_pages(quote_qualified(leaf.schema, leaf.relname))))\n"
        "    conn.execute(text(spec.left()))\n"
        "    conn.execute(text(spec.by_pages(relation)))\n"
    )
    try:
        found = [*Checker(probe).violations(), *Checker(probe).constructions("Walk")]
    finally:
        probe.unlink()
        _CHECKERS.pop(probe, None)
    assert sorted({v.line for v in found}) == [6, 10], found
