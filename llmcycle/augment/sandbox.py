"""Run an untrusted Python program (a model's answer to a word problem) and capture what it prints.

Program-aided LMs (PAL) let the model write a program and let Python do the arithmetic. The program
comes from a model, so it is treated as hostile. `run_program(code)` returns a SandboxResult: ok,
stdout, answer (the last printed line), error (one line: `forbidden import 'os' (line 1)`,
`time limit 2 s exceeded`, `memory limit 64 MB exceeded`, ...), wall_s, and failure (a short kind:
forbidden, syntax, timeout, cpu, memory, output, error or crash). No single layer is trusted; each
would have to fail for a program to do harm:

1. Static check (`check_program`, in the caller's process): the program is parsed with `ast` and
   rejected, with the line number, for imports outside the whitelist (math, fractions, decimal,
   itertools, statistics, functools, collections, re, datetime, ...); any attribute starting with `_`
   (`().__class__`, `print.__self__`) or naming frame/code internals (`gi_frame`, `f_back`,
   `tb_frame`, `co_code`: frame walking); dunder names (`__builtins__`, `__import__`; `__name__` is
   allowed for `if __name__ == "__main__":`); builtins that reach the interpreter or the outside
   (eval, exec, compile, open, globals, locals, vars, dir, getattr/setattr/delattr/hasattr, input,
   breakpoint, help, memoryview, exit, quit); `type` other than `type(x)` (3 arguments build
   classes); `.format_map`, and `.format` unless the template is a literal whose fields reach no
   attribute or item (`'{0.__class__}'.format(x)` is attribute access through a string); attribute
   names in `match` class patterns.
2. A fresh interpreter (`python -I -S -B`: no site, no user paths, no environment, no .pyc writes) in
   its own session, so a wall-clock timeout can kill the whole process group. It runs this file
   (`--sandbox-child`), which preloads the whitelisted modules and then:
   * gives the program a whitelisted `__builtins__` dict with an `__import__` that returns proxies of
     whitelisted modules only. A proxy holds a module's public attributes minus submodules that are
     not whitelisted (the real `fractions.sys`, `re.enum`, `statistics.random` reach `sys.modules`)
     and minus functions that read attributes named by strings (`functools.update_wrapper`, `wraps`,
     `singledispatch`);
   * sets resource limits: RLIMIT_CPU (SIGXCPU, then SIGKILL one second later), RLIMIT_AS (memory),
     RLIMIT_NPROC = 0 (no fork; root ignores it, hence the next point), RLIMIT_FSIZE, RLIMIT_NOFILE,
     RLIMIT_CORE = 0;
   * when started as root: chroot into its empty temporary directory and drop to user `nobody`, so
     even a program that escaped Python sees no other file and owns none;
   * installs an audit hook (PEP 578) that denies every event not known to be harmless: `os.system`,
     `os.fork`, `subprocess.Popen`, `socket.*`, `open`, any fresh `import`, `object.__getattr__`
     (frame and code attributes), `code.__new__`, `function.__new__`, `gc.*`, `sys.settrace`, ... A
     denial is written at once to stderr, so the run fails even when the program catches the error.
     os.mkfifo and os.mknod, which create files without an audit event, are deleted first.
3. No network: the child cannot import socket (layers 1, 2 and the audit hook), and where `unshare`
   works (root, or unprivileged user namespaces) it starts in a new, empty network namespace.
4. Working directory: a fresh temporary directory, removed afterwards; stdin is /dev/null; stdout is
   capped (the child stops the program at `stdout_limit` characters; the parent stops reading and
   kills a child that floods the pipe anyway).

Honest limits: layers 1 and 2 live in Python and the audit hook runs inside the child, so they share
a process with the program; a program that defeated layer 1 and found a way past the hook would face
only the OS layer: rlimits, the network namespace where available, and the chroot + `nobody` only when
run as root. Without the chroot, os.stat and os.readlink (not audited) would let such a program see
whether files exist outside its directory. The sandbox needs
a POSIX system (`resource`). The child can be run by hand, `python -I -S -B llmcycle/augment/sandbox.py
--sandbox-child`, in a folder holding the `.job.json` that run_program writes.
"""
from __future__ import annotations

