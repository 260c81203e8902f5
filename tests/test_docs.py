"""
Docs cannot rot: every code block of the documentation is run, so an example that stops working fails here.

Read: README.rst, docs/*.rst, examples/README.rst, and the module docstrings of docs/examples/*.py and
examples/*.py.  docutils finds the blocks: ``.. code-block:: LANG`` (or ``code``, ``sourcecode``), ``::``
literal blocks (commands in a docstring, sample output in an .rst file) and ``.. literalinclude::``.  Each block
is one test, ``test_block[FILE:LINE]``, LINE being the block's first line.

Marks: an rst comment right before a block (for a ``::`` block: right before the paragraph ending in ``::``);
Sphinx does not render comments.

``.. not-runnable: REASON``
    the block is not run (the benchmark, the test suite itself); the reason is required.
``.. output-of: COMMAND``
    sample output: COMMAND (a shell command, rewritten like the blocks) is run, and its output must have the
    block's lines, in order, ``...`` matching anything.

A block without a mark is run; one that cannot be run and has no mark fails.

Each document is followed as a reader would follow it: its blocks in order, in a scratch copy of the checkout
(the top-level entries symlinked; the document's directory, examples/ for examples/, the root otherwise, a
real directory), where the document's file blocks are written.  Documents run in parallel threads, and so do
shell blocks that depend on nothing before them (no server, no node, none of the document's files: the docs
build); each block's test waits for its block.

- **File blocks** (first line ``# chat.py``, ``# myapp.tac``, ``# sockdrawer.toml``) are written under that
  name, for the commands next to them.
- **sh**: each command in turn.  ``pip install`` is not run (it needs the network and would change the
  environment of these tests): what it names must be this checkout, with extras it has, or be installed.
  ``twistd``, ``python docs/examples/embedded.py`` and ``python -m http.server`` are servers: started and
  waited for (a node's "listening on" lines, and "subscribed to" on Redis).  A block's sockdrawer nodes keep
  running for the blocks after it, as in a reader's other terminal, until the document's next node or its end;
  then SIGTERM must stop them cleanly (part of the test of the block that started them).  ``python -m
  websockets URL`` must connect and receive what is published on its channel (and a typed line back where the
  doc says it comes back).  Any other command must exit 0; ``# ...`` lines after a command are its output
  (JSON compared key by key, counts only as numbers: they depend on who listens); ``curl`` must get JSON
  without ``error``, ``redis-cli`` a number.
- **python**: one Python interpreter per document (a child process, with a reactor), the blocks run in it in
  order, sharing their names; then a ``SockDrawerService`` a block made is started, as its application would;
  a Deferred it bound must fire without failing; a ``test_*`` function it defined is called.
- **toml**: loaded with ``sockdrawer.config.load_config_file``, validated, its listeners imported.
- **javascript**: in headless Chromium, on a page from the node's host, after the document's earlier
  JavaScript blocks: every WebSocket it opens must open and receive a message published on its channel,
  without a script error; a block that logs must log it.
- **literalinclude**: the file exists and a command of the same document runs it.

A command that talks to port 8020 or 8021 talks to the document's running node, or else to the shared node (a
``twistd sockdrawer`` on the private redis-server).  ``$SOCKDRAWER_URL`` is that Redis, and ``myapp`` (the
reader's application in the docs, ``myapp.listeners:Chat``) is importable.  Every change made to a block before
it runs is in ``REWRITES``.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import glob
import importlib.metadata
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import docutils.core
import docutils.nodes as dn
import pytest
from childnode import ChildNode
from conftest import RedisServer
from docutils.parsers.rst import Directive, directives, roles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RST_FILES = ["README.rst", *sorted(glob.glob("docs/*.rst", root_dir=ROOT)), "examples/README.rst"]
PY_FILES = [*sorted(glob.glob("docs/examples/*.py", root_dir=ROOT)), *sorted(glob.glob("examples/*.py", root_dir=ROOT))]
WAIT = 90.0  # seconds for anything to happen; it normally takes well under one (generous: CI machines are shared)
BLOCK_TIMEOUT = 110.0  # seconds a test waits for its block (pytest-timeout stops a test at 120)

LANGUAGES = {"sh": "sh", "console": "sh", "bash": "sh", "shell": "sh", "python": "python", "py": "python",
             "toml": "toml", "javascript": "javascript", "js": "javascript", "text": "text", "": "text"}
MARK = re.compile(r"(not-runnable|output-of):\s*(.*)", re.S)

# Every change made to a block before it runs.  @ws@ and @api@ become the ports of the node the command talks
# to, @redis@ the private redis-server's port, @tmp@ a scratch directory.
REWRITES: list[tuple[str, str]] = [
    # nodes listen on free loopback ports (their numbers are read from their logs)
    (r"\btcp:80[23][01](:interface=127\.0\.0\.1)?\b", "tcp:0:interface=127.0.0.1"),
    (r"(--port|-p) 80[23]0\b", r"\1 tcp:0:interface=127.0.0.1"),
    (r"(SockDrawerService\((?![^)\n]*\bapi=)[^)\n]*)\)", r'\1, api="tcp:0:interface=127.0.0.1")'),
    (r"\bhttp\.server 8000\b", "http.server 0"),
    # clients reach the node they talk to
    (r":8020\b", ":@ws@"),
    (r":8021\b", ":@api@"),
    # Redis is the private redis-server
    (r"\blocalhost:6379\b", "127.0.0.1:@redis@"),
    (r"\bredis\.Redis\(\)", "redis.Redis(port=@redis@)"),
    (r'\bhost="cache\.internal", port=6379\b', 'host="127.0.0.1", port=@redis@'),
    (r"\bredis-cli ", "redis-cli -p @redis@ "),
    # files stay in the scratch directories
    (r"--pidfile=/\S*/", "--pidfile="),
    (r"\bdocs/_build/html\b", "@tmp@/html"),
]
PACKAGES = {"redis-cli": "redis-tools"}  # the Debian package of a command, when it is not its name
LOOPBACK_PORT = "tcp:0:interface=127.0.0.1"  # what a node whose command names no port listens on
SERVER_SCRIPTS = ("docs/examples/embedded.py",)  # python scripts that run a node until stopped
# the reader's application the docs name (myapp.listeners:Chat): the chat listener of examples/
MYAPP = {"myapp/__init__.py": "", "myapp/listeners.py": "examples/chat_listener.py"}


def rewrite(text: str) -> str:
    for pattern, replacement in REWRITES:
        text = re.sub(pattern, replacement, text, flags=re.M)
    return text


def tail(text: str, lines: int = 25) -> str:
    """The end of a long output, for a failure message."""
    kept = text.splitlines()[-lines:]
    return "\n".join(kept if len(kept) < lines else ["...", *kept])


# -- extraction


@dataclasses.dataclass
class Block:
    path: str  # relative to ROOT
    line: int  # of the block's first line
    language: str  # sh, python, toml, javascript, text, include
    text: str
    mark: tuple[str, str] | None = None  # ("not-runnable", reason) or ("output-of", command)
    include: str | None = None  # literalinclude: the file, relative to ROOT
    index: int = 0  # in its file

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def filename(self) -> str | None:
        """The file this block is, when its first line is a comment naming one (``# chat.py``)."""
        first = self.text.split("\n", 1)[0].strip() if self.language in ("python", "toml") else ""
        match = re.fullmatch(r"#\s*([\w.-]+\.(?:py|tac|toml))", first)
        return match.group(1) if match else None


class _AnyOption(dict[str, Any]):
    def __bool__(self) -> bool:
        return True

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> Any:
        return directives.unchanged


class _CodeBlock(Directive):
    """``.. code-block:: LANG``: a literal block that knows its language and its first line."""

    optional_arguments = 1
    has_content = True
    option_spec = _AnyOption()

    def run(self) -> list[dn.Node]:
        text = "\n".join(self.content)
        node = dn.literal_block(text, text)
        language = self.arguments[0] if self.arguments else ""
        node["language"] = LANGUAGES.get(language, language)
        node["first_line"] = self.content_offset + 1
        return [node]


class _LiteralInclude(Directive):
    required_arguments = 1
    option_spec = _AnyOption()

    def run(self) -> list[dn.Node]:
        node = dn.literal_block("", "")
        node["language"] = "include"
        node["include"] = self.arguments[0]
        node["first_line"] = self.lineno
        return [node]


class _NoBlocks(Directive):
    """The Sphinx directives the docs use that hold no code blocks (toctree, autodoc)."""

    optional_arguments = 10
    final_argument_whitespace = True
    has_content = True
    option_spec = _AnyOption()

    def run(self) -> list[dn.Node]:
        return []


def _role(name: str, rawtext: str, text: str, lineno: int, inliner: Any, options: Any = None,
          content: Any = None) -> tuple[list[dn.Node], list[dn.Node]]:
    return [dn.literal(rawtext, text)], []


for _name in ("code-block", "code", "sourcecode"):
    directives.register_directive(_name, _CodeBlock)
directives.register_directive("literalinclude", _LiteralInclude)
for _name in ("toctree", "automodule", "autoclass", "autoexception", "autofunction", "autointerface", "data",
              "sockdrawer-options"):
    directives.register_directive(_name, _NoBlocks)
for _name in ("doc", "ref", "class", "meth", "func", "mod", "data", "exc", "attr", "obj"):
    roles.register_local_role(_name, _role)


def _mark_before(node: dn.Element) -> dn.comment | None:
    """The mark comment right before ``node``, or, for a ``::`` block, right before its paragraph."""
    siblings = node.parent.children
    index = siblings.index(node)
    before = siblings[index - 1] if index > 0 else None
    if isinstance(before, dn.paragraph) and "language" not in node:
        before = siblings[index - 2] if index > 1 else None
    if isinstance(before, dn.comment) and MARK.fullmatch(before.astext().strip()):
        return before
    return None


def _blocks_of(text: str, path: str, first_line: int = 1, docstring: bool = False) -> tuple[list[Block], list[str]]:
    """The blocks of the rst ``text`` (line 1 of which is ``first_line`` of ``path``); and marks on nothing."""
    doctree = docutils.core.publish_doctree(
        text, source_path=path, settings_overrides={"report_level": 5, "halt_level": 5, "file_insertion_enabled": 0}
    )
    problems = [m.astext() for m in doctree.findall(dn.system_message) if m["level"] >= 3]
    assert not problems, f"{path}: docutils cannot read it, so blocks may be missed: {problems}"
    lines = text.splitlines()
    blocks: list[Block] = []
    marks_used: list[dn.Node] = []
    for node in doctree.findall(dn.literal_block):
        if "first_line" in node:
            line = node["first_line"]
        else:  # a '::' block: node.line is about where it is; find its first line
            first = node.astext().split("\n", 1)[0].strip()
            line = next(i + 1 for i in range(max((node.line or 1) - 2, 0), len(lines)) if lines[i].strip() == first)
        mark = None
        mark_node = _mark_before(node)
        if mark_node is not None:
            marks_used.append(mark_node)
            kind, value = MARK.fullmatch(mark_node.astext().strip()).groups()  # type: ignore[union-attr]
            mark = (kind, " ".join(value.split()))
        include = node.get("include")
        if include:
            include = os.path.normpath(os.path.join(os.path.dirname(path), include))
        language = node.get("language", "sh" if docstring else "text")
        blocks.append(Block(path, line + first_line - 1, language, node.astext(), mark, include))
    stray = [f"{path}:{(c.line or 1) + first_line - 1}: a mark not right before a block: {c.astext()}"
             for c in doctree.findall(dn.comment)
             if MARK.fullmatch(c.astext().strip()) and not any(c is m for m in marks_used)]
    if docstring:  # commands in a docstring that docutils does not see as a literal block
        stray += [f"{path}: an indented block that is not a literal block (missing '::'?): {q.astext()[:60]!r}"
                  for q in doctree.findall(dn.block_quote)]
    return blocks, stray


def collect() -> tuple[list[Block], list[str]]:
    """Every block of the docs, in order, and the problems found on the way."""
    blocks: list[Block] = []
    problems: list[str] = []
    for path in RST_FILES:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            found, stray = _blocks_of(f.read(), path)
        blocks += found
        problems += stray
    for path in PY_FILES:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            module = ast.parse(f.read())
        docstring = ast.get_docstring(module, clean=False)
        if docstring:
            found, stray = _blocks_of(docstring, path, first_line=module.body[0].lineno, docstring=True)
            blocks += found
            problems += stray
    for path in {b.path for b in blocks}:
        for index, block in enumerate(b for b in blocks if b.path == path):
            block.index = index
    return blocks, problems


ALL_BLOCKS, PROBLEMS = collect()
RUN = [b for b in ALL_BLOCKS if not (b.mark and b.mark[0] == "not-runnable")]
NOT_RUN = [b for b in ALL_BLOCKS if b.mark and b.mark[0] == "not-runnable"]


# -- shell commands


@dataclasses.dataclass
class Command:
    env: dict[str, str]
    argv: list[str]
    remark: str = ""  # a trailing '# ...' comment
    expected: list[str] = dataclasses.field(default_factory=list)  # the '# ...' lines after it: its output

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def _split_comment(line: str) -> tuple[str, str]:
    """``line`` without its trailing ``# comment`` (outside quotes), and the comment."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line, ""


def parse_commands(text: str) -> list[Command]:
    """The commands of a shell block: ``&&`` chains split, ``VAR=value`` prefixes as env, ``\\`` lines joined."""
    commands: list[Command] = []
    for raw in re.sub(r"\\\n\s*", " ", text).splitlines():
        line, remark = _split_comment(raw.strip())
        if not line:
            if remark and commands:
                commands[-1].expected.append(remark)
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts: list[list[str]] = [[]]
        for token in lexer:
            if token == "&&":
                parts.append([])
            else:
                assert not set(token) <= set("();<>|&"), f"shell syntax the docs test does not run: {token!r}"
                parts[-1].append(token)
        for part in parts:
            env = {}
            while part and re.fullmatch(r"[A-Za-z_]\w*=.*", part[0]):
                name, _, value = part.pop(0).partition("=")
                env[name] = value
            commands.append(Command(env, part))
        commands[-1].remark = remark
    return commands


def server_kind(argv: list[str]) -> str | None:
    """``"node"`` for a command that runs a sockdrawer node until stopped, ``"http"`` for a web server."""
    if argv[0] == "twistd" or (argv[0] == "python" and len(argv) > 1 and argv[1] in SERVER_SCRIPTS):
        return "node"
    if argv[:3] == ["python", "-m", "http.server"]:
        return "http"
    return None


def server_argv(argv: list[str]) -> list[str]:
    """A node's command line, with loopback ports on free ports where it names none."""
    argv = list(argv)
    if argv[0] == "twistd" and "sockdrawer" in argv:
        at = argv.index("sockdrawer") + 1
        options = argv[at:]
        for option, short in (("--port", "-p"), ("--api", None)):
            if option not in options and short not in options and not any(o.startswith(option + "=")
                                                                           for o in options):
                argv[at:at] = [option, LOOPBACK_PORT]
    elif argv[0] == "python" and "--port" not in argv:
        argv += ["--port", LOOPBACK_PORT]
    return argv


def talks_to_node(argv: list[str]) -> bool:
    return any("@ws@" in a or "@api@" in a for a in argv)


# -- processes


class Process:
    """A child process of a doc command, its output in a log file."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], name: str, pipe: bool = False) -> None:
        self.argv, self.env = argv, env
        self.log_path = os.path.join(cwd, f".docs-test-{name}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE if pipe else self._log,
                                     stderr=self._log if pipe else subprocess.STDOUT)

    def text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for(self, ready: Callable[[str], Any], what: str, timeout: float = WAIT) -> Any:
        """Wait until ``ready(output)`` is true; fail if the process exits first or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # before reading: then the output is all there
            text = self.text()
            result = ready(text)
            if result:
                return result
            if exited:
                raise AssertionError(f"{shlex.join(self.argv)} exited ({self.proc.returncode}) before {what}:\n"
                                     f"{tail(text)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{shlex.join(self.argv)}: no {what} within {timeout} s:\n{tail(text)}")
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, then wait for the exit (killing it after WAIT seconds); the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            self._log.close()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream:
                    stream.close()
        return self.proc.returncode


_STARTING = re.compile(r"sockdrawer starting: WebSocket on (\S+), API (?:on )?(\S+), broker (\S+),")
_WS = re.compile(r"listening on wss?://\S+?:(\d+)/<channel>")
_API = re.compile(r"listening on https?://[^\s/]+:(\d+)")


class Node(Process):
    """A server a doc command started: a sockdrawer node (``kind == "node"``) or a web server (``"http"``)."""

    ws_port = 0
    api_port: int | None = None
    broker = ""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], kind: str, api_key: str | None) -> None:
        super().__init__(argv, cwd, env, kind)
        self.kind, self.api_key = kind, api_key

    def wait_ready(self) -> Node:
        if self.kind == "http":
            self.api_port = int(self.wait_for(lambda t: re.search(r"Serving HTTP on \S+ port (\d+)", t),
                                              "'Serving HTTP' line").group(1))
            return self

        def ready(text: str) -> bool:
            starting = _STARTING.search(text)
            if not starting or not _WS.search(text):
                return False
            if starting.group(2) != "off" and not _API.search(text):
                return False
            return starting.group(3) == "embedded" or "subscribed to" in text

        text = self.wait_for(lambda t: ready(t) and t, "'listening on' lines (and 'subscribed to' with Redis)")
        self.broker = _STARTING.search(text).group(3)  # type: ignore[union-attr]
        self.ws_port = int(_WS.search(text).group(1))  # type: ignore[union-attr]
        api = _API.search(text)
        self.api_port = int(api.group(1)) if api else None
        return self

    def publish(self, channel: str, message: str) -> dict[str, Any]:
        return http_publish(self.api_port, channel, message, self.api_key)

    def assert_stops_cleanly(self, what: str) -> None:
        """SIGTERM stops it at once, without a traceback."""
        status = self.stop()
        text = self.text()
        assert status in (0, -signal.SIGTERM), f"{what} exited with {status} after SIGTERM:\n{tail(text)}"
        assert "Traceback" not in text and "Unhandled" not in text, f"{what} logged an error:\n{text}"


