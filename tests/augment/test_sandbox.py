"""The sandbox stops every escape we know of, each with a specific error, and changes nothing outside.

Each escape runs twice where it makes sense: with the static check (layer 1, no process started), and
with `static_check=False`, to show that the runtime layers (restricted builtins, module proxies, the
audit hook, rlimits) stop it on their own. Every case checks that a canary file kept its contents and
mtime, that no file appeared next to it or in our working directory, and that the sandbox removed its
temporary directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmcycle.core.errors import UserError
from llmcycle.augment.sandbox import DEFAULT_ALLOWED, check_program, isolation, run_program

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX rlimits")

LIMITS = dict(timeout_s=10, cpu_s=3, memory_mb=128)


class World:
    """What a program must not touch: a canary file, the folder around it, our working directory."""

    def __init__(self, tmp_path: Path):
        self.watched = tmp_path / "watched"
        self.watched.mkdir()
        self.canary = self.watched / "canary.txt"
        self.canary.write_text("untouched")
        os.utime(self.canary, (1_000_000_000, 1_000_000_000))
        self.parent = tmp_path / "sandboxes"  # where run_program makes its temporary directories
        self.parent.mkdir()
        self.before = self.snapshot()

    def snapshot(self):
        return (sorted(p.name for p in self.watched.iterdir()), self.canary.read_text(),
                self.canary.stat().st_mtime_ns, "pwned" in os.listdir(os.getcwd()))

    def code(self, template: str) -> str:
        return template.replace("CANARY", str(self.canary)).replace("WATCHED", str(self.watched))

    def run(self, template: str, **kw):
        return run_program(self.code(template), tmp_parent=str(self.parent), **{**LIMITS, **kw})

    def assert_untouched(self):
        assert self.snapshot() == self.before
        assert list(self.parent.iterdir()) == []  # the sandbox's temporary directory is gone


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.assert_untouched()


# (case id, program, expected error) for layer 1; every program would do harm if it ran.
STATIC_ESCAPES = [
    ("import-os", "import os\nos.system('touch WATCHED/pwned')", "forbidden import 'os' (line 1)"),
    ("import-subprocess", "import subprocess\nsubprocess.run(['touch', 'WATCHED/pwned'])",
     "forbidden import 'subprocess' (line 1)"),
    ("import-socket", "import socket\nsocket.create_connection(('10.0.0.1', 80))",
     "forbidden import 'socket' (line 1)"),
    ("import-ctypes", "import ctypes\nctypes.CDLL(None).system(b'touch WATCHED/pwned')",
     "forbidden import 'ctypes' (line 1)"),
    ("from-os-import", "from os import system\nsystem('touch WATCHED/pwned')", "forbidden import 'os' (line 1)"),
    ("import-in-function", "def f():\n    import shutil\n    shutil.rmtree('WATCHED')\nf()",
     "forbidden import 'shutil' (line 2)"),
    ("import-string-formatter", "import string\nstring.Formatter().get_field('0.__class__', [1], {})",
     "forbidden import 'string' (line 1)"),
    ("import-operator-attrgetter", "import operator\nprint(operator.attrgetter('__class__')(1))",
     "forbidden import 'operator' (line 1)"),
    ("open-write", "open('CANARY', 'w').write('pwned')", "forbidden builtin 'open' (line 1)"),
    ("read-etc-passwd", "x = 1\nprint(open('/etc/passwd').read())", "forbidden builtin 'open' (line 2)"),
    ("fork-bomb", "import os\nwhile True:\n    os.fork()", "forbidden import 'os' (line 1)"),
    ("dunder-import", "__import__('os').system('touch WATCHED/pwned')", "forbidden name '__import__' (line 1)"),
    ("builtins-name", "print(__builtins__)", "forbidden name '__builtins__' (line 1)"),
    ("subclasses", "print(().__class__.__base__.__subclasses__())", "forbidden attribute '__class__' (line 1)"),
    ("getattr-import", "getattr(__builtins__, '__im' + 'port__')('os').system('touch WATCHED/pwned')",
     "forbidden builtin 'getattr' (line 1)"),
    ("builtin-importer", "[c for c in ().__class__.__mro__[1].__subclasses__() if c.__name__ == "
     "'BuiltinImporter'][0].load_module('os').system('touch WATCHED/pwned')",
     "forbidden attribute '__class__' (line 1)"),
    ("generator-frames", "def g():\n    yield 1\nx = g()\nprint(x.gi_frame.f_back.f_globals)",
     "forbidden attribute 'gi_frame' (frame and code internals) (line 4)"),
    ("code-object", "f = type(lambda: 0)\nprint(f((lambda: 0).__code__, {}))", "forbidden attribute '__code__' (line 2)"),
    ("type-three-args", "C = type('C', (), {'x': 1})", "forbidden use of 'type'"),
    ("type-alias", "t = type\nprint(t('C', (), {}))", "forbidden use of 'type' (only type(x) is allowed"),
    ("breakpoint", "breakpoint()", "forbidden builtin 'breakpoint' (line 1)"),
    ("help", "help()", "forbidden builtin 'help' (line 1)"),
    ("eval", "eval(\"__import__('os').system('touch WATCHED/pwned')\")", "forbidden builtin 'eval' (line 1)"),
    ("exec", "exec('import os')", "forbidden builtin 'exec' (line 1)"),
    ("exec-alias", "run = [exec][0]\nrun('import os')", "forbidden builtin 'exec' (line 1)"),
    ("compile", "code = compile('1', 'x', 'eval')", "forbidden builtin 'compile' (line 1)"),
    ("globals", "globals()['__builtins__']", "forbidden builtin 'globals' (line 1)"),
    ("vars", "print(vars())", "forbidden builtin 'vars' (line 1)"),
    ("memoryview", "print(memoryview(b'x'))", "forbidden builtin 'memoryview' (line 1)"),
    ("format-attribute", "print('{0.__class__}'.format(1))",
     "format field '{0.__class__}' reaches an attribute or item (line 1)"),
    ("format-nested-spec", "print('{0:{1.__class__}}'.format(1, 2))", "reaches an attribute or item (line 1)"),
    ("format-non-literal", "t = '{0.__cl' + 'ass__}'\nprint(t.format(1))",
     "'.format' is only allowed on a literal string (format strings can reach attributes) (line 2)"),
    ("format-map", "print('{x}'.format_map({'x': 1}))", "forbidden call '.format_map'"),
    ("fstring-attribute", "print(f'{(1).__class__}')", "forbidden attribute '__class__' (line 1)"),
    ("print-self-builtins", "print.__self__.open('CANARY', 'w')", "forbidden attribute '__self__' (line 1)"),
    ("match-class-attribute", "match 1:\n    case int(__class__=c):\n        print(c)",
     "forbidden attribute '__class__' (line 2)"),
    ("unicode-dunder", "print(().__\uff43\uff4c\uff41\uff53\uff53__)", "forbidden attribute '__class__' (line 1)"),
    ("private-attribute", "import re\nprint(re._compiler)", "forbidden attribute '_compiler' (line 2)"),
    ("traceback-frames", "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__)",
     "forbidden attribute '__traceback__' (line 4)"),
]


@pytest.mark.parametrize("code,expected", [c[1:] for c in STATIC_ESCAPES], ids=[c[0] for c in STATIC_ESCAPES])
def test_static_check_stops_escape(world, code, expected):
    res = world.run(code)
    assert (res.ok, res.failure, res.answer) == (False, "forbidden", None)
    assert expected in res.error, res.error


# The same kinds of escape with layer 1 switched off: the child process must stop them by itself.
RUNTIME_ESCAPES = [
    ("import-os", "import os\nos.system('touch WATCHED/pwned')", "forbidden", "forbidden import 'os'"),
    ("import-socket", "import socket", "forbidden", "forbidden import 'socket'"),
    ("import-caught", "try:\n    import os\nexcept ImportError:\n    pass\nprint(42)", "forbidden",
     "forbidden import 'os'"),
    ("open-absent", "open('CANARY', 'w').write('pwned')", "error", "NameError: name 'open' is not defined (line 1)"),
    ("eval-absent", "eval('1 + 1')", "error", "NameError: name 'eval' is not defined (line 1)"),
    ("real-open-write", "print.__self__.open('CANARY', 'w').write('pwned')", "forbidden", "blocked by sandbox: open"),
    ("real-open-passwd", "print(print.__self__.open('/etc/passwd').read())", "forbidden", "blocked by sandbox: open"),
    ("real-import-system", "print.__self__.__import__('os').system('touch WATCHED/pwned')", "forbidden",
     "blocked by sandbox: os.system"),
    ("real-import-ctypes", "print.__self__.__import__('ctypes')", "forbidden", "forbidden import 'ctypes'"),
    ("fork", "print.__self__.__import__('os').fork()", "forbidden", "blocked by sandbox: os.fork"),
    ("mkfifo-unaudited", "print.__self__.__import__('os').mkfifo('WATCHED/pwned')", "error",
     "has no attribute 'mkfifo'"),
    ("subclasses-wrap-close", "w = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "
     "'_wrap_close'][0]\nw.__init__.__globals__['system']('touch WATCHED/pwned')", "forbidden",
     "blocked by sandbox: os.system"),
    ("builtin-importer", "imp = [c for c in ().__class__.__mro__[1].__subclasses__() if c.__name__ == "
     "'BuiltinImporter'][0]\nimp.load_module('posix').system('touch WATCHED/pwned')", "forbidden",
     "blocked by sandbox"),
    ("generator-frames", "def g():\n    yield 1\nx = g()\nprint(x.gi_frame.f_back.f_globals)", "forbidden",
     "blocked by sandbox: object.__getattr__ 'gi_frame'"),
    ("traceback-frames", "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__.tb_frame.f_globals)",
     "forbidden", "blocked by sandbox: object.__getattr__ 'tb_frame'"),
    ("code-object", "f = lambda: 0\nprint(type(f)(f.__code__, {}))", "forbidden",
     "blocked by sandbox: object.__getattr__ '__code__'"),
    ("real-breakpoint", "print.__self__.breakpoint()", "forbidden", "blocked by sandbox: builtins.breakpoint"),
    ("module-leak", "import fractions\nprint(fractions.sys.modules['os'])", "error",
     "module 'fractions' has no attribute 'sys'"),
    ("update-wrapper", "import functools\nfunctools.update_wrapper", "error",
     "module 'functools' has no attribute 'update_wrapper'"),
]


@pytest.mark.parametrize("code,failure,expected", [c[1:] for c in RUNTIME_ESCAPES],
                         ids=[c[0] for c in RUNTIME_ESCAPES])
def test_runtime_layers_stop_escape_without_static_check(world, code, failure, expected):
    res = world.run(code, static_check=False)
    assert (res.ok, res.failure, res.answer) == (False, failure, None), res
    assert expected in res.error, res.error


def test_ten_gigabytes_hits_the_memory_limit(world):
    res = world.run("x = bytearray(10 * 1024 ** 3)\nprint(len(x))", memory_mb=64)
    assert (res.ok, res.failure, res.error) == (False, "memory", "memory limit 64 MB exceeded")
    assert res.wall_s < 5


def test_growing_memory_hits_the_limit(world):
    res = world.run("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)", memory_mb=64)
    assert (res.ok, res.failure) == (False, "memory") and res.wall_s < 5


def test_endless_loop_hits_the_cpu_limit(world):
    res = world.run("while True:\n    pass", cpu_s=1, timeout_s=20)
    assert (res.ok, res.failure, res.error) == (False, "cpu", "cpu time limit 1 s exceeded")
    assert res.wall_s < 15  # one CPU second; the wall clock depends on how busy the machine is


def test_wall_clock_timeout_kills_the_process(world):
    res = world.run("print('started')\nwhile True:\n    pass", cpu_s=60, timeout_s=1)
    assert (res.ok, res.failure, res.error) == (False, "timeout", "time limit 1 s exceeded")
    assert res.stdout == "started\n"  # what it printed before the kill is kept
    assert res.wall_s < 5


def test_output_is_capped(world):
    res = world.run("while True:\n    print('x' * 1000)", stdout_limit=5000)
    assert (res.ok, res.failure) == (False, "output")
    assert res.error == "output limit of 5000 characters exceeded" and len(res.stdout) == 5000


LEGIT = [
    ("arithmetic", "print(48 / 2 + 48)", "72.0"),
    ("math", "import math\nprint(math.comb(5, 2) + math.factorial(3) + math.isqrt(17))", "20"),
    ("fractions", "from fractions import Fraction\nprint(Fraction(1, 3) + Fraction(1, 6))", "1/2"),
    ("decimal", "from decimal import Decimal\nprint(Decimal('0.1') + Decimal('0.2'))", "0.3"),
    ("statistics", "import statistics\nprint(statistics.median([3, 1, 2]), statistics.mean([1, 2]))", "2 1.5"),
    ("collections", "from collections import Counter, namedtuple\nP = namedtuple('P', 'x y')\n"
     "print(Counter('abca').most_common(1)[0][1] + P(1, 2).y)", "4"),
    ("itertools-functools", "import itertools, functools\n@functools.lru_cache(None)\ndef fib(n):\n"
     "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
     "print(fib(30) + len(list(itertools.combinations(range(5), 2))))", "832050"),
    ("re-datetime", "import re, datetime\nd = datetime.datetime.strptime('2024-03-01', '%Y-%m-%d')\n"
     "print((d - datetime.timedelta(days=1)).day + len(re.findall(r'\\d', 'a1b2')))", "31"),
    ("class-and-main", "class Shop:\n    def __init__(self, price):\n        self.price = price\n"
     "    def total(self, n):\n        return self.price * n\n\nif __name__ == '__main__':\n"
     "    print('working')\n    print(f'{Shop(2.5).total(4):.1f}', '{:>3}'.format(7))", "10.0   7"),
]


@pytest.mark.parametrize("code,answer", [c[1:] for c in LEGIT], ids=[c[0] for c in LEGIT])
def test_legit_programs_print_the_right_answer(world, code, answer):
    res = world.run(code)
    assert (res.ok, res.error, res.failure, res.answer) == (True, None, None, answer), res
    assert res.stdout.endswith(answer + "\n")


def test_program_error_is_one_line_with_the_line_number(world):
    res = world.run("print(1)\nx = 1 / 0")
    assert (res.ok, res.failure, res.answer, res.stdout) == (False, "error", None, "1\n")
    assert res.error == "ZeroDivisionError: division by zero (line 2)"


@pytest.mark.parametrize("static", [True, False])
def test_syntax_error(world, static):
    res = world.run("x = 1\nprint(", static_check=static)
    assert (res.ok, res.failure) == (False, "syntax") and "syntax error" in res.error
    if static:
        assert res.error.endswith("(line 2)")


def test_check_program_lists_every_problem_in_order():
    assert check_program("import math\nprint(math.pi)") == []
    assert check_program("import os\nx = eval('1')\ny = ().__class__") == [
        "forbidden import 'os' (line 1)", "forbidden builtin 'eval' (line 2)",
        "forbidden attribute '__class__' (line 3)"]
    assert check_program("import json", allowed_modules=DEFAULT_ALLOWED | {"json"}) == []


def test_whitelisting_a_dangerous_module_is_refused():
    with pytest.raises(UserError, match="'os' cannot be whitelisted"):
        run_program("print(1)", allowed_modules={"math", "os"})
    with pytest.raises(UserError, match="must be positive"):
        run_program("print(1)", timeout_s=0)


def test_isolation_is_probed_once():
    iso = isolation()
    assert set(iso) == {"prefix", "chroot_user"} and isolation() is iso
    if os.geteuid() != 0:
        assert iso["chroot_user"] is None  # only root can chroot and drop to nobody


def test_child_runs_under_resource_limits(world):
    # Reaching the real `resource` module needs layer 1 off; reading limits is not an audited event.
    res = world.run("r = print.__self__.__import__('resource')\n"
                    "print([r.getrlimit(n) for n in (r.RLIMIT_CPU, r.RLIMIT_AS, r.RLIMIT_NPROC, "
                    "r.RLIMIT_FSIZE, r.RLIMIT_NOFILE, r.RLIMIT_CORE)])",
                    static_check=False, cpu_s=2, memory_mb=96)
    mb = 1024 * 1024
    assert res.ok, res
    assert res.answer == str([(2, 3), (96 * mb, 96 * mb), (0, 0), (mb, mb), (32, 32), (0, 0)])


def test_root_child_is_chrooted_as_nobody(world):
    if not isolation()["chroot_user"]:
        pytest.skip("chroot and the drop to nobody need root (and a container that allows them)")
    res = world.run("os = print.__self__.__import__('os')\n"
                    "print(os.getuid(), os.getgid(), os.getcwd(), os.path.exists('/etc/passwd'))",
                    static_check=False)
    assert res.ok, res
    assert res.answer == f"{isolation()['chroot_user'][0]} {isolation()['chroot_user'][1]} / False"


def test_parent_stops_a_flood_that_bypasses_the_childs_output_cap(world):
    res = world.run("os = print.__self__.__import__('os')\nwhile True:\n    os.write(1, b'x' * 10000)",
                    static_check=False, stdout_limit=1000, timeout_s=20)
    assert (res.ok, res.failure, res.error) == (False, "output", "output limit of 1000 characters exceeded")
    assert res.stdout == "x" * 1000 and res.wall_s < 10  # killed at once, not at the 20 s timeout