import os
import sys
from collections import namedtuple

# math, fractions, decimal and friends cannot touch the outside world once proxied (see layer 2).
DEFAULT_ALLOWED = frozenset({
    "math", "cmath", "fractions", "decimal", "numbers", "itertools", "functools", "collections",
    "statistics", "re", "datetime", "heapq", "bisect", "random",
})
# Modules that reach files, processes, the interpreter's internals, or read attributes by name
# (operator.attrgetter, string.Formatter, typing's eval of string annotations): never whitelistable.
NEVER_ALLOWED = frozenset({
    "os", "sys", "subprocess", "socket", "ctypes", "importlib", "builtins", "io", "operator", "string",
    "gc", "inspect", "types", "typing", "pickle", "marshal", "shutil", "pathlib", "signal", "threading",
    "multiprocessing", "posix", "resource", "code", "codeop", "pty", "tempfile", "glob", "runpy", "ast",
    "dis", "traceback", "linecache", "pdb", "asyncio", "selectors", "select", "mmap", "pwd", "fcntl",
})
FORBIDDEN_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "globals", "locals", "vars", "dir", "getattr", "setattr",
    "delattr", "hasattr", "input", "breakpoint", "help", "memoryview", "exit", "quit", "copyright",
    "credits", "license",
})
# Attribute prefixes of generators, coroutines, frames, tracebacks and code objects: the way from an
# ordinary object to a frame's globals (gi_frame.f_back.f_globals).
INTERNAL_ATTR_PREFIXES = ("gi_", "cr_", "ag_", "f_", "tb_", "co_")
HIDDEN_ATTRS = {"functools": frozenset({"update_wrapper", "wraps", "singledispatch", "singledispatchmethod"}),
                "datetime": frozenset({"datetime_CAPI"})}
MAX_CODE_CHARS = 100_000
PROGRAM_FILE = "<program>"
JOB_FILE = ".job.json"
MARK = "\x00sandbox "  # prefixes the child's reports on stderr; the program cannot reach stderr


class SandboxResult(namedtuple("SandboxResult", "ok stdout answer error wall_s failure")):
    """ok: ran to the end without error; stdout: what it printed (capped); answer: the last non-empty
    printed line or None; error: one line or None; wall_s: seconds, start-up included; failure: None or
    forbidden | syntax | timeout | cpu | memory | output | error | crash."""
    __slots__ = ()


# -- layer 1: static check ---------------------------------------------------------------------------
def _format_problem(template: str) -> str | None:
    """Why a literal `.format` template is unsafe (a field reaching an attribute or item), or None."""
    import string

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"bad format string: {exc}"
    for _, field, spec, _ in parts:
        if field and any(c in field for c in ".["):
            return f"format field '{{{field}}}' reaches an attribute or item"
        if spec and "{" in spec:  # nested fields in the spec: `{0:{1.__class__}}`
            problem = _format_problem(spec)
            if problem:
                return problem
    return None


def _attr_problem(attr: str) -> str | None:
    if attr.startswith("_"):
        return f"forbidden attribute '{attr}'"
    if attr.startswith(INTERNAL_ATTR_PREFIXES):
        return f"forbidden attribute '{attr}' (frame and code internals)"
    return None


def _node_problem(node, parents: dict, allowed: frozenset) -> str | None:
    import ast

    if isinstance(node, ast.Import):
        bad = [a.name for a in node.names if a.name not in allowed]
        return f"forbidden import '{bad[0]}'" if bad else None
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return "relative imports are not allowed"
        if node.module not in allowed:
            return f"forbidden import '{node.module}'"
        private = [a.name for a in node.names if a.name.startswith("_")]
        return f"forbidden name '{private[0]}' imported from '{node.module}'" if private else None
    if isinstance(node, ast.Attribute):
        if node.attr == "format_map":
            return "forbidden call '.format_map' (format strings can reach attributes)"
        if node.attr == "format":
            if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                return "'.format' is only allowed on a literal string (format strings can reach attributes)"
            return _format_problem(node.value.value)
        return _attr_problem(node.attr)
    if isinstance(node, ast.MatchClass):  # `case int(__class__=c)` reads an attribute by name
        return next(filter(None, map(_attr_problem, node.kwd_attrs)), None)
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        dunder = [n for n in node.names if n.startswith("__")]
        return f"forbidden name '{dunder[0]}'" if dunder else None
    if isinstance(node, ast.Name):
        if node.id.startswith("__") and node.id.endswith("__") and node.id != "__name__":
            return f"forbidden name '{node.id}'"
        if node.id in FORBIDDEN_BUILTINS:
            return f"forbidden builtin '{node.id}'"
        if node.id == "type":
            call = parents.get(node)
            if not (isinstance(call, ast.Call) and call.func is node and len(call.args) == 1
                    and not call.keywords):
                return "forbidden use of 'type' (only type(x) is allowed; 3 arguments build classes)"
    return None