def stop_all(servers: list[Node], what: str) -> None:
    """Stop ``servers``; they must stop cleanly."""
    errors = []
    for server in reversed(servers):
        try:
            server.assert_stops_cleanly(f"{shlex.join(server.argv)} ({what})")
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


def http_publish(api_port: int | None, channel: str, message: str, api_key: str | None = None) -> dict[str, Any]:
    assert api_port, "the node has no HTTP API to publish through"
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/publish/{urllib.parse.quote(channel)}",
                                     data=message.encode(), method="POST")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


class SharedNode:
    """The node commands talk to when their document runs none: a ChildNode on the private Redis."""

    api_key = None
    kind = "node"

    def __init__(self, child: ChildNode) -> None:
        self.child, self.ws_port, self.api_port = child, child.ws_port, child.api_port

    def publish(self, channel: str, message: str) -> dict[str, Any]:
        return http_publish(self.api_port, channel, message)


# The Python interpreter of a document: runs the blocks it reads on stdin (JSON lines) in the reactor thread,
# one namespace for all; answers each with a JSON line on its stdout.  What the blocks print goes to stderr.
PYTHON_DRIVER = r"""
import json, os, sys, threading, time, traceback
from twisted.internet import defer, reactor, task

answers = os.fdopen(os.dup(1), "w")
sys.stdout = sys.stderr
namespace = {"__name__": "__main__"}
services = []

@defer.inlineCallbacks
def run(request):
    try:
        before = dict(namespace)
        code = compile("\n" * (request["line"] - 1) + request["code"], request["filename"], "exec")
        exec(code, namespace)
        new = {k: v for k, v in namespace.items() if before.get(k) is not v}
        service = sys.modules.get("sockdrawer.service")
        for value in new.values():
            if service and isinstance(value, service.SockDrawerService) and not value.running:
                value.startService()  # as the application it is made for would
                services.append(value)
                yield value.when_listening().addTimeout(30, reactor)
                deadline = time.monotonic() + 30
                while value.settings.redis and not value.broker.is_connected():
                    assert time.monotonic() < deadline, "the service did not connect to Redis"
                    yield task.deferLater(reactor, 0.02, lambda: None)
        for name, value in new.items():
            if isinstance(value, defer.Deferred):
                yield value.addTimeout(30, reactor)
            elif name.startswith("test_") and callable(value):
                value()
        answer = {"ok": True}
    except BaseException:
        answer = {"ok": False, "error": traceback.format_exc()}
    answers.write(json.dumps(answer) + "\n")
    answers.flush()

@defer.inlineCallbacks
def stop():
    for svc in reversed(services):
        if svc.running:
            yield svc.stopService()
    reactor.stop()

def read():
    for line in sys.stdin:
        reactor.callFromThread(run, json.loads(line))
    reactor.callFromThread(stop)

threading.Thread(target=read, daemon=True).start()
reactor.run()
"""


class Interpreter(Process):
    """A document's Python interpreter (PYTHON_DRIVER)."""

    seen = 0  # how much of its log the blocks before have accounted for

    def run(self, block: Block, code: str) -> None:
        assert self.proc.stdin and self.proc.stdout
        request = {"code": code, "line": block.line, "filename": os.path.join(ROOT, block.path)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT * 2)
        line = self.proc.stdout.readline() if ready else b""
        assert line, f"the document's Python interpreter did not answer:\n{tail(self.text())}"
        answer = json.loads(line)
        assert answer["ok"], f"{block.id} failed:\n{answer['error']}\nWhat the blocks printed:\n{tail(self.text())}"
        printed, self.seen = self.text()[self.seen:], len(self.text())
        assert "Unhandled error" not in printed, f"{block.id} left a failure unhandled:\n{tail(printed)}"

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()  # it stops the services the blocks started, then exits
        try:
            self.proc.wait(WAIT)
        finally:
            self.stop()
        assert self.proc.returncode == 0, f"the document's Python interpreter exited with {self.proc.returncode}"


# -- expected output


def _same(expected: Any, actual: Any) -> bool:
    """JSON values alike: the same keys and values, except that any number stands for any number."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and expected.keys() == actual.keys() and all(
            _same(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(map(_same, expected, actual))
    if isinstance(expected, int) and not isinstance(expected, bool):
        return isinstance(actual, int) and not isinstance(actual, bool)
    return bool(expected == actual)


def assert_output(expected: list[str], output: str, what: str) -> None:
    """``output`` has the ``expected`` lines in order (``...``: anything), or is the same JSON."""
    try:
        value = json.loads("\n".join(expected))
    except ValueError:
        pass
    else:
        try:
            actual = json.loads(output)
        except ValueError:
            raise AssertionError(f"{what}: expected JSON like {expected}, got {output!r}") from None
        assert _same(value, actual), f"{what}: expected {expected}, got {output}"
        return
    position = 0
    for line in expected:
        line = line.strip()
        if line in ("", "..."):
            continue
        pattern = ".*?".join(re.escape(part) for part in line.split("..."))
        match = re.compile(pattern).search(output, position)
        assert match, f"{what}: no line like {line!r} (in order) in its output:\n{tail(output)}"
        position = match.end()


def has_output(expected: list[str], output: str) -> bool:
    try:
        assert_output(expected, output, "")
    except AssertionError:
        return False
    return True


# -- documents


@dataclasses.dataclass
class Outcome:
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


class Session:
    """One document, followed in order: its scratch checkout, running nodes, Python interpreter and page."""

    def __init__(self, docs: Docs, path: str) -> None:
        self.docs, self.path = docs, path
        self.blocks = [b for b in ALL_BLOCKS if b.path == path]
        self.root = os.path.join(docs.tmp, re.sub(r"\W", "_", path))
        own = "examples" if path.startswith("examples/") else ""
        os.makedirs(os.path.join(self.root, own))
        for name in os.listdir(ROOT):
            if not name.startswith(".") and name != own:
                os.symlink(os.path.join(ROOT, name), os.path.join(self.root, name))
        if own:
            for name in os.listdir(os.path.join(ROOT, own)):
                os.symlink(os.path.join(ROOT, own, name), os.path.join(self.root, own, name))
        self.cwd = os.path.join(self.root, own)
        for block in self.blocks:
            if block.filename:
                with open(os.path.join(self.cwd, block.filename), "w") as f:
                    f.write(self.fill(rewrite(block.text), None) + "\n")
        self.kept: tuple[Block, list[Node]] | None = None  # the nodes of the last block that started some
        self.python: Interpreter | None = None

    # running

    def run(self) -> None:
        for block in self.blocks:
            if not self.independent(block):
                self.run_block(block)
        self.close()

    def run_block(self, block: Block) -> None:
        if self.docs.cancelled:
            self.docs.finish(block, RuntimeError("cancelled: the test run stopped"))
            return
        try:
            if block.mark and block.mark[0] == "not-runnable":
                self.docs.finish(block, None)
                return
            runner = RUNNERS.get(block.language)
            assert runner, f"no way to run a {block.language!r} block: mark it '.. not-runnable: REASON'"
            runner(self, block)
        except BaseException as e:
            self.docs.finish(block, e)
        else:
            if not (self.kept and self.kept[0] is block):
                self.docs.finish(block, None)

    def independent(self, block: Block) -> bool:
        """
        A shell block that starts no server, talks to no node and names no file of its document (the docs
        build): it runs on its own, in parallel with the rest of its document.
        """
        if block.language != "sh" or block.mark:
            return False
        commands = parse_commands(rewrite(block.text))
        files = {b.filename for b in self.blocks if b.filename}
        return not any(server_kind(c.argv) or talks_to_node(c.argv) or c.argv[:3] == ["python", "-m", "websockets"]
                       or files & set(c.argv) for c in commands)

    def keep(self, block: Block, servers: list[Node]) -> None:
        """Keep ``block``'s servers running for the blocks after it."""
        self.release()
        self.kept = (block, servers)

    def release(self) -> None:
        """Stop the kept servers; the test of the block that started them says whether they stopped cleanly."""
        if self.kept:
            (block, servers), self.kept = self.kept, None
            try:
                stop_all(servers, f"started by {block.id}")
            except AssertionError as e:
                self.docs.finish(block, e)
            else:
                self.docs.finish(block, None)

    def close(self) -> None:
        try:
            self.release()
        finally:
            if self.python:
                self.python.close()

    # what commands see

    def node(self) -> Any:
        """The node this document's commands talk to: the last one it started, or the shared node."""
        if self.kept:
            nodes = [n for n in self.kept[1] if n.kind == "node"]
            if nodes:
                return nodes[-1]
        return self.docs.shared()

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        """A fresh shell's environment (no SOCKDRAWER_* of the caller's), with the private Redis and myapp."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKDRAWER_")}
        env.update(PATH=self.docs.bin + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1",
                   SOCKDRAWER_URL=self.docs.redis.url, PYTHONPATH=self.docs.site)
        env.update(extra)
        return env

    def fill(self, text: str, node: Any) -> str:
        text = text.replace("@redis@", str(self.docs.redis.port)).replace("@tmp@", self.docs.tmp)
        if "@ws@" in text or "@api@" in text:
            assert node is not None, f"no node to talk to for {text!r}"
            text = text.replace("@ws@", str(node.ws_port)).replace("@api@", str(node.api_port))
        return text

    def command(self, command: Command, started: list[Node] | None = None) -> Command:
        """``command`` with its placeholders filled in: its block's last node, or the document's."""
        nodes = [n for n in started or [] if n.kind == "node"]
        node = (nodes[-1] if nodes else self.node()) if talks_to_node(command.argv) else None
        return dataclasses.replace(command, argv=[self.fill(a, node) for a in command.argv],
                                   expected=[self.fill(e, None) for e in command.expected])

    def executable(self, argv: list[str], env: dict[str, str]) -> list[str]:
        if argv[0] == "python":
            return [sys.executable, *argv[1:]]
        found = shutil.which(argv[0], path=env["PATH"])
        assert found, f"{argv[0]} is not on the PATH: apt-get install {PACKAGES.get(argv[0], argv[0])}"
        return [found, *argv[1:]]

    def start_server(self, command: Command) -> Node:
        kind = server_kind(command.argv)
        assert kind
        argv = server_argv(command.argv) if kind == "node" else command.argv
        env = self.env(command.env)
        api_key = argv[argv.index("--api-key") + 1] if "--api-key" in argv else None
        return Node(self.executable(argv, env), self.cwd, env, kind, api_key).wait_ready()

    def node_needed_after(self, block: Block) -> bool:
        """Whether a block after ``block`` talks to a node before the next block that starts one."""
        own = [(c.argv, c.env) for c in parse_commands(rewrite(block.text))]
        for later in self.blocks[block.index + 1:]:
            if (later.mark and later.mark[0] == "not-runnable") or (later.language == "text" and not later.mark):
                continue
            text = rewrite(later.mark[1] if later.mark else later.text)
            if later.language == "javascript" or (later.language == "python" and talks_to_node([text])):
                return True
            if later.language in ("sh", "text"):
                for command in parse_commands(text):
                    if later.language == "text" and (command.argv, command.env) in own:
                        break  # the output of one of this block's nodes: read from it
                    if server_kind(command.argv) == "node":
                        return False
                    if talks_to_node(command.argv) or command.argv[:3] == ["python", "-m", "websockets"]:
                        return True
        return False

    def uses(self, filename: str) -> bool:
        """Whether a command of this document names the file."""
        return any(filename in c.argv for b in self.blocks if b.language == "sh" for c in parse_commands(b.text))


class Docs:
    """What the blocks run against: the private Redis, the shared node, a browser; and the outcome of each."""

    def __init__(self, tmp: str, redis: RedisServer, paths: list[str]) -> None:
        self.tmp, self.redis, self.bin = tmp, redis, os.path.dirname(sys.executable)
        self.site = os.path.join(tmp, "site")
        for name, source in MYAPP.items():
            os.makedirs(os.path.dirname(os.path.join(self.site, name)), exist_ok=True)
            if source:
                shutil.copy(os.path.join(ROOT, source), os.path.join(self.site, name))
            else:
                open(os.path.join(self.site, name), "w").close()
        self.outcomes = {b.id: Outcome() for b in ALL_BLOCKS}
        self.servers: dict[str, list[Node]] = {}  # the servers each shell block started
        self.cancelled = False
        self._lock = threading.Lock()
        self._shared: SharedNode | None = None
        self._browser: concurrent.futures.Future[Any] | None = None
        self.browser_lock = threading.Lock()
        self.sessions = [Session(self, path) for path in paths]
        # start what takes a while while the documents start: the shared node and, if needed, the browser
        self._warm = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self._warm.submit(self.shared)
        if any(b.language == "javascript" for s in self.sessions for b in s.blocks):
            self._browser = self._warm.submit(self._start_browser)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, max(2, os.cpu_count() or 1)))
        self._runs = [self._pool.submit(s.run_block, b) for s in self.sessions for b in s.blocks if s.independent(b)]
        self._runs += [self._pool.submit(s.run) for s in self.sessions]

    def finish(self, block: Block, error: BaseException | None) -> None:
        outcome = self.outcomes[block.id]
        if not outcome.done.is_set():
            outcome.error = error
            outcome.done.set()

    def result(self, block: Block) -> None:
        """Wait for ``block`` to have run; raise what it raised."""
        outcome = self.outcomes[block.id]
        assert outcome.done.wait(BLOCK_TIMEOUT), f"{block.id} did not run within {BLOCK_TIMEOUT} s"
        if outcome.error is not None:
            raise outcome.error

    def shared(self) -> SharedNode:
        with self._lock:
            if self._shared is None:
                workdir = os.path.join(self.tmp, "shared-node")
                os.makedirs(workdir)
                self._shared = SharedNode(ChildNode(workdir, ["--redis", self.redis.url]).start())
            return self._shared

    def browser(self) -> Any:
        """Headless Chromium (use it with ``browser_lock`` held)."""
        assert self._browser is not None
        return self._browser.result()

    def _start_browser(self) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
        assert chromium and driver, "chromium and chromedriver are needed: apt-get install chromium chromium-driver"
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                    f"--user-data-dir={os.path.join(self.tmp, 'chromium')}"):
            options.add_argument(arg)
        browser = webdriver.Chrome(service=Service(driver), options=options)
        browser.set_page_load_timeout(WAIT)
        browser.set_script_timeout(WAIT)
        return browser

    def close(self) -> None:
        self.cancelled = True
        try:
            for run in self._runs:
                run.result()
        finally:
            self._pool.shutdown()
            self._warm.shutdown()
            if self._browser is not None and self._browser.exception() is None:
                self._browser.result().quit()
            if self._shared is not None:
                self._shared.child.stop()


@pytest.fixture(scope="module")
def docs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         redis_server: RedisServer) -> Iterator[Docs]:
    """Runs the documents of the selected tests, in parallel; every block's test waits for its outcome."""
    params = [getattr(item, "callspec", None) for item in request.session.items]
    selected = {p.params["block"].path for p in params if p and isinstance(p.params.get("block"), Block)}
    if any(item.name.startswith("test_readme") for item in request.session.items):
        selected.add("README.rst")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never download a browser or driver
        paths = [p for p in RST_FILES + PY_FILES if p in selected]
        env = Docs(str(tmp_path_factory.mktemp("docs")), redis_server, paths)
        try:
            yield env
        finally:
            env.close()