def _syntax_message(exc: Exception) -> str:
    line = getattr(exc, "lineno", None)
    return f"syntax error: {getattr(exc, 'msg', None) or exc}" + (f" (line {line})" if line else "")


def check_program(code: str, allowed_modules=DEFAULT_ALLOWED) -> list[str]:
    """Every static problem of `code`, in source order, each ending in `(line N)`; [] when clean."""
    import ast

    if len(code) > MAX_CODE_CHARS:
        return [f"program has {len(code)} characters, over the limit of {MAX_CODE_CHARS}"]
    try:
        tree = ast.parse(code, PROGRAM_FILE)
    except (SyntaxError, ValueError) as exc:
        return [_syntax_message(exc)]
    except (RecursionError, MemoryError) as exc:  # absurd nesting
        return [f"syntax error: program cannot be parsed ({type(exc).__name__})"]
    allowed = frozenset(allowed_modules)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    problems = []
    for node in ast.walk(tree):
        problem = _node_problem(node, parents, allowed)
        if problem:
            line = getattr(node, "lineno", None) or getattr(parents.get(node), "lineno", 0)
            # Nested attributes share a start column; the inner one ends first: report it first.
            where = (line, getattr(node, "col_offset", 0), getattr(node, "end_col_offset", 0) or 0)
            problems.append((*where, f"{problem} (line {line})"))
    return [p for *_, p in sorted(problems)]


# -- the caller's side: start the child, enforce the wall clock, read the verdict --------------------
def _validate_allowed(allowed_modules) -> frozenset:
    # imported here, not at the top: the child runs this file as a script, without the package
    from llmcycle.core.errors import UserError

    allowed = frozenset(allowed_modules)
    for name in sorted(allowed):
        top = name.partition(".")[0]
        if top in NEVER_ALLOWED or name in NEVER_ALLOWED:
            raise UserError(f"sandbox: module '{name}' cannot be whitelisted (it reaches files, processes "
                            f"or the interpreter's internals)")
        if not all(part.isidentifier() for part in name.split(".")):
            raise UserError(f"sandbox: '{name}' is not a module name")
        if "." in name and name.rpartition(".")[0] not in allowed:
            raise UserError(f"sandbox: whitelisting '{name}' needs its package "
                            f"'{name.rpartition('.')[0]}' whitelisted too")
    return allowed


_ISOLATION: dict | None = None


def isolation() -> dict:
    """What the OS offers here (probed once): `prefix`, a command that starts the child in a new network
    namespace (or []); `chroot_user`, (uid, gid) to chroot and drop to when running as root (or None)."""
    global _ISOLATION
    if _ISOLATION is None:
        import shutil
        import subprocess

        root = os.geteuid() == 0
        prefix: list[str] = []
        unshare = shutil.which("unshare")
        if unshare:
            cmd = [unshare, "--net"] if root else [unshare, "--map-root-user", "--net"]
            try:
                probe = subprocess.run([*cmd, sys.executable, "-I", "-S", "-c", "pass"],
                                       capture_output=True, timeout=20)
                prefix = cmd if probe.returncode == 0 else []
            except (OSError, subprocess.TimeoutExpired):
                prefix = []
        user = None
        if root:
            import pwd

            try:
                entry = pwd.getpwnam("nobody")
                user = (entry.pw_uid, entry.pw_gid)
            except KeyError:
                user = (65534, 65534)
            # Containers may deny chroot or setuid even to root: check that the child will be able to.
            probe = (f"import os; os.chroot('/'); os.setgroups([]); os.setgid({user[1]}); "
                     f"os.setuid({user[0]})")
            if subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True,
                              timeout=20).returncode != 0:
                user = None
        _ISOLATION = {"prefix": prefix, "chroot_user": user}
    return _ISOLATION