# -- running blocks


def run_sh(session: Session, block: Block) -> None:
    commands = parse_commands(rewrite(block.text))
    assert commands, "an empty shell block"
    if any(server_kind(c.argv) == "node" for c in commands):
        session.release()  # this block's nodes replace the ones running (ports, twistd.pid)
    started: list[Node] = []
    session.docs.servers[block.id] = started
    try:
        for command in commands:
            run_command(session, session.command(command, started), started)
    except BaseException:
        for server in started:
            server.stop()
        raise
    if any(n.kind == "node" for n in started) and session.node_needed_after(block):
        session.keep(block, started)
    else:
        stop_all(started, f"started by {block.id}")


def run_command(session: Session, command: Command, started: list[Node]) -> None:
    argv = command.argv
    if argv[:3] == ["python3", "-m", "venv"] or argv[0] == ".":
        # making and activating a virtualenv: the tests already run in one
        assert argv[0] != "." or argv[1].endswith("/bin/activate"), command.text
    elif argv[:2] == ["pip", "install"]:
        check_pip(session, argv[2:])
    elif server_kind(argv):
        server = session.start_server(command)
        started.append(server)
        if server.kind == "http":
            with urllib.request.urlopen(f"http://127.0.0.1:{server.api_port}/", timeout=WAIT) as response:
                assert response.status == 200
    elif argv[:3] == ["python", "-m", "websockets"]:
        nodes = [n for n in started if n.kind == "node"]
        run_websockets_client(session, command, nodes[-1] if nodes else session.node())
    else:
        env = session.env(command.env)
        if any(a.endswith("send_message.py") for a in argv):
            # it must reach someone (exit status 2 otherwise): a node is up; without --url it talks to the
            # node's API at its default, 127.0.0.1:8021, which is the API port that node got here
            nodes = [n for n in started if n.kind == "node"]
            node = nodes[-1] if nodes else session.node()
            if "--url" not in argv:
                env["SOCKDRAWER_URL"] = f"http://127.0.0.1:{node.api_port}"
        done = subprocess.run(session.executable(argv, env), cwd=session.cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{command.text} exited with {done.returncode}:\n{tail(output)}"
        if command.expected:
            assert_output(command.expected, done.stdout, command.text)
        if argv[0] == "curl":  # the API answers JSON, with "error" when it refuses
            assert done.stdout.startswith("{") and '"error"' not in done.stdout, f"{command.text}: {done.stdout}"
        if argv[0] == "redis-cli":
            assert done.stdout.strip().isdigit(), f"{command.text}: {output}"


def check_pip(session: Session, args: list[str]) -> None:
    """Not run: what ``pip install`` names must be this checkout (with extras it has) or be installed."""
    targets = [a for a in args if not a.startswith("-")]
    assert targets, "pip install of nothing"
    for target in targets:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        if match:
            with open(os.path.join(session.cwd, "pyproject.toml"), "rb") as f:
                project = tomllib.load(f)["project"]
            assert project["name"] == "sockdrawer", f"pip install {target} is not this project"
            for extra in (match.group(1) or "").split(","):
                assert not extra or extra in project["optional-dependencies"], f"no extra {extra!r}"
            importlib.metadata.distribution("sockdrawer")
        else:
            importlib.metadata.distribution(target)  # the docs' own tools are installed for the tests


def run_websockets_client(session: Session, command: Command, node: Any) -> None:
    """``python -m websockets URL``: connects, gets what is published on its channel, and typed lines back."""
    url = command.argv[3]
    channel = urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:])
    env = session.env(command.env)
    client = Process(session.executable(command.argv, env), session.cwd, env, "websockets")
    try:
        client.wait_for(lambda t: f"Connected to {url}" in t, "'Connected to' line")
        if node.api_port:
            probe = f"published by the docs test on {channel!r}"
            node.publish(channel, probe)
            client.wait_for(lambda t: f"< {probe}" in t, f"message {probe!r}")
        else:  # a node without an API (the embedded clock) publishes by itself
            client.wait_for(lambda t: re.search(r"< \S", t), "message")
        assert client.proc.stdin
        if "it comes back" in command.remark:
            line = "typed in the docs test"
            client.proc.stdin.write(line.encode() + b"\n")
            client.proc.stdin.flush()
            client.wait_for(lambda t: f"< {line}" in t, f"{line!r} coming back")
        client.proc.stdin.close()  # end of input: it closes the connection and exits
        assert client.proc.wait(WAIT) == 0, client.text()
    finally:
        client.stop()


def run_python(session: Session, block: Block) -> None:
    if block.filename and not block.filename.endswith(".py"):  # a .tac file: twistd -ny runs it
        compile(block.text, block.id, "exec")
        assert session.uses(block.filename), f"no command of {session.path} uses {block.filename}"
        return
    text = rewrite(block.text)
    text = session.fill(text, session.node() if "@ws@" in text or "@api@" in text else None)
    if session.python is None:
        session.python = Interpreter([sys.executable, "-c", PYTHON_DRIVER], session.cwd, session.env({}), "python",
                                     pipe=True)
    session.python.run(block, text)


def run_toml(session: Session, block: Block) -> None:
    assert block.filename, "a TOML block names its file on its first line ('# sockdrawer.toml')"
    assert session.uses(block.filename), f"no command of {session.path} uses {block.filename}"
    check = ("import sys\n"
             "from sockdrawer.config import Settings, load_config_file\n"
             "from sockdrawer.core.listeners import load_listener_class\n"
             "settings = Settings(**load_config_file(sys.argv[1])).validate()\n"
             "for spec in settings.listeners:\n"
             "    load_listener_class(spec)\n")
    env = session.env({})
    done = subprocess.run([sys.executable, "-c", check, block.filename], cwd=session.cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{block.filename} is not a valid config:\n{tail(done.stderr)}"


_PAGE_PRELUDE = """
    window.logged = []; window.errors = []; window.sockets = [];
    console.log = function () { window.logged.push(Array.prototype.join.call(arguments, " ")); };
    window.addEventListener("error", function (e) { window.errors.push(String(e.message)); });
    var NativeWebSocket = window.WebSocket;
    window.WebSocket = function (url, protocols) {
        var ws = new NativeWebSocket(url, protocols);
        ws.received = [];
        ws.addEventListener("message", function (e) { ws.received.push(e.data); });
        window.sockets.push(ws);
        return ws;
    };
    window.WebSocket.prototype = NativeWebSocket.prototype;
    window.runBlock = function (code) {
        var script = document.createElement("script");
        script.text = code;
        document.head.appendChild(script);
    };
"""
_PAGE_STATE = """
    return {errors: errors, logged: logged, sockets: sockets.map(function (ws) {
        return {url: ws.url, open: ws.readyState === 1, received: ws.received}; })};
"""


def run_javascript(session: Session, block: Block) -> None:
    """In a page from the node's host: sockets open, messages arrive, no script error, and it logs them."""
    from selenium.webdriver.support.ui import WebDriverWait

    node = session.node()
    probe = json.dumps({"probe": block.id})  # JSON text: pages may parse what they get
    with session.docs.browser_lock:
        browser = session.docs.browser()
        browser.get(f"http://localhost:{node.api_port}/health")
        browser.execute_script(_PAGE_PRELUDE)
        for earlier in session.blocks[:block.index + 1]:
            if earlier.language == "javascript":
                browser.execute_script("runBlock(arguments[0]);", session.fill(rewrite(earlier.text), node))

        def state() -> Any:
            return browser.execute_script(_PAGE_STATE)

        wait = WebDriverWait(browser, WAIT, poll_frequency=0.02)
        wait.until(lambda _: state()["errors"] or (state()["sockets"] and all(s["open"] for s in state()["sockets"])))
        assert not state()["errors"], state()
        for url in {s["url"] for s in state()["sockets"]}:
            node.publish(urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:]), probe)
        wait.until(lambda _: state()["errors"] or all(probe in s["received"] for s in state()["sockets"]))
        result = state()
    assert not result["errors"], result
    if "console.log" in block.text:
        assert any(probe in line for line in result["logged"]), f"the block logged {result['logged']}, not {probe}"