def _collect(proc, timeout_s: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read the child's stdout and stderr until both close; (out, err, cut) where cut is "timeout"
    when the wall clock ran out and "flood" when a pipe passed `cap` bytes (the child's own output
    cap was bypassed), so a runaway child can neither hang us nor fill our memory."""
    import selectors
    import time

    deadline = time.monotonic() + timeout_s
    data = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as sel:
        for pipe in data:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(data[proc.stdout]), bytes(data[proc.stderr]), "timeout"
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = data[key.fileobj]
                buf += chunk[:max(0, cap - len(buf))]
                if len(buf) >= cap:
                    return bytes(data[proc.stdout]), bytes(data[proc.stderr]), "flood"
    return bytes(data[proc.stdout]), bytes(data[proc.stderr]), None


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: this takes any helpers too
    except (ProcessLookupError, PermissionError):
        pass


def _verdict(out: bytes, err: bytes, returncode: int, cut: str | None, limits: dict) -> tuple:
    """(failure, error) from what the child left behind; (None, None) when it ran cleanly."""
    import json
    import signal

    reports = []
    for line in err.decode("utf-8", "replace").split("\n"):  # not splitlines: \x1c-\x1e split too
        if line.startswith(MARK):
            try:
                reports.append(json.loads(line[len(MARK):]))
            except ValueError:
                pass
    blocked = [r for r in reports if "blocked" in r]
    if blocked:  # a denied event fails the run even if the program caught the exception
        event, detail = blocked[0]["blocked"], blocked[0].get("detail")
        if event == "import":
            return "forbidden", f"forbidden import '{detail}'"
        return "forbidden", f"blocked by sandbox: {event}" + (f" {detail!r}" if detail else "")
    if cut == "timeout":
        return "timeout", f"time limit {limits['timeout_s']:g} s exceeded"
    if cut == "flood":
        return "output", f"output limit of {limits['stdout_limit']} characters exceeded"
    status = next((r for r in reversed(reports) if "status" in r), None)
    if status is not None:
        return (None, None) if status["status"] == "ok" else (status["failure"], status["error"])
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "cpu", f"cpu time limit {limits['cpu_s']} s exceeded"
    text = err.decode("utf-8", "replace")
    if "MemoryError" in text:
        return "memory", f"memory limit {limits['memory_mb']} MB exceeded"
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    return "crash", f"sandbox process died (exit status {returncode}): {last[:200]}"


def run_program(code: str, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 256,
                allowed_modules=DEFAULT_ALLOWED, stdout_limit: int = 10_000, static_check: bool = True,
                tmp_parent: str | None = None) -> SandboxResult:
    """Run `code` in the sandbox and return what it printed. `static_check=False` skips layer 1; it
    exists so tests can show that the runtime layers stop escapes on their own. `tmp_parent` is where
    the temporary working directory is made (the system's temp folder by default)."""
    import importlib.util
    import json
    import math
    import shutil
    import subprocess
    import tempfile
    import time

    from llmcycle.core.errors import UserError

    if timeout_s <= 0 or cpu_s <= 0 or memory_mb <= 0 or stdout_limit <= 0:
        raise UserError("sandbox: timeout_s, cpu_s, memory_mb and stdout_limit must be positive")
    if importlib.util.find_spec("resource") is None:  # the child needs it; fail here, clearly
        raise UserError("the sandbox needs a POSIX system (the `resource` module)")
    allowed = _validate_allowed(allowed_modules)
    start = time.perf_counter()
    if static_check:
        problems = check_program(code, allowed)
        if problems:
            failure = "syntax" if problems[0].startswith("syntax error") else "forbidden"
            return SandboxResult(False, "", None, problems[0], time.perf_counter() - start, failure)
    iso = isolation()
    limits = {"timeout_s": timeout_s, "cpu_s": math.ceil(cpu_s), "memory_mb": int(memory_mb)}
    workdir = tempfile.mkdtemp(prefix="llmcycle-sandbox-", dir=tmp_parent)
    try:
        job = {"code": code, "allowed": sorted(allowed), "stdout_limit": stdout_limit,
               "chroot_user": iso["chroot_user"], **limits}
        with open(os.path.join(workdir, JOB_FILE), "w", encoding="utf-8") as f:
            json.dump(job, f)
        if iso["chroot_user"]:
            os.chown(workdir, *iso["chroot_user"])  # the program's cwd, writable by nobody only
        cmd = [*iso["prefix"], sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--sandbox-child"]
        proc = subprocess.Popen(cmd, cwd=workdir, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        try:
            out, err, cut = _collect(proc, timeout_s, cap=4 * stdout_limit + 65536)
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failure, error = _verdict(out, err, proc.returncode, cut, {**limits, "stdout_limit": stdout_limit})
    stdout = out.decode("utf-8", "replace")[:stdout_limit]
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    answer = lines[-1] if lines and failure is None else None
    return SandboxResult(failure is None, stdout, answer, error,
                         time.perf_counter() - start, failure)


# -- the child (runs as `python -I -S -B sandbox.py --sandbox-child` in the temporary directory) -----
class _OutputLimit(BaseException):
    """Stops a program that prints too much (BaseException: `except Exception` does not swallow it)."""


class _CappedOutput:
    """sys.stdout for the program: writes straight to fd 1 and stops at `limit` characters."""

    def __init__(self, limit: int):
        self.limit, self.written, self.overflow = limit, 0, False

    def write(self, text: str) -> int:
        room = self.limit - self.written
        if len(text) > room:
            self.overflow, text = True, text[:max(room, 0)]
        data = text.encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(1, data):]
        self.written += len(text)
        if self.overflow:
            raise _OutputLimit
        return len(text)

    def flush(self) -> None:
        pass


def _report(payload: dict) -> None:
    import json

    os.write(2, (MARK + json.dumps(payload) + "\n").encode())


def _proxies(allowed: list[str]) -> dict:
    """Stand-ins for the whitelisted modules: public attributes only, no foreign submodules."""
    import importlib
    import types

    modules = {name: importlib.import_module(name) for name in allowed}
    proxies = {name: types.ModuleType(name) for name in allowed}
    for name, module in modules.items():
        hidden = HIDDEN_ATTRS.get(name, frozenset())
        for attr in dir(module):
            if attr.startswith("_") or attr in hidden:
                continue
            value = getattr(module, attr)
            if isinstance(value, types.ModuleType):
                if value.__name__ not in proxies:
                    continue
                value = proxies[value.__name__]
            setattr(proxies[name], attr, value)
    if "datetime" in modules:  # lazy imports (_strptime, the local time zone) must happen now
        modules["datetime"].datetime.strptime("2000-01-02", "%Y-%m-%d")
        modules["datetime"].datetime.now().astimezone()
    return proxies


def _safe_builtins(proxies: dict) -> dict:
    import builtins

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name not in proxies:
            _report({"blocked": "import", "detail": str(name)[:200]})  # fails the run even if caught
            raise ImportError(f"forbidden import '{name}'")
        return proxies[name] if fromlist else proxies[name.partition(".")[0]]

    safe = {name: value for name, value in vars(builtins).items()
            if not name.startswith("_") and name not in FORBIDDEN_BUILTINS}
    safe.update(__build_class__=builtins.__build_class__, __import__=guarded_import)
    return safe


def _apply_limits(job: dict) -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized file write fails instead of killing
    mb = 1024 * 1024
    for name, value in (("RLIMIT_CPU", (job["cpu_s"], job["cpu_s"] + 1)),
                        ("RLIMIT_AS", (job["memory_mb"] * mb,) * 2), ("RLIMIT_NPROC", (0, 0)),
                        ("RLIMIT_FSIZE", (mb, mb)), ("RLIMIT_NOFILE", (32, 32)), ("RLIMIT_CORE", (0, 0))):
        try:
            resource.setrlimit(getattr(resource, name), value)
        except (AttributeError, ValueError, OSError):
            pass  # a limit this system lacks or does not enforce (RLIMIT_AS on macOS); the others hold


def _program_line(tb) -> int | None:
    """The innermost line of the program in a traceback (the audit hook lets this file's code, not the
    program's, read tb_frame and f_code; f_globals is not audited, so checking it cannot recurse)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == PROGRAM_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


_HARMLESS_EVENTS = frozenset({"exec", "compile", "sys._getframe", "builtins.id",
                              "cpython._PySys_ClearAuditHooks"})
# os functions that create files without raising an audit event; deleted from os and posix before the
# program starts (the audited ones, os.system or os.fork, are left for the hook to report).
_DISARMED_OS = ("mkfifo", "mknod")


def _make_audit_hook(runner_globals: dict):
    """The audit hook: deny every audited action except a few harmless ones (namedtuple needs exec and
    sys._getframe). A closure over what it uses, installed without keeping a reference, so a program
    that rebinds this module's globals cannot reach or loosen it."""
    getframe, report, harmless = sys._getframe, _report, _HARMLESS_EVENTS

    def hook(event: str, args: tuple) -> None:
        if event in harmless:
            return
        if event == "object.__setattr__" and len(args) > 1 and args[1] == "__module__":
            return  # namedtuple and total_ordering set __module__ on the classes they make
        if event == "object.__getattr__" and getframe(1).f_globals is runner_globals:
            return  # this file's own code (the runner reading line numbers from a traceback)
        detail = args[1] if event.startswith("object.") and len(args) > 1 else (args[0] if args else "")
        report({"blocked": event, "detail": detail[:200] if isinstance(detail, str) else ""})
        raise PermissionError(f"blocked by sandbox: {event}")

    return hook


def _run(code, builtins_: dict, out: _CappedOutput, job: dict) -> dict:
    try:
        exec(code, {"__builtins__": builtins_, "__name__": "__main__"})
    except _OutputLimit:
        pass
    except MemoryError:
        return {"status": "error", "failure": "memory", "error": f"memory limit {job['memory_mb']} MB exceeded"}
    except SystemExit as exc:
        if exc.code not in (None, 0):
            return {"status": "error", "failure": "error", "error": f"SystemExit: {exc.code}"}
    except BaseException as exc:  # noqa: BLE001  (the program's own error, reported as one line)
        line = _program_line(exc.__traceback__)
        try:
            message = f"{type(exc).__name__}: {exc}"[:300]
        except BaseException:  # noqa: BLE001  (a program-defined __str__ that raises)
            message = type(exc).__name__
        where = f" (line {line})" if line else ""
        return {"status": "error", "failure": "error", "error": message + where}
    if out.overflow:
        return {"status": "error", "failure": "output", "error": f"output limit of {out.limit} characters exceeded"}
    return {"status": "ok"}


def _child_main() -> None:
    import json

    with open(JOB_FILE, encoding="utf-8") as f:
        job = json.load(f)
    os.remove(JOB_FILE)
    builtins_ = _safe_builtins(_proxies(job["allowed"]))
    _apply_limits(job)
    if job["chroot_user"]:
        uid, gid = job["chroot_user"]
        os.chroot(".")
        os.chdir("/")
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    out = _CappedOutput(job["stdout_limit"])
    sys.stdout = out
    try:
        code = compile(job["code"], PROGRAM_FILE, "exec")
    except (SyntaxError, ValueError) as exc:
        _report({"status": "error", "failure": "syntax", "error": _syntax_message(exc)})
        os._exit(0)
    import posix

    for name in _DISARMED_OS:
        for module in (os, posix):
            if hasattr(module, name):
                delattr(module, name)
    sys.addaudithook(_make_audit_hook(globals()))
    _report(_run(code, builtins_, out, job))
    os._exit(0)  # skip interpreter shutdown: the program's __del__ methods must not run after the verdict


if __name__ == "__main__" and sys.argv[1:] == ["--sandbox-child"]:
    _child_main()