def run_include(session: Session, block: Block) -> None:
    assert block.include and os.path.isfile(os.path.join(ROOT, block.include)), f"no file {block.include}"
    assert session.uses(block.include), f"no command of {session.path} runs {block.include}"


def run_output(session: Session, block: Block) -> None:
    """Sample output: the command its mark names prints it."""
    assert block.mark and block.mark[0] == "output-of", (
        "a literal block that is neither run nor marked: put '.. output-of: COMMAND' (the command that prints it) "
        "or '.. not-runnable: REASON' right before it (before its paragraph, for a '::' block)")
    (command,) = parse_commands(rewrite(block.mark[1]))
    command = session.command(command)
    expected = [session.fill(rewrite(line), None) for line in block.text.splitlines()]
    if not server_kind(command.argv):
        env = session.env(command.env)
        done = subprocess.run(session.executable(command.argv, env), cwd=session.cwd, env=env, capture_output=True,
                              text=True, timeout=300)
        assert_output(expected, done.stdout + done.stderr, block.mark[1])
        return
    argv = server_argv(command.argv)
    env = session.env(command.env)
    argv = session.executable(argv, env)
    kept = [n for n in session.kept[1] if (n.argv, n.env) == (argv, env)] if session.kept else []
    if kept:  # the document runs that very command: what it printed
        assert_output(expected, kept[0].text(), block.mark[1])
        return
    session.release()  # a reader stops the other node first (ports, twistd.pid)
    server = Process(argv, session.cwd, env, "output")
    try:  # a server prints it as it starts, or as it fails to
        server.wait_for(lambda t: has_output(expected, t), "the sample's lines")
    except AssertionError:
        assert_output(expected, server.text(), block.mark[1])  # which line is missing
        raise
    finally:
        server.stop()


RUNNERS: dict[str, Callable[[Session, Block], None]] = {
    "sh": run_sh, "python": run_python, "toml": run_toml, "javascript": run_javascript, "include": run_include,
    "text": run_output,
}


# -- the tests


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block(docs: Docs, block: Block) -> None:
    """The block runs and does what it shows (the module docstring says what that means for each kind)."""
    docs.result(block)


@pytest.mark.parametrize("block", NOT_RUN, ids=[b.id for b in NOT_RUN])
def test_not_runnable_block_says_why(block: Block) -> None:
    """A block marked not runnable gives a reason of a few words."""
    assert block.mark
    assert len(block.mark[1].split()) >= 3, f"{block.id}: '.. not-runnable:' needs a reason, got {block.mark[1]!r}"


def test_every_mark_marks_a_block() -> None:
    """Every mark is right before a block (or its '::' paragraph), and docstrings show commands as '::' blocks."""
    assert not PROBLEMS, "\n".join(PROBLEMS)


def test_every_code_directive_is_found() -> None:
    """docutils found as many blocks as the sources have code-block and literalinclude directives."""
    for path in RST_FILES:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            in_source = len(re.findall(r"^\s*\.\. (?:code-block|code|sourcecode|literalinclude)::", f.read(), re.M))
        found = [b for b in ALL_BLOCKS if b.path == path and b.language != "text"]
        assert len(found) == in_source, f"{path}: {len(found)} blocks found, {in_source} in it"


def test_readme_opens_with_the_service_and_the_test_suite(docs: Docs) -> None:
    """
    README.rst's first two blocks: a command that runs the service, which runs it on the embedded broker;
    and the command that runs the test suite, which is what CI runs (.ci/run), marked as such.
    """
    first, second = [b for b in ALL_BLOCKS if b.path == "README.rst"][:2]
    assert first.mark is None and "twistd -n sockdrawer" in first.text and "--redis" not in first.text
    docs.result(first)
    (node,) = docs.servers[first.id]
    assert node.broker == "embedded"
    assert second.mark and second.mark[0] == "not-runnable" and "test suite" in second.mark[1]
    with open(os.path.join(ROOT, ".ci/run")) as f:
        assert second.text.strip() in f.read().splitlines(), ".ci/run does not run the README's test command"
